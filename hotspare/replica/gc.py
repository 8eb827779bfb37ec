"""Retention and garbage: which points the window keeps, and deleting what no retained point
references.

Garbage is collected only from what a committed catalog says: an object (pack, index build,
VHD object) is deleted when the newest catalog, and so every later one, does not reference it
and it was written for that catalog's version or an older one. An object written for a newer
version may belong to a build that is about to commit, and is left alone. Deleting is
idempotent, so a crash at any line leaves a state that the next run completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hotspare import layout
from hotspare.catalog import Catalog, RecoveryPoint
from hotspare.catalog.manifest import sweep_manifests
from hotspare.catalog.model import utcnow
from hotspare.catalog.segments import drop_through
from hotspare.faults import crash_point
from hotspare.machine import Policy
from hotspare.replica.index import IndexRoot, read_root
from hotspare.store.base import Store


def kept_points(catalog: Catalog, policy: Policy, now: datetime | None = None) -> list[RecoveryPoint]:
    """The newest ``retention_points`` points younger than ``retention_hours``; the current
    point is always kept."""
    now = now or utcnow()
    cutoff = now - timedelta(hours=policy.retention_hours)
    pts = sorted(catalog.points, key=lambda p: p.position)
    kept = [p for p in pts[-policy.retention_points:] if p.time >= cutoff]
    return kept or pts[-1:]


def retention(store: Store, catalog: Catalog, policy: Policy) -> Catalog | None:
    """The next catalog with the points the window dropped gone and the logs up to the new
    base folded, or None when the window did not move."""
    kept = kept_points(catalog, policy)
    if not kept or len(kept) == len(catalog.points):
        return None
    manifests, tail, folded = drop_through(store, catalog, kept[0].position, catalog.version + 1)
    ids = {p.id for p in kept}
    return catalog.next(points=kept, tail=tail, manifests=manifests, folded=folded,
                        vhd_objects={k: v for k, v in catalog.vhd_objects.items() if k in ids})


@dataclass
class Garbage:
    packs: int = 0
    index_objects: int = 0
    vhd_objects: int = 0
    logs: int = 0
    manifests: int = 0
    bytes_freed: int = 0
    packs_kept: int = 0
    bytes_kept: int = 0

    @property
    def deleted(self) -> int:
        return self.packs + self.index_objects + self.vhd_objects + self.logs + self.manifests


def retained_roots(store: Store, catalog: Catalog) -> list[IndexRoot]:
    return [read_root(store, p.root) for p in catalog.points if p.root]


def collect_garbage(store: Store, catalog: Catalog) -> Garbage:
    """Delete what ``catalog`` (committed) no longer references."""
    g = Garbage()
    roots = retained_roots(store, catalog)
    packs = {ref.key for r in roots for ref in r.packs.values()}
    index = {ref.key for r in roots for ref in [*r.pages.values(), *r.dedup.values()]}
    index |= {p.root for p in catalog.points if p.root}
    legacy = set(catalog.vhd.values())
    vhds = set(catalog.vhd_objects.values()) | legacy

    def sweep(prefix: str, live: set[str], counter: str) -> None:
        for o in store.list(prefix):
            if o.key in live:
                continue
            v = layout.written_for(o.key)
            is_legacy = v is None and prefix.endswith("vhd/") and not legacy and o.key.endswith(".vhd")
            if (v is not None and v <= catalog.version) or is_legacy:
                crash_point("gc-delete")
                store.delete(o.key)
                setattr(g, counter, getattr(g, counter) + 1)
                g.bytes_freed += o.size

    m, d = catalog.machine, catalog.disk
    sweep(layout.packs_prefix(m, d), packs, "packs")
    sweep(layout.index_prefix(m, d), index, "index_objects")
    sweep(layout.vhd_prefix(m, d), vhds, "vhd_objects")
    for epoch, seq in catalog.folded.items():
        for o in store.list(layout.logs_prefix(m, d, epoch)):
            seqs = layout.parse_log_name(o.key)
            if seqs and seqs[1] <= seq:
                store.delete(o.key)
                g.logs += 1
                g.bytes_freed += o.size
    g.manifests = sweep_manifests(store, catalog)
    kept = {ref.key: ref.size for r in roots for ref in r.packs.values()}
    g.packs_kept, g.bytes_kept = len(kept), sum(kept.values())
    return g
