"""Packs: create-only objects of chunks, each ending with its table of contents.

Layout: the chunks back to back, then the table (``TOC`` rows: digest, offset, length), then
a 32-byte trailer: magic, the table's offset, its row count and the table's xxh3-64. The
index entries hold each chunk's offset, so a reader never needs the table; a check or a
repack reads it instead of an index.
"""

from __future__ import annotations

import secrets
from concurrent.futures import Executor, Future

import numpy as np
import xxhash

from hotspare import layout
from hotspare.errors import InvalidObject
from hotspare.replica.index import PackRef, pack_id
from hotspare.store.base import Store

PACK_TARGET = 32 << 20  # within DESIGN's 16 to 64 MiB when a consolidation writes that much
PACK_MAGIC = b"HSPACK1\0"
TOC = np.dtype([("digest", "S32"), ("offset", "<u8"), ("length", "<u4")])
TRAILER = 32


class PackWriter:
    """Collects chunks into packs of about ``target`` bytes and writes each create-only.

    With an ``uploader``, a full pack is uploaded on it while the caller goes on adding
    chunks; :meth:`wait` returns once every pack is in the store (``written`` names only
    packs that are)."""

    def __init__(self, store: Store, machine: str, disk: str, version: int, *, target: int = PACK_TARGET,
                 uploader: Executor | None = None) -> None:
        self.store, self.machine, self.disk, self.version, self.target = store, machine, disk, version, target
        self.uploader = uploader
        self.written: dict[str, PackRef] = {}
        self.uploaded = 0
        self._pending: list[tuple[Future, str, PackRef]] = []
        self._start()

    def _start(self) -> None:
        self.id = secrets.randbits(63) | 1  # 0 is the zero entry's pack
        self.parts: list[bytes | memoryview] = []
        self.toc: list[tuple[bytes, int, int]] = []
        self.size = 0

    def add(self, digest: bytes, chunk: bytes | memoryview) -> tuple[int, int]:
        """Queue ``chunk``; returns (pack id, offset in the pack)."""
        if self.size + len(chunk) > self.target and self.toc:
            self.flush()
        at = self.size
        self.parts.append(chunk)
        self.toc.append((digest, at, len(chunk)))
        self.size += len(chunk)
        return self.id, at

    def flush(self) -> None:
        if not self.toc:
            return
        toc = np.array(self.toc, dtype=TOC).tobytes()
        trailer = PACK_MAGIC + np.array([self.size, len(self.toc), xxhash.xxh3_64_intdigest(toc)], dtype="<u8").tobytes()
        data = b"".join([*self.parts, toc, trailer])
        key = layout.pack_key(self.machine, self.disk, self.version, self.id)
        ref = PackRef(key=key, size=len(data), chunks=len(self.toc), refs=0)
        if self.uploader is None:
            self.store.put(key, data, create_only=True)
            self._done(pack_id(self.id), ref)
        else:
            self._pending.append((self.uploader.submit(self.store.put, key, data, create_only=True), pack_id(self.id), ref))
        self._start()

    def _done(self, pid: str, ref: PackRef) -> None:
        self.written[pid] = ref
        self.uploaded += ref.size

    def wait(self) -> None:
        """Flush, then wait for every pack's upload (the first failure is raised)."""
        self.flush()
        pending, self._pending = self._pending, []
        for fut, _, _ in pending:
            fut.exception()  # all of them finish before any error propagates
        for fut, pid, ref in pending:
            fut.result()
            self._done(pid, ref)


def read_toc(store: Store, key: str) -> np.ndarray:
    """A pack's table of contents, checked against its trailer."""
    size = store.size(key)
    if size < TRAILER:
        raise InvalidObject(key, f"pack of {size} bytes is shorter than its trailer")
    trailer = store.get_range(key, size - TRAILER, TRAILER)
    if trailer[:8] != PACK_MAGIC:
        raise InvalidObject(key, "not a pack (bad trailer magic)")
    at, count, digest = np.frombuffer(trailer[8:], dtype="<u8").tolist()
    if at + count * TOC.itemsize != size - TRAILER:
        raise InvalidObject(key, f"pack trailer says {count} chunks from byte {at}, which does not fit its {size} bytes")
    toc = store.get_range(key, at, count * TOC.itemsize)
    if xxhash.xxh3_64_intdigest(toc) != digest:
        raise InvalidObject(key, "pack table of contents fails its checksum")
    return np.frombuffer(toc, dtype=TOC)
