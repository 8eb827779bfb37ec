"""Replay accepted extent logs onto a raw image: the reference way to materialise what the
catalog says a disk holds, used to check replicas and to apply logs to a machine's disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hotspare.catalog import Catalog, catalog_logs
from hotspare.extentlog import iter_extents
from hotspare.store.base import Store


def write_extents(f: BinaryIO, key: str, fd: int, after_first: Callable[[], None] | None = None) -> int:
    """Write the extents of the log in ``f`` into the open file ``fd`` in seq order; returns
    bytes written. ``after_first`` runs once after the first extent (a crash point)."""
    written = 0
    for offsets, lengths, data in iter_extents(f, key):
        for off, length, d in zip(offsets.tolist(), lengths.tolist(), data):
            buf = d.as_buffer()
            os.pwrite(fd, bytes(length) if buf is None else memoryview(buf), off)
            if not written and after_first:
                after_first()
            written += length
    return written


def apply_log(store: Store, key: str, fd: int) -> int:
    """Write one stored log's extents into the open file ``fd``; returns bytes written."""
    with store.open(key) as f:
        return write_extents(f, key, fd)


def apply_logs(store: Store, keys: list[str], fd: int) -> int:
    """Apply ``keys`` in the order given (seq order) to the open file ``fd``; returns bytes written."""
    return sum(apply_log(store, key, fd) for key in keys)


def replay_catalog(store: Store, catalog: Catalog, out: Path, *, epochs: list[int] | None = None) -> int:
    """Materialise ``catalog``'s accepted logs over zeros into ``out``; returns bytes applied."""
    with open(out, "wb") as f:
        f.truncate(catalog.disk_size)
    fd = os.open(out, os.O_WRONLY)
    try:
        logs = catalog_logs(store, catalog)
        total = apply_logs(store, [lg.key for lg in logs if epochs is None or lg.epoch in epochs], fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return total
