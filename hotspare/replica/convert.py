"""Converting a disk whose points are VHD objects (the layout before chunks): the first
consolidation reads the current point's VHD once and makes it, plus any newer logs, the
first chunked point. Older VHD points go with their objects; their logs are folded."""

from __future__ import annotations

import numpy as np

from hotspare.consolidate.damage import DamagedVhd
from hotspare.consolidate.sources import KEEP, BlockSources
from hotspare.errors import HotspareError, NotFound
from hotspare.extentlog.schema import SECTOR
from hotspare.store.base import Store
from hotspare.vhd import VhdReader


def _open(store: Store, key: str):
    try:
        f = store.open(key, buffer_size=4 << 20)
        return f, VhdReader(f, key)
    except NotFound:
        raise DamagedVhd(key, "missing from the store: the store cannot be converted to chunks from it") from None
    except HotspareError as err:
        if getattr(err, "transient", False):
            raise
        raise DamagedVhd(key, getattr(err, "reason", None) or str(err)) from err


def legacy_blocks(store: Store, build) -> None:
    """Mark every block the VHD holds data for as changed (kept from the VHD), so the build
    stores all of them."""
    f, vhd = _open(store, build.legacy_vhd)
    with f:
        per = vhd.block_size // build.chunk_size
        chunks = -(-build.disk_size // build.chunk_size)
        starts = vhd.allocated_blocks().astype(np.int64) * per
    spb = build.chunk_size // SECTOR
    for b in (starts[:, None] + np.arange(per)).ravel().tolist():
        if b < chunks and b not in build.sources.blocks:
            build.sources.blocks[b] = BlockSources(b, [(KEEP, 0, spb)])


def read_legacy(store: Store, key: str, blocks: list[int], chunk_size: int, disk_size: int) -> dict[int, bytes]:
    """The content of ``blocks`` in the VHD object ``key``, one read per run of adjacent blocks."""
    f, vhd = _open(store, key)
    out: dict[int, bytes] = {}
    with f:
        blocks = sorted(blocks)
        i = 0
        while i < len(blocks):
            j = i
            while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j - i < 255:
                j += 1
            lo = blocks[i] * chunk_size
            hi = min((blocks[j] + 1) * chunk_size, disk_size)
            data = vhd.read(lo, hi - lo)
            for b in blocks[i:j + 1]:
                out[b] = data[b * chunk_size - lo:(b + 1) * chunk_size - lo]
            i = j + 1
    return out
