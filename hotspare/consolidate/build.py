"""Building the changed parts of a new VHD object.

A part job carries everything a worker needs (no shared state), so mapped tasks can run on
any worker of a Dask or Ray task runner: the windows to build, the layout, the source runs
of the changed blocks in those windows and where their rows live. It reads the previous
VHD only for slots it keeps and blocks partly rewritten, and each needed row group of a log
once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow.parquet as pq

from hotspare.consolidate.plan import VhdPlan, Window
from hotspare.consolidate.sources import KEEP, ZERO, BlockSources, RowRef, Sources
from hotspare.errors import HotspareError
from hotspare.extentlog.schema import SECTOR
from hotspare.store.base import PartReceipt, Store
from hotspare.vhd import BLOCK_SIZE, DynamicLayout, VhdReader, sector_bitmap_bytes


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
            jobs.append(PartJob(key, token, plan.size, lay.allocated, plan.previous, unique_id, timestamp, [], {}))
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
    """Row data, read one (log, row group) data column at a time and kept for the job."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[tuple[str, int], object] = {}

    def data(self, ref: RowRef) -> memoryview:
        k = (ref.log, ref.row_group)
        col = self.cache.get(k)
        if col is None:
            with self.store.open(ref.log) as f:
                col = pq.ParquetFile(f).read_row_group(ref.row_group, columns=["data"]).column("data")
            self.cache[k] = col
        buf = col[ref.row].as_buffer()  # type: ignore[index]
        if buf is None:
            raise HotspareError(f"{ref.log}: row {ref.row} of row group {ref.row_group} has no data but a data checksum")
        return memoryview(buf)


def build_block(src: BlockSources, previous: VhdReader | None, rows: dict[int, RowRef], reader: _Rows) -> bytearray:
    data = bytearray(BLOCK_SIZE)
    if src.needs_previous and previous is not None:
        old = previous.read(src.index * BLOCK_SIZE, BLOCK_SIZE)
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
    previous = VhdReader(store.open(job.previous), job.previous) if job.previous else None
    reader = _Rows(store)
    head = lay.head_bytes(job.unique_id, job.timestamp)
    tail = lay.tail_bytes(job.unique_id, job.timestamp)
    bitmap = sector_bitmap_bytes()
    receipts = []
    try:
        for w in job.windows:
            buf = bytearray(w.end - w.start)

            def put(at: int, data: bytes | bytearray | memoryview) -> None:
                lo, hi = max(at, w.start), min(at + len(data), w.end)
                if lo < hi:
                    buf[lo - w.start:hi - w.start] = memoryview(data)[lo - at:hi - at]

            put(0, head)
            put(lay.footer_offset, tail)
            kept: list[tuple[int, int]] = []  # slot byte ranges copied from the previous object
            for k in _slots_in(lay, w.start, w.end):
                b = int(lay.allocated[k])
                start = lay.slot_offset(k)
                src = job.blocks.get(b)
                if src is None:
                    lo, hi = max(start, w.start), min(start + lay.slot_size, w.end)
                    if kept and kept[-1][1] == lo:
                        kept[-1] = (kept[-1][0], hi)
                    else:
                        kept.append((lo, hi))
                    continue
                put(start, bitmap)
                put(start + lay.bitmap_size, build_block(src, previous, job.rows, reader))
            for lo, hi in kept:
                assert job.previous is not None, "a kept slot implies a previous VHD"
                old = store.get_range(job.previous, lo, hi - lo)
                if len(old) != hi - lo:
                    raise HotspareError(f"{job.previous}: ended at {lo + len(old)}, expected {hi}")
                buf[lo - w.start:hi - w.start] = old
            receipts.append(store.compose_part(job.key, job.token, w.number, w.start, [buf]))
    finally:
        if previous is not None:
            previous.close()
    return receipts
