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
from hotspare.vhd.spec import SECTOR_SIZE

MIN_WINDOW = 8 << 20  # S3's 5 MiB part minimum, with room to spare
MAX_PARTS = 9000  # S3 allows 10,000
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
    lay = plan.layout
    total = lay.file_size
    w = max(MIN_WINDOW, -(-total // MAX_PARTS))
    w = -(-w // SECTOR_SIZE) * SECTOR_SIZE
    count = max(1, total // w)
    dirty = np.zeros(count, dtype=bool)

    def mark(a: int, b: int) -> None:  # bytes [a, b) change
        dirty[min(a // w, count - 1): min((b - 1) // w, count - 1) + 1] = True

    mark(0, lay.first_block_offset)  # head: footer copy, header, BAT
    mark(plan.previous_footer if plan.previous else lay.first_block_offset, total)  # appended slots + footer
    for b in plan.changed:
        start = lay.slot_offset(plan.slot_of[b])
        mark(start, start + lay.slot_size)
    windows: list[Window] = []
    for i in range(count):
        start, end = i * w, (total if i == count - 1 else (i + 1) * w)
        prev = windows[-1] if windows else None
        if not dirty[i] and prev is not None and prev.copy and end - prev.start <= MAX_COPY:
            prev.end = end  # adjacent clean windows: one larger server-side copy
        else:
            windows.append(Window(len(windows) + 1, start, end, copy=not dirty[i]))
    return windows
