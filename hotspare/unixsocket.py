"""Connecting to a unix socket at any path length.

``sockaddr_un.sun_path`` holds 108 bytes with its NUL, and state directories can be deep: a
longer path is reached through a descriptor of its directory (``/proc/self/fd/N/name``),
which is short. Used by the QMP client and the NBD reader alike.
"""

from __future__ import annotations

import os
import socket

SUN_PATH_MAX = 107


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A stream socket connected to ``path``, with ``timeout``; raises OSError as connect does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    dir_fd = None
    try:
        target = path
        if len(os.fsencode(target)) > SUN_PATH_MAX:
            dir_fd = os.open(os.path.dirname(target) or ".", os.O_PATH | os.O_CLOEXEC)
            target = f"/proc/self/fd/{dir_fd}/{os.path.basename(target)}"
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock
