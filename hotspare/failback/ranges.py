"""Byte ranges of a disk: an (n, 2) int64 array of sorted, disjoint ``[start, end)`` pairs.

This is what failback moves. Unions are vectorised (sort by start, merge with a running
maximum of the ends), so planning costs follow the number of extents, not the disk size.
"""

from __future__ import annotations

import numpy as np

Ranges = np.ndarray

EMPTY = np.zeros((0, 2), dtype=np.int64)


def union(*parts: Ranges) -> Ranges:
    """The union of ranges (any order, overlapping or touching), merged."""
    a = np.concatenate([p.reshape(-1, 2) for p in parts] or [EMPTY]).astype(np.int64)
    a = a[a[:, 1] > a[:, 0]]
    if not len(a):
        return EMPTY.copy()
    a = a[np.argsort(a[:, 0], kind="stable")]
    ends = np.maximum.accumulate(a[:, 1])
    starts_group = np.empty(len(a), dtype=bool)
    starts_group[0] = True
    starts_group[1:] = a[1:, 0] > ends[:-1]
    last_of_group = np.append(starts_group[1:], True)
    return np.stack([a[starts_group, 0], ends[last_of_group]], axis=1)


def from_extents(offsets: np.ndarray, lengths: np.ndarray) -> Ranges:
    offsets = np.asarray(offsets, dtype=np.int64)
    return union(np.stack([offsets, offsets + np.asarray(lengths, dtype=np.int64)], axis=1))


def from_blocks(blocks: np.ndarray, block_size: int, disk_size: int) -> Ranges:
    """The byte ranges of block indices (the last block is clipped to the disk's end)."""
    b = np.asarray(blocks, dtype=np.int64)
    return union(np.stack([b * block_size, np.minimum((b + 1) * block_size, disk_size)], axis=1))


def total(r: Ranges) -> int:
    return int((r[:, 1] - r[:, 0]).sum()) if len(r) else 0


def blocks(r: Ranges, block_size: int) -> int:
    """How many ``block_size`` blocks the ranges touch (a block two ranges share counts once)."""
    if not len(r):
        return 0
    first, last = r[:, 0] // block_size, (r[:, 1] - 1) // block_size
    return int((last - first + 1).sum() - (first[1:] == last[:-1]).sum())


def pieces(r: Ranges, max_len: int):
    """(offset, length) pieces of at most ``max_len`` bytes covering ``r``, in order."""
    for start, end in r.tolist():
        for off in range(start, end, max_len):
            yield off, min(max_len, end - off)
