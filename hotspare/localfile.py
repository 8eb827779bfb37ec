"""Small state files on the local machine (agent state, VM handles, capture cursors):
replaced atomically, read back validated, and locked between processes.

A write goes to a temporary file that is fsynced, renamed over the old one, and the
directory fsynced: a crash at any point leaves the old or the new file whole.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from hotspare.errors import HotspareError

M = TypeVar("M", bound=BaseModel)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and threads: each call opens its own fd)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_model(path: Path, model: type[M], what: str, hint: str = "") -> M | None:
    """``path`` read as ``model``; None when it does not exist; a clear error when it is
    unreadable or invalid."""
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as err:
        raise HotspareError(f"{path}: unreadable {what} ({err}){'; ' + hint if hint else ''}") from err
