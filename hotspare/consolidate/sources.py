"""Which log row supplies the final bytes of each sector of the changed blocks.

Reads only the seq, offset, length and checksum columns of the logs (a few bytes per
extent), never their data. A later extent supersedes an earlier one over the sectors they
share; sectors whose final writer wrote zeros (null data, or data whose checksum is that of
zeros) need no download at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

import numpy as np

from hotspare.errors import HotspareError, InvalidLog, NotFound
from hotspare.extentlog.reader import check_rows, open_parquet, read_row_group
from hotspare.extentlog.schema import SECTOR, zero_checksum
from hotspare.store.base import Store
from hotspare.vhd import BLOCK_SIZE

SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR
ZERO = -1  # owner id of sectors whose final content is zeros
KEEP = -2  # owner id of sectors that keep the previous VHD's content


@dataclass
class RowRef:
    """Where one extent's data lives: log, row group, row within the group, disk offset."""

    log: str
    row_group: int
    row: int
    offset: int


@dataclass
class BlockSources:
    """The final content of one changed 2 MiB block, as runs of sectors.

    ``runs`` holds (owner, first sector in block, sector count); owner is an index into
    the plan's rows, ZERO, or KEEP (the previous content)."""

    index: int
    runs: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def needs_previous(self) -> bool:
        return any(o == KEEP for o, _, _ in self.runs)

    @property
    def all_zero(self) -> bool:
        return all(o == ZERO for o, _, _ in self.runs)

    @property
    def owners(self) -> set[int]:
        return {o for o, _, _ in self.runs if o >= 0}


@dataclass
class Sources:
    rows: list[RowRef]
    blocks: dict[int, BlockSources]
    applied_bytes: int  # bytes the extents cover, superseded ones included


def read_extent_columns(store: Store, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offset, length, is_zero, row_group, row_in_group) of every row of a log, in seq
    order, from its metadata columns only."""
    # A small buffer: these columns are a few bytes per extent, and each ranged read would
    # otherwise fetch 8 MiB of the log's data with them.
    with open_accepted(store, key, buffer_size=256 << 10) as f:
        pf = open_parquet(f, key)
        offs, lens, zero, rgs, rows = [], [], [], [], []
        for g in range(pf.num_row_groups):
            t, _ = read_row_group(pf, key, g, ["offset", "length", "checksum"])
            length = t.column("length").to_numpy().astype(np.int64)
            sums = t.column("checksum").to_numpy()
            # Null data and data of zeros share the zero checksum; either way no download.
            zero_sums = np.array([zero_checksum(n) for n in length.tolist()], dtype=np.uint64)
            offs.append(t.column("offset").to_numpy().astype(np.int64))
            lens.append(length)
            zero.append(sums == zero_sums)
            rgs.append(np.full(len(length), g, dtype=np.int32))
            rows.append(np.arange(len(length), dtype=np.int32))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return cat(offs, np.int64), cat(lens, np.int64), cat(zero, bool), cat(rgs, np.int32), cat(rows, np.int32)


def open_accepted(store: Store, key: str, buffer_size: int = 8 << 20):
    """An accepted log opened for reading; InvalidLog when it is gone from the store (it was
    accepted, so it is damage, handled like any damaged log)."""
    try:
        return store.open(key, buffer_size=buffer_size)
    except NotFound:
        raise InvalidLog(key, "missing from the store (deleted after it was accepted)") from None


def compute_sources(store: Store, log_keys: list[str], disk_size: int, block_size: int = BLOCK_SIZE) -> Sources:
    """The source runs of every ``block_size`` block the logs (given in seq order) touch."""
    spb = block_size // SECTOR
    rows: list[RowRef] = []
    per_block: dict[int, list[tuple[int, int, int]]] = {}  # block -> [(owner, s0, s1)] in seq order
    applied = 0
    for key in log_keys:
        offset, length, zero, rg, row = read_extent_columns(store, key)
        applied += int(length.sum())
        base = len(rows)
        rows += [RowRef(key, int(g), int(r), int(o)) for g, r, o in zip(rg.tolist(), row.tolist(), offset.tolist())]
        first = offset // SECTOR
        last = (offset + length) // SECTOR  # exclusive
        for i, (s0, s1, z) in enumerate(zip(first.tolist(), last.tolist(), zero.tolist())):
            owner = ZERO if z else base + i
            b0, b1 = s0 // spb, (s1 - 1) // spb
            for b in range(b0, b1 + 1):
                lo = max(s0, b * spb) - b * spb
                hi = min(s1, (b + 1) * spb) - b * spb
                per_block.setdefault(b, []).append((owner, lo, hi))
    blocks = {}
    owner_map = np.empty(spb, dtype=np.int64)
    for b, writes in per_block.items():
        owner_map.fill(KEEP)
        for owner, lo, hi in writes:  # in seq order: later writes win
            owner_map[lo:hi] = owner
        # Sectors past the disk's end (last, partial block) read as zeros.
        end = (disk_size - b * block_size) // SECTOR
        if end < spb:
            owner_map[end:] = ZERO
        cuts = np.flatnonzero(np.diff(owner_map)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [spb]))
        blocks[b] = BlockSources(b, [(int(owner_map[s]), int(s), int(e - s)) for s, e in zip(starts, ends)])
    return Sources(rows=rows, blocks=blocks, applied_bytes=applied)


class RowData:
    """Row data, read one (log, row group) data column at a time and kept while this object
    lives. Each row group's checksums are verified when it is read (InvalidLog naming the
    log and row). :meth:`prefetch` starts the reads of the row groups a job will use on a
    thread pool, so their downloads overlap."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _load(self, log: str, row_group: int):
        with open_accepted(self.store, log) as f:
            t, row0 = read_row_group(f, log, row_group, ["length", "data", "checksum"])
        col = t.column("data")
        check_rows(log, row0, t.column("length").to_numpy(), col, t.column("checksum").to_numpy())
        with self._lock:
            self.bytes_read += col.nbytes
        return col

    def prefetch(self, pool: Executor, refs: Iterable[RowRef]) -> None:
        for k in {(r.log, r.row_group) for r in refs}:
            if k not in self.cache:
                self.cache[k] = pool.submit(self._load, *k)

    def data(self, ref: RowRef) -> memoryview:
        k = (ref.log, ref.row_group)
        fut = self.cache.get(k)
        if fut is None:
            fut = self.cache[k] = Future()
            try:
                fut.set_result(self._load(*k))
            except BaseException as err:
                fut.set_exception(err)
        col = fut.result()
        buf = col[ref.row].as_buffer()
        if buf is None:
            raise HotspareError(f"{ref.log}: row {ref.row} of row group {ref.row_group} has no data but a data checksum")
        return memoryview(buf)
