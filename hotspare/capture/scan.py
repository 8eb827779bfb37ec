"""The scan tracker: find the blocks of a disk whose content changed since the hash map.

The disk is read sequentially in large chunks into one reused buffer; each block is hashed
with xxh3-64 straight from a memoryview (no copy), and the comparison with the hash map is
one numpy operation per chunk. Only changed blocks are copied out of the buffer. Cost: one
pass over the disk at memory speed, plus one hash call per block (64 KiB by default, never
per sector).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from hotspare.errors import HotspareError
from hotspare.extentlog.schema import zero_checksum

CHUNK = 32 << 20  # bytes read per syscall; large enough for sequential throughput


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


def scan(
    path: str,
    hashes: np.ndarray,
    block_size: int,
    disk_size: int,
    *,
    max_run: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ChunkResult]:
    """Scan ``path`` chunk by chunk, updating ``hashes`` in place to the content read and
    yielding the changed runs of each chunk. ``max_run`` caps one run's length."""
    chunk = max(block_size, CHUNK - CHUNK % block_size)
    buf = bytearray(chunk)
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise HotspareError(f"{path}: cannot open the disk: {err.strerror}") from err
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        while pos < disk_size:
            want = min(chunk, disk_size - pos)
            n = _read_full(fd, mv[:want], pos, path)
            b0 = pos // block_size
            nb = -(-n // block_size)
            new = np.fromiter((h(mv[i:i + block_size]) for i in range(0, n, block_size)),
                              dtype=np.uint64, count=nb)
            changed = np.flatnonzero(new != hashes[b0:b0 + nb])
            hashes[b0:b0 + nb] = new
            yield ChunkResult(end=pos + n, runs=list(_runs(changed, new, mv, n, pos, block_size, max_run)))
            pos += n
            if progress:
                progress(n)
    finally:
        os.close(fd)


def _read_full(fd: int, view: memoryview, pos: int, path: str) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], pos + got)
        if n == 0:
            raise HotspareError(f"{path}: disk ended at {pos + got} bytes, registered size is larger (did it shrink?)")
        got += n
    return got


def _runs(changed: np.ndarray, new: np.ndarray, mv: memoryview, n: int, pos: int,
          block_size: int, max_run: int) -> Iterator[ChangedRun]:
    """Cut the changed blocks into runs: consecutive blocks of one kind (data or zeros),
    at most ``max_run`` bytes each. Vectorised over the blocks; Python per run only."""
    if changed.size == 0:
        return
    tail = n - (len(new) - 1) * block_size
    zero_sum = np.full(len(new), zero_checksum(block_size), dtype=np.uint64)
    zero_sum[-1] = zero_checksum(tail)
    zero = new[changed] == zero_sum[changed]
    for i in np.flatnonzero(zero):  # confirm: a hash match is not proof of zeros
        a = int(changed[i]) * block_size
        if np.frombuffer(mv[a:min(a + block_size, n)], dtype=np.uint8).any():
            zero[i] = False
    brk = (np.diff(changed) != 1) | (np.diff(zero) != 0)
    starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
    ends = np.concatenate((starts[1:], [len(changed)]))
    per_run = max(1, max_run // block_size)
    for s, e in zip(starts.tolist(), ends.tolist()):
        for a in range(s, e, per_run):
            b = min(a + per_run, e)
            off = int(changed[a]) * block_size
            end = min((int(changed[b - 1]) + 1) * block_size, n)
            yield ChangedRun(offset=pos + off, length=end - off,
                             data=None if zero[a] else bytes(mv[off:end]))
