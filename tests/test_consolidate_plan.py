"""The compose plan of a new VHD: parts tile the object, obey S3's part sizes, and copy
only unchanged bytes of the previous object."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hotspare.consolidate.plan import MAX_COPY, MIN_PART, plan_vhd
from hotspare.consolidate.sources import BlockSources, Sources
from hotspare.vhd import BLOCK_SIZE, DynamicLayout


@pytest.mark.parametrize("seed", range(25))
def test_parts_tile_the_object_and_copy_only_unchanged_slots(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([64, 512, 4096]) * BLOCK_SIZE + rng.choice([0, 512 * 7])
    nblocks = -(-size // BLOCK_SIZE)
    old = rng.sample(range(nblocks), rng.randrange(0, nblocks // 2 + 1))
    prev = DynamicLayout(size, np.array(old, dtype=np.uint32))
    changed = rng.sample(range(nblocks), rng.randrange(1, min(nblocks, 60)))
    sources = Sources(rows=[], blocks={b: BlockSources(b, [(0, 0, 4096)]) for b in changed}, applied_bytes=0)
    plan = plan_vhd(size, sources, "prev.vhd" if old else None, prev if old else None)
    lay = plan.layout
    at = 0
    for i, w in enumerate(plan.windows):
        assert w.number == i + 1 and w.start == at and w.end > w.start
        at = w.end
        if i < len(plan.windows) - 1:
            assert w.end - w.start >= MIN_PART, "S3 refuses parts under 5 MiB but the last"
        if w.copy:
            assert w.end - w.start <= MAX_COPY
            assert lay.first_block_offset <= w.start and w.end <= plan.previous_footer
            for b in plan.changed:
                s = lay.slot_offset(plan.slot_of[b])
                assert s + lay.slot_size <= w.start or s >= w.end, "a copy part holds a changed slot"
    assert at == lay.file_size
    if old:
        # Changed bytes, not the disk's size, decide what is uploaded.
        assert plan.built_bytes <= lay.first_block_offset + len(changed) * (lay.slot_size + 2 * MIN_PART) + \
            (lay.file_size - plan.previous_footer)
