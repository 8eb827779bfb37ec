"""The scan tracker: find the blocks of a disk whose content changed since the hash map.

The disk is read sequentially into one small reused buffer (1 MiB by default), and each
block is hashed with xxh3-64 straight from a memoryview (no copy) right after its read, while
the buffer is still in the CPU cache: the disk's bytes cross main memory once, as in
``xxhsum``. (Reading into a large buffer instead costs two more passes over memory, the
write of the buffer and the read back for hashing, and runs at half the speed.) Only changed
blocks are copied out of the buffer. Results are reported per chunk of 32 MiB: the hash
map is updated and the changed runs are cut once per chunk. Cost: one pass over the disk
at memory speed, plus one hash call per block (64 KiB by default, never per sector).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import xxhash

from hotspare.errors import HotspareError
from hotspare.extentlog.schema import zero_checksum

READ = 1 << 20  # bytes per read: small enough to stay in the CPU cache until hashed
CHUNK = 32 << 20  # bytes per ChunkResult: the unit of hash-map updates and of log cuts


@dataclass
class ChangedRun:
    """Consecutive changed blocks of the same kind: data, or all zeros (``data`` None)."""

    offset: int
    length: int
    data: bytes | None


@dataclass
class ChunkResult:
    end: int  # byte offset where this chunk ends: blocks before it are hashed
    runs: list[ChangedRun]


class Readable(Protocol):
    def readinto(self, buf: memoryview, offset: int) -> int: ...


# A view of a disk: a file's path, or a reader of an NBD export.
ViewSource = Union[str, "os.PathLike[str]", Readable]


def scan(
    path: ViewSource,
    hashes: np.ndarray,
    block_size: int,
    disk_size: int,
    *,
    max_run: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ChunkResult]:
    """Scan ``path`` chunk by chunk, updating ``hashes`` in place to the content read and
    yielding the changed runs of each chunk. ``max_run`` caps one run's length."""
    read = max(block_size, READ - READ % block_size)
    chunk = max(read, CHUNK - CHUNK % read)
    buf = bytearray(read)
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    reader = None if isinstance(path, (str, os.PathLike)) else path
    try:
        fd = os.open(path, os.O_RDONLY) if reader is None else -1
    except OSError as err:
        raise HotspareError(f"{path}: cannot open the disk: {err.strerror}") from err
    try:
        if reader is None:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        while pos < disk_size:
            end = min(pos + chunk, disk_size)
            b0 = pos // block_size
            old = hashes[b0:b0 + -(-(end - pos) // block_size)].tolist()
            new: list[int] = []
            changed: dict[int, bytes | None] = {}  # block index in the chunk -> data, None for zeros
            p = pos
            while p < end:
                part_view = mv if end - p >= read else mv[:end - p]
                n = _read_full(fd, part_view, p, path) if reader is None else reader.readinto(part_view, p)
                v = mv if n == read else mv[:n]
                k = len(new)
                part = [h(v[i:i + block_size]) for i in range(0, n, block_size)]
                new += part
                if part != old[k:k + len(part)]:
                    for j, x in enumerate(part):
                        if x != old[k + j]:
                            blk = v[j * block_size:(j + 1) * block_size]
                            changed[k + j] = None if _is_zero(blk, x) else bytes(blk)
                p += n
            hashes[b0:b0 + len(new)] = new
            yield ChunkResult(end=end, runs=list(_runs(changed, pos, end, block_size, max_run)))
            if progress:
                progress(end - pos)
            pos = end
    finally:
        if reader is None:
            os.close(fd)


def _read_full(fd: int, view: memoryview, pos: int, path: str) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise HotspareError(f"{path}: disk ended at {pos + got} bytes, registered size is larger (did it shrink?)")
        got += n
    return got


def _is_zero(block: memoryview, digest: int) -> bool:
    """All zeros: the hash says so, and the bytes confirm (a hash match is not proof)."""
    return digest == zero_checksum(len(block)) and not np.frombuffer(block, dtype=np.uint8).any()


def _runs(changed: dict[int, bytes | None], pos: int, end: int, block_size: int,
          max_run: int) -> Iterator[ChangedRun]:
    """Cut the changed blocks of a chunk (in order) into runs: consecutive blocks of one
    kind (data or zeros), at most ``max_run`` bytes each. Python per changed block."""
    per_run = max(1, max_run // block_size)
    first = prev = -2
    parts: list[bytes | None] = []

    def run() -> ChangedRun:
        off = pos + first * block_size
        length = min(pos + (prev + 1) * block_size, end) - off
        return ChangedRun(offset=off, length=length, data=None if parts[0] is None else b"".join(parts))  # type: ignore[arg-type]

    for i, data in changed.items():
        if parts and (i != prev + 1 or (data is None) != (parts[0] is None) or len(parts) == per_run):
            yield run()
            parts = []
        if not parts:
            first = i
        parts.append(data)
        prev = i
    if parts:
        yield run()
