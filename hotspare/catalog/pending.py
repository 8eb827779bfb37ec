"""The logs a disk's catalog has not accepted yet: what ingest looks at, what the fleet runs
count as work, and what a stall report says is waiting."""

from __future__ import annotations

from hotspare import layout
from hotspare.catalog.model import Catalog
from hotspare.store.base import ObjectInfo, Store


def epochs_to_scan(catalog: Catalog) -> list[int]:
    """The epochs that may hold new logs: the current one, and fenced ones (whose late
    logs must be found to be refused)."""
    return sorted({catalog.epoch, *catalog.applied, *(f.epoch for f in catalog.fences)})


def list_pending(store: Store, machine: str, disk: str, catalog: Catalog) -> list[ObjectInfo]:
    """Log objects not yet accepted, in (epoch, seq) order.

    Each epoch is listed after its newest accepted log's key: keys sort by first seq, so
    every accepted log of the epoch sorts at or before it and everything after it is new
    (a stray log overlapping the newest accepted one is found there and refused; one that
    starts before it is not looked at again). The cost follows the new logs, not the window."""
    out = []
    for epoch in epochs_to_scan(catalog):
        folded = catalog.folded.get(epoch, -1)
        for o in store.list(layout.logs_prefix(machine, disk, epoch), start_after=catalog.newest.get(epoch)):
            seqs = layout.parse_log_name(o.key)
            # A log folded into the base VHD whose deletion a crash interrupted is garbage,
            # left for consolidation to delete, not a new log.
            if not (seqs and seqs[1] <= folded):
                out.append(o)
    return out
