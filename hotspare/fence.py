"""Fencing: end a machine's epoch before a VM takes over its disks.

The fence of epoch n says "epoch n+1 begins after seq s of epoch n". ``s`` is the end of
the gap-free chain of logs already in the store (accepted or not), so the last logs the
machine shipped before it went silent are still ingested, and anything it ships later is
refused (quarantined by ingest, and its agent stops shipping once it sees the fence).
"""

from __future__ import annotations

from hotspare import layout
from hotspare.catalog import Catalog, Fence, commit_catalog, load_catalog
from hotspare.errors import AlreadyExists, HotspareError
from hotspare.machine import DiskSpec
from hotspare.store.base import Store


def chain_end(store: Store, machine: str, disk: str, catalog: Catalog, epoch: int) -> int:
    """The last seq of the gap-free chain from the applied seq through the logs present."""
    end = catalog.applied_seq(epoch)
    spans = sorted(s for o in store.list(layout.logs_prefix(machine, disk, epoch))
                   if (s := layout.parse_log_name(o.key)) is not None)
    for first, last in spans:
        if first == end + 1:
            end = last
    return end


class ReplicaMoved(HotspareError):
    """The catalog applied logs past the seq a fence was asked for."""


def fence_disk(store: Store, machine: str, disk: DiskSpec, epoch: int, reason: str,
               after_seq: int | None = None) -> Catalog:
    """Commit the fence of ``epoch`` on ``disk`` (idempotent: an existing fence is kept).

    It ends the epoch after ``after_seq`` when given (a failback fences the VM epoch at the
    point it verified; later logs are refused), else after the chain of logs present."""
    for _ in range(8):
        cat = load_catalog(store, machine, disk.name, disk.size)
        if cat.fence_of(epoch) is not None:
            return cat
        if after_seq is not None and cat.applied_seq(epoch) > after_seq:
            raise ReplicaMoved(f"{machine}/{disk.name}: epoch {epoch} is applied up to seq "
                               f"{cat.applied_seq(epoch)}, past seq {after_seq}")
        end = after_seq if after_seq is not None else chain_end(store, machine, disk.name, cat, epoch)
        nxt = cat.next(epoch=epoch + 1, fences=[*cat.fences, Fence(epoch=epoch, after_seq=end, reason=reason)])
        try:
            return commit_catalog(store, nxt)
        except AlreadyExists:
            continue
    raise AlreadyExists(layout.catalog_prefix(machine, disk.name), "lost 8 commit races while fencing")
