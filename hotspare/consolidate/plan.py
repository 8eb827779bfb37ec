"""The layout of the new VHD object and the parts of its compose.

The new dynamic VHD keeps every block the previous one allocated in the same slot (slot k
sits at the same file offset in both), and appends the newly allocated blocks after them.
So every byte of the previous object that did not change sits at the same offset in the
new one, and a window of the new object that holds no changed slot is a server-side copy
of the previous object's same range. Only windows with a changed slot, the head (footer
copy, header, BAT) and the appended tail are built and uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hotspare.consolidate.sources import BlockSources, Sources
from hotspare.errors import HotspareError
from hotspare.vhd import DynamicLayout, VhdReader

MIN_PART = 5 << 20  # S3's smallest part (but the last)
MAX_DATA = 32 << 20  # a data part built in memory at once
MAX_PARTS = 10_000  # S3's limit
MAX_COPY = 5 << 30  # S3's largest part


@dataclass
class Window:
    number: int  # part number, 1-based
    start: int
    end: int
    copy: bool  # True: copy [start, end) of the previous object


@dataclass
class VhdPlan:
    size: int
    previous: str | None  # key of the previous VHD object
    previous_footer: int  # where the previous object's slots end (0 when none)
    layout: DynamicLayout
    slot_of: dict[int, int]  # block index -> slot number in the new object
    changed: dict[int, BlockSources]  # blocks rebuilt (old slots) or added (new slots)
    windows: list[Window] = field(default_factory=list)

    @property
    def copied_bytes(self) -> int:
        return sum(w.end - w.start for w in self.windows if w.copy)

    @property
    def built_bytes(self) -> int:
        return sum(w.end - w.start for w in self.windows if not w.copy)


def previous_layout(reader: VhdReader, name: str) -> DynamicLayout:
    """The layout of a VHD hotspare wrote: slots packed from the first block offset, in
    BAT-sector order. Anything else is refused (a VHD from elsewhere is converted on import)."""
    if reader.kind != "dynamic" or reader.bat is None:
        raise HotspareError(f"{name}: not a dynamic VHD; consolidation builds on hotspare's own VHDs")
    blocks = reader.allocated_blocks()
    order = blocks[np.argsort(reader.bat[blocks])]
    layout = DynamicLayout(reader.size, order)
    if not np.array_equal(layout.bat(), reader.bat):
        raise HotspareError(f"{name}: block slots are not packed as hotspare writes them")
    return layout


def plan_vhd(size: int, sources: Sources, previous: str | None, previous_layout_: DynamicLayout | None) -> VhdPlan:
    old_order = previous_layout_.allocated if previous_layout_ is not None else np.zeros(0, np.uint32)
    old_slot = {int(b): k for k, b in enumerate(old_order.tolist())}
    # Blocks not allocated before and whose final content is zeros stay unallocated.
    new_blocks = sorted(b for b, src in sources.blocks.items() if b not in old_slot and not src.all_zero)
    layout = DynamicLayout(size, np.concatenate([old_order, np.array(new_blocks, dtype=np.uint32)]))
    slot_of = {**old_slot, **{b: len(old_order) + i for i, b in enumerate(new_blocks)}}
    changed = {b: src for b, src in sources.blocks.items() if b in slot_of}
    prev_footer = layout.slot_offset(len(old_order)) if previous is not None else 0
    plan = VhdPlan(size=size, previous=previous, previous_footer=prev_footer, layout=layout, slot_of=slot_of,
                   changed=changed)
    plan.windows = _windows(plan)
    return plan


def _windows(plan: VhdPlan) -> list[Window]:
    """Cut the new object into parts: changed stretches (head, rebuilt slots, appended
    tail) become data parts of at least MIN_PART, grown into their unchanged neighbours
    only as far as S3's part minimum needs; unchanged stretches between them become copy
    parts. Uploads then follow the changed slots, not a fixed grid."""
    lay = plan.layout
    total = lay.file_size
    dirty: list[list[int]] = [[0, lay.first_block_offset]]
    tail = plan.previous_footer if plan.previous else lay.first_block_offset
    for b in sorted(plan.changed, key=lambda b: plan.slot_of[b]):
        start = lay.slot_offset(plan.slot_of[b])
        if start < tail:
            dirty.append([start, start + lay.slot_size])
    dirty.append([tail, total])
    merged: list[list[int]] = []
    for a, b in sorted(dirty):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    # Absorb clean gaps too small to be a copy part, then grow short data stretches.
    spans: list[list[int]] = []
    for a, b in merged:
        if spans and a - spans[-1][1] < MIN_PART:
            spans[-1][1] = b
        else:
            spans.append([a, b])
    for i, span in enumerate(spans):
        if span[1] - span[0] >= MIN_PART or span[1] == total:
            continue
        nxt = spans[i + 1][0] if i + 1 < len(spans) else total
        need = MIN_PART - (span[1] - span[0])
        # Every gap is at least MIN_PART now: take what is needed, or the whole gap when
        # the rest would be too short to copy (the span then joins the next one).
        span[1] += need if nxt - span[1] - need >= MIN_PART else nxt - span[1]
    spans = _merge_touching(spans)
    windows: list[Window] = []
    at = 0
    for a, b in spans:
        if a > at:
            _add(windows, at, a, copy=True, limit=MAX_COPY)
        _add(windows, a, b, copy=False, limit=MAX_DATA)
        at = b
    if len(windows) > MAX_PARTS:
        raise HotspareError(f"{plan.previous}: {len(windows)} parts needed, S3 allows {MAX_PARTS}")
    return windows


def _merge_touching(spans: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _add(windows: list[Window], a: int, b: int, *, copy: bool, limit: int) -> None:
    """Append [a, b) as parts of at most ``limit`` bytes, split evenly (each >= MIN_PART)."""
    count = max(1, -(-(b - a) // limit))
    for i in range(count):
        start = a + (b - a) * i // count
        end = a + (b - a) * (i + 1) // count
        windows.append(Window(len(windows) + 1, start, end, copy=copy))
