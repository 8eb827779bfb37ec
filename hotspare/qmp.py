"""A small QMP (QEMU Machine Protocol) client: a unix socket carrying JSON, one message a line.

The storage daemon (:mod:`hotspare.capture.daemon`) and the QEMU VM hosts
(:mod:`hotspare.vm.qemu`) both speak it. The exchange: QEMU greets (``{"QMP": {...}}``),
the client sends ``qmp_capabilities``, then each ``{"execute": cmd, "arguments": {...},
"id": n}`` gets ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` with the same id; asynchronous events
(``{"event": ...}``) may come in between and are kept in :attr:`QmpClient.events`.

QEMU's QMP server serves one client at a time and queues the others, so callers open a
client for a few commands and close it: a connection held open would stall every other
status query or capture step for that VM.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from hotspare.errors import HotspareError

DEFAULT_TIMEOUT = 10.0
# sockaddr_un.sun_path holds 108 bytes with its NUL; longer paths are reached through a
# descriptor of their directory (/proc/self/fd/N/name), which is short.
_SUN_PATH_MAX = 107


class QmpError(HotspareError):
    """A QMP command failed or QEMU did not answer. ``error_class`` is QEMU's error class
    (``CommandNotFound``, ``GenericError``, ...) or ``None`` for a transport fault."""

    def __init__(self, socket_path: str, command: str, desc: str, error_class: str | None = None) -> None:
        self.socket_path = socket_path
        self.command = command
        self.error_class = error_class
        self.desc = desc
        what = f"{error_class}: {desc}" if error_class else desc
        super().__init__(f"QMP {command} on {socket_path}: {what}")


class QmpClient:
    """One QMP connection. Use as a context manager: ``with QmpClient(path) as q: q.execute(...)``."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    # -- connection ----------------------------------------------------------------------
    def connect(self) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        dir_fd = None
        try:
            target = self.path
            if len(os.fsencode(target)) > _SUN_PATH_MAX:
                dir_fd = os.open(os.path.dirname(target) or ".", os.O_PATH | os.O_CLOEXEC)
                target = f"/proc/self/fd/{dir_fd}/{os.path.basename(target)}"
            sock.connect(target)
        except OSError as err:
            sock.close()
            raise QmpError(self.path, "connect", f"cannot connect: {err.strerror or err}") from err
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self._sock = sock
        try:
            # QEMU greets only once it accepts us, which waits while another client is served.
            greeting = self._read("greeting", time.monotonic() + self.timeout)
            if "QMP" not in greeting:
                raise QmpError(self.path, "greeting", f"not a QMP greeting: {str(greeting)[:200]}")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None, **args: Any) -> Any:
        """Run ``command`` with ``arguments`` (for names with hyphens) and ``args``; returns
        QEMU's ``return`` value, or raises :class:`QmpError` naming the command and QEMU's
        error class and description."""
        if self._sock is None:
            raise QmpError(self.path, command, "not connected")
        merged = {**(arguments or {}), **args}
        self._next_id += 1
        msg_id = f"hotspare-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if merged:
            msg["arguments"] = merged
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as err:
            raise QmpError(self.path, command, f"send failed: {err.strerror or err}") from err
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read(command, deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue  # an answer to a command another client sent before us: not ours
            if "error" in reply:
                err = reply["error"]
                raise QmpError(self.path, command, str(err.get("desc", err)), str(err.get("class", "Error")))
            return reply.get("return")

    def _read(self, command: str, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(self.path, command, "no answer in time (QEMU busy, or another QMP client connected)")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise QmpError(self.path, command, f"receive failed: {err.strerror or err}") from err
            if not chunk:
                raise QmpError(self.path, command, "connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise QmpError(self.path, command, f"unparsable message {line[:200]!r}") from err
        if not isinstance(msg, dict):
            raise QmpError(self.path, command, f"unexpected message {line[:200]!r}")
        return msg


def qmp_execute(path: str | os.PathLike[str], command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
    """Connect, run one command, disconnect."""
    with QmpClient(path, timeout=timeout) as q:
        return q.execute(command, arguments, **args)
