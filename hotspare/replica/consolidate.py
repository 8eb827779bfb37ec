"""One disk's consolidation, the loop the consolidate flow runs: plan a point, build its
parts, write its root, commit create-only (re-planning after a lost race), repair what is
damaged, move the retention window and collect the garbage.

The flow passes its task-backed steps (``run_jobs`` maps part jobs to workers, ``commit``
commits a catalog, ``progress`` reports done parts); without them everything runs here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel

from hotspare.catalog import Catalog, commit_catalog, load_catalog
from hotspare.catalog.model import utcnow
from hotspare.consolidate import damage
from hotspare.consolidate.damage import DamagedObject, DamagedPoint, DamagedVhd
from hotspare.errors import AlreadyExists, HotspareError, InvalidLog, InvalidObject
from hotspare.faults import crash_point
from hotspare.quarantine import quarantine
from hotspare.machine import DiskSpec, Policy
from hotspare.replica.build import PartJob, PartResult, PointBuild, commit_point, finish_root, plan_point, run_part
from hotspare.replica.gc import Garbage, collect_garbage, retention
from hotspare.replica.index import read_root
from hotspare.replica.repack import candidates, dead_bytes, repack
from hotspare.store.base import Store

MAX_RACES = 5


class DiskConsolidation(BaseModel):
    """What one disk's consolidation did (the flow's table artifact shows it)."""

    disk: str
    point: str | None = None  # the new current point, None when nothing was new
    root: str | None = None
    converted: bool = False  # the first chunked point, made from the VHD point of the old layout
    logs: int = 0
    bytes_applied: int = 0  # bytes the logs' extents cover, superseded ones included
    bytes_read: int = 0  # log data and previous chunks downloaded
    bytes_uploaded: int = 0  # packs, index pages and dedup shards
    parts: int = 0
    packs_written: int = 0
    pages_written: int = 0
    chunks_written: int = 0
    chunks_deduplicated: int = 0
    chunks_zero: int = 0
    seconds: float = 0.0
    lag_seconds: float | None = None  # now minus the point's time
    base: str | None = None
    points: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    packs_kept: int = 0
    bytes_stored: int = 0
    packs_repacked: int = 0
    dead_bytes: int = 0  # estimated bytes of dead chunks in the packs retained points read

    def add_garbage(self, g: Garbage) -> None:
        self.deleted += g.deleted
        self.bytes_freed += g.bytes_freed
        self.packs_kept, self.bytes_stored = g.packs_kept, g.bytes_kept


RunJobs = Callable[[list[PartJob]], list[PartResult]]


def _local_jobs(store: Store) -> RunJobs:
    return lambda jobs: [run_part(store, j) for j in jobs]


def _damage_of(err: InvalidObject) -> DamagedPoint | None:
    """An unreadable object of the previous point's index, as damage consolidation repairs."""
    if "/packs/" in err.key or "/index/" in err.key:
        return DamagedPoint(err.key, err.reason)
    return None


def consolidate_disk(store: Store, machine: str, disk: DiskSpec, policy: Policy, *, run_jobs: RunJobs | None = None,
                     commit: Callable[[Store, Catalog], Catalog] = commit_catalog,
                     warn: Callable[[str], None] = lambda msg: None) -> DiskConsolidation:
    t0 = time.monotonic()
    run_jobs = run_jobs or _local_jobs(store)
    out = DiskConsolidation(disk=disk.name)
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        try:
            build = plan_point(store, catalog, disk.block_size)
            if build is None:
                break
            results = run_jobs(build.jobs())
            root_key, root = finish_root(store, build, results)
        except (InvalidLog, DamagedVhd, DamagedPoint, InvalidObject) as err:
            err = (_damage_of(err) or err) if isinstance(err, InvalidObject) else err
            fix = damage.repair(store, catalog, err)
            if fix is None:
                raise err from None
            try:
                commit(store, fix.catalog)
            except AlreadyExists:
                continue  # the catalog moved: re-plan (and re-check) from the new one
            if fix.quarantine:
                quarantine(store, fix.quarantine, fix.catalog.rejected[-1].reason)
            if fix.wait_for_resync:
                raise DamagedObject(fix.message) from err
            warn(fix.message)
            continue
        nxt = commit_point(catalog, build, root_key)
        crash_point("consolidate-before-commit")
        try:
            nxt = commit(store, nxt)
        except AlreadyExists:
            warn(f"another consolidation committed catalog v{nxt.version} of {machine}/{disk.name} first; re-planning")
            continue
        _report(out, build, results, root_key)
        crash_point("consolidate-before-gc")
        break
    else:
        raise HotspareError(f"consolidation of {machine}/{disk.name} lost {MAX_RACES} races in a row")
    advance_window(store, machine, disk, policy, out, commit)
    catalog = repack_packs(store, machine, disk, out, commit)
    base = catalog.point("base")
    out.base = base.id if base else None
    out.points = len(catalog.points)
    out.seconds = time.monotonic() - t0
    return out


def _report(out: DiskConsolidation, build: PointBuild, results: list[PartResult], root_key: str) -> None:
    out.point, out.root, out.converted = build.point_id, root_key, build.legacy_vhd is not None
    out.logs, out.bytes_applied, out.parts = len(build.logs), build.sources.applied_bytes, len(results)
    out.bytes_uploaded += build.dedup_uploaded
    for r in results:
        out.bytes_read += r.bytes_read
        out.bytes_uploaded += r.uploaded
        out.packs_written += len(r.packs)
        out.pages_written += sum(1 for p in r.pages.values() if p is not None)
        out.chunks_written += r.chunks_written
        out.chunks_deduplicated += r.chunks_deduplicated
        out.chunks_zero += r.chunks_zero
    out.lag_seconds = (utcnow() - build.point_time).total_seconds()


def advance_window(store: Store, machine: str, disk: DiskSpec, policy: Policy, out: DiskConsolidation,
                   commit: Callable[[Store, Catalog], Catalog] = commit_catalog) -> Catalog:
    """Drop the points the retention window left, fold their logs, collect the garbage (the
    objects of builds that lost a race or crashed, of dropped points, folded logs)."""
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        nxt = retention(store, catalog, policy)
        if nxt is None:
            # Still sweep: a run killed while collecting leaves garbage that only a sweep
            # against the committed catalog removes.
            out.add_garbage(collect_garbage(store, catalog))
            return catalog
        try:
            nxt = commit(store, nxt)
        except AlreadyExists:
            continue
        crash_point("retention-before-gc")
        out.add_garbage(collect_garbage(store, nxt))
        return nxt
    raise HotspareError(f"retention of {machine}/{disk.name} lost {MAX_RACES} races in a row")


def repack_packs(store: Store, machine: str, disk: DiskSpec, out: DiskConsolidation,
                 commit: Callable[[Store, Catalog], Catalog] = commit_catalog) -> Catalog:
    """Rewrite the current point's mostly dead packs (see :mod:`hotspare.replica.repack`)."""
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        roots = {p.root: read_root(store, p.root) for p in catalog.points if p.root}
        out.dead_bytes = dead_bytes(list(roots.values()))
        todo = candidates(catalog, roots)
        done = repack(store, catalog, todo) if todo else None
        if done is None:
            return catalog
        nxt, uploaded = done
        crash_point("repack-before-commit")
        try:
            nxt = commit(store, nxt)
        except AlreadyExists:
            continue
        out.packs_repacked += len(todo)
        out.bytes_uploaded += uploaded
        out.add_garbage(collect_garbage(store, nxt))
        out.dead_bytes = dead_bytes([read_root(store, p.root) for p in nxt.points if p.root])
        return nxt
    raise HotspareError(f"repacking {machine}/{disk.name} lost {MAX_RACES} races in a row")
