"""Building the changed parts of a new VHD object.

A part job carries everything a worker needs (no shared state), so mapped tasks can run on
any worker of a Dask or Ray task runner: the windows to build, the layout, the source runs
of the changed blocks in those windows and where their rows live. It reads the previous
VHD only for slots it keeps and blocks partly rewritten (in one ranged read per run of
adjacent slots, at the offsets the plan gives: the object is not re-opened as a VHD), and each
needed row group of a log once.
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from hotspare.consolidate.plan import VhdPlan, Window
from hotspare.consolidate.sources import (
    KEEP,
    ZERO,
    BlockSources,
    RowRef,
    Sources,
    open_accepted,
)
from hotspare.errors import HotspareError
from hotspare.extentlog.reader import check_rows, read_row_group
from hotspare.extentlog.schema import SECTOR
from hotspare.store.base import PartReceipt, Store
from hotspare.vhd import BLOCK_SIZE, DynamicLayout, sector_bitmap_bytes


@dataclass
class PartJob:
    key: str  # the new VHD object
    token: str  # its staged compose
    size: int
    allocated: np.ndarray
    previous: str | None
    unique_id: uuid.UUID
    timestamp: datetime
    windows: list[Window]
    blocks: dict[int, BlockSources]  # changed blocks within these windows
    rows: dict[int, RowRef] = field(default_factory=dict)  # owner id -> row
    previous_footer: int = 0  # where the previous object's slots end: slots before it exist there

    @property
    def bytes(self) -> int:
        return sum(w.end - w.start for w in self.windows)


def part_jobs(plan: VhdPlan, sources: Sources, key: str, token: str, unique_id: uuid.UUID, timestamp: datetime,
              batch_bytes: int = 64 << 20) -> list[PartJob]:
    """The changed windows, grouped into jobs of about ``batch_bytes``."""
    lay = plan.layout
    jobs: list[PartJob] = []
    for w in (w for w in plan.windows if not w.copy):
        if not jobs or jobs[-1].bytes + (w.end - w.start) > batch_bytes:
            jobs.append(PartJob(key, token, plan.size, lay.allocated, plan.previous, unique_id, timestamp, [], {},
                                previous_footer=plan.previous_footer))
        job = jobs[-1]
        job.windows.append(w)
        for k in _slots_in(lay, w.start, w.end):
            b = int(lay.allocated[k])
            src = plan.changed.get(b)
            if src is not None:
                job.blocks[b] = src
                for o in src.owners:
                    job.rows[o] = sources.rows[o]
    return jobs


def _slots_in(lay: DynamicLayout, a: int, b: int) -> range:
    n = len(lay.allocated)
    if n == 0 or b <= lay.first_block_offset or a >= lay.footer_offset:
        return range(0)
    first = max(0, (a - lay.first_block_offset) // lay.slot_size)
    last = min(n - 1, (b - 1 - lay.first_block_offset) // lay.slot_size)
    return range(first, last + 1)


class _Rows:
    """Row data, read one (log, row group) data column at a time and kept for the job. Each
    row group's checksums are verified when it is read (InvalidLog naming the log and row)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[tuple[str, int], object] = {}

    def data(self, ref: RowRef) -> memoryview:
        k = (ref.log, ref.row_group)
        col = self.cache.get(k)
        if col is None:
            with open_accepted(self.store, ref.log) as f:
                t, row0 = read_row_group(f, ref.log, ref.row_group, ["length", "data", "checksum"])
            col = t.column("data")
            check_rows(ref.log, row0, t.column("length").to_numpy(), col, t.column("checksum").to_numpy())
            self.cache[k] = col
        buf = col[ref.row].as_buffer()  # type: ignore[index]
        if buf is None:
            raise HotspareError(f"{ref.log}: row {ref.row} of row group {ref.row_group} has no data but a data checksum")
        return memoryview(buf)


class _Previous:
    """Byte ranges of the previous VHD object, each run of adjacent or overlapping ranges
    fetched with one ranged read."""

    def __init__(self, store: Store, key: str | None, ranges: list[tuple[int, int]]) -> None:
        self.starts: list[int] = []
        self.pieces: list[bytes] = []
        for lo, hi in _merged(ranges):
            assert key is not None, "a slot kept from the previous object implies a previous VHD"
            data = store.get_range(key, lo, hi - lo)
            if len(data) != hi - lo:
                raise HotspareError(f"{key}: ended at {lo + len(data)}, expected {hi}")
            self.starts.append(lo)
            self.pieces.append(data)

    def view(self, lo: int, hi: int) -> memoryview:
        i = bisect_right(self.starts, lo) - 1
        at = self.starts[i]
        assert i >= 0 and hi <= at + len(self.pieces[i]), f"bytes {lo}..{hi} of the previous VHD were not fetched"
        return memoryview(self.pieces[i])[lo - at:hi - at]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _block_data(slot: memoryview, bitmap_size: int) -> memoryview:
    """A slot's block as a VHD reader sees it: sectors whose bitmap bit is clear read as zeros
    (hotspare sets every bit, so this is normally the data as stored)."""
    bitmap, data = slot[:bitmap_size], slot[bitmap_size:]
    if bytes(bitmap).count(0xFF) == bitmap_size:
        return data
    keep = np.repeat(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8)).astype(bool), SECTOR)[:len(data)]
    out = np.frombuffer(data, dtype=np.uint8).copy()
    out[~keep] = 0
    return memoryview(out)


def build_block(src: BlockSources, old: memoryview | None, rows: dict[int, RowRef], reader: _Rows) -> bytearray:
    """The final bytes of a changed block; ``old``: its previous content (None: zeros)."""
    data = bytearray(BLOCK_SIZE)
    if src.needs_previous and old is not None:
        data[: len(old)] = old
    base = src.index * BLOCK_SIZE
    for owner, s0, n in src.runs:
        a, b = s0 * SECTOR, (s0 + n) * SECTOR
        if owner == ZERO:
            data[a:b] = bytes(b - a)
        elif owner != KEEP:
            ref = rows[owner]
            at = base + a - ref.offset
            data[a:b] = reader.data(ref)[at:at + (b - a)]
    return data


def run_job(store: Store, job: PartJob) -> list[PartReceipt]:
    """Build and upload every window of ``job``; returns the part receipts."""
    lay = DynamicLayout(job.size, job.allocated)
    reader = _Rows(store)
    head = lay.head_bytes(job.unique_id, job.timestamp)
    tail = lay.tail_bytes(job.unique_id, job.timestamp)
    bitmap = sector_bitmap_bytes()
    prev_end = job.previous_footer if job.previous else 0
    receipts = []
    for w in job.windows:
        buf = bytearray(w.end - w.start)

        def put(at: int, data: bytes | bytearray | memoryview) -> None:
            lo, hi = max(at, w.start), min(at + len(data), w.end)
            if lo < hi:
                buf[lo - w.start:hi - w.start] = memoryview(data)[lo - at:hi - at]

        put(0, head)
        put(lay.footer_offset, tail)
        slots = []  # (slot start, its changed block's sources or None: kept as it was)
        need: list[tuple[int, int]] = []  # bytes of the previous object this window uses
        for k in _slots_in(lay, w.start, w.end):
            start = lay.slot_offset(k)
            src = job.blocks.get(int(lay.allocated[k]))
            slots.append((start, src))
            if src is None:
                need.append((max(start, w.start), min(start + lay.slot_size, w.end)))
            elif src.needs_previous and start < prev_end:
                need.append((start, start + lay.slot_size))  # the whole slot: its block may straddle windows
        previous = _Previous(store, job.previous, need)
        for start, src in slots:
            if src is None:
                lo, hi = max(start, w.start), min(start + lay.slot_size, w.end)
                buf[lo - w.start:hi - w.start] = previous.view(lo, hi)
                continue
            old = None
            if src.needs_previous and start < prev_end:
                old = _block_data(previous.view(start, start + lay.slot_size), lay.bitmap_size)
            put(start, bitmap)
            put(start + lay.bitmap_size, build_block(src, old, job.rows, reader))
        del previous
        receipts.append(store.compose_part(job.key, job.token, w.number, w.start, [buf]))
    return receipts
