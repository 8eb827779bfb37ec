"""Which byte ranges a failback moves, from what the store already knows.

- The VM epoch's writes: the extents of the accepted logs between two replica positions,
  read from the logs' metadata columns only (offset, length), never their data.
- The machine's divergence: the blocks its agent found changed since its last shipped hash
  map (writes that never left the machine), uploaded by the agent as block indices.
- Late logs: logs of the machine's epoch shipped after the fence (refused by ingest), whose
  blocks the replica never took.

Each returns None when it cannot be known (logs folded into the base VHD, an unreadable
object, a missing hash map); the flow then compares every block instead.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from hotspare import layout
from hotspare.catalog import Catalog, catalog_logs
from hotspare.consolidate.sources import read_extent_columns
from hotspare.errors import HotspareError, InvalidObject
from hotspare.failback import ranges as rg
from hotspare.failback.orders import DiskDivergence
from hotspare.machine import DiskSpec
from hotspare.store.base import Store

Position = tuple[int, int]


def log_ranges(store: Store, keys: list[str]) -> rg.Ranges:
    parts = []
    for key in keys:
        offsets, lengths, *_ = read_extent_columns(store, key)
        parts.append(rg.from_extents(offsets, lengths))
    return rg.union(*parts)


def replica_changes(store: Store, catalog: Catalog, after: Position, upto: Position) -> rg.Ranges | None:
    """What the accepted logs with positions in (``after``, ``upto``] wrote; None when that
    chain of logs is no longer whole in the catalog (retention folded some into the base)."""
    if upto <= after:
        return rg.EMPTY.copy()
    logs = catalog_logs(store, catalog, after=after, upto=upto)
    for epoch in range(after[0], upto[0] + 1):
        chain = [lg for lg in logs if lg.epoch == epoch]
        nxt = after[1] + 1 if epoch == after[0] else 0
        for lg in chain:
            if lg.first_seq != nxt:
                return None
            nxt = lg.last_seq + 1
        if epoch == upto[0] and nxt != upto[1] + 1:
            return None
    return log_ranges(store, [lg.key for lg in logs])


def late_log_ranges(store: Store, machine: str, disk: str, catalog: Catalog, epoch: int) -> rg.Ranges | None:
    """What the logs of fenced ``epoch`` shipped after its fence wrote (found where ingest
    left them or in quarantine); None when one cannot be read."""
    fence = catalog.fence_of(epoch)
    if fence is None:
        return rg.EMPTY.copy()
    prefix = layout.logs_prefix(machine, disk, epoch)
    keys = [o.key for p in (prefix, layout.quarantine_key(prefix)) for o in store.list(p)
            if (seqs := layout.parse_log_name(o.key)) and seqs[1] > fence.after_seq]
    try:
        return log_ranges(store, keys)
    except (HotspareError, pa.ArrowException, OSError):
        return None


def hashes_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def read_hashes(store: Store, key: str, length: int | None = None) -> np.ndarray:
    """A uint64 array uploaded by an agent, validated (it is input from outside)."""
    try:
        a = np.load(io.BytesIO(store.get(key)), allow_pickle=False)
    except ValueError as err:
        raise InvalidObject(key, f"not a hash map ({err})") from err
    if a.dtype != np.uint64 or a.ndim != 1 or (length is not None and len(a) != length):
        raise InvalidObject(key, f"holds {a.dtype}[{a.shape}], expected uint64[{length if length is not None else 'n'}]")
    return a


def divergence_ranges(store: Store, spec: DiskSpec, div: DiskDivergence | None) -> rg.Ranges | None:
    """The machine's unshipped blocks as byte ranges; None when the agent could not say."""
    if div is None or div.key is None:
        return None
    blocks = read_hashes(store, div.key)
    if len(blocks) and int(blocks.max()) >= -(-spec.size // spec.block_size):
        raise InvalidObject(div.key, f"names block {int(blocks.max())}, past the end of disk {spec.name}")
    return rg.from_blocks(blocks, spec.block_size, spec.size)


def phase_one_sources(store: Store, catalog: Catalog, spec: DiskSpec, upto: Position,
                      divergence: DiskDivergence | None) -> dict[str, rg.Ranges | None]:
    """What phase one moves for a disk, per source (None: unknown), all up to ``upto``."""
    fence = catalog.fence_of(upto[0] - 1)
    if fence is None:
        raise HotspareError(f"{catalog.machine}/{spec.name} has no fence of epoch {upto[0] - 1}")
    return {
        "VM epoch writes": replica_changes(store, catalog, (fence.epoch, fence.after_seq), upto),
        "machine divergence (never shipped)": divergence_ranges(store, spec, divergence),
        "machine logs after the fence": late_log_ranges(store, catalog.machine, spec.name, catalog, fence.epoch),
    }
