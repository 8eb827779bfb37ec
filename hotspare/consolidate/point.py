"""Making a point's VHD and committing it: the steps the consolidate flow runs.

1. :func:`prepare`: what a new current point would be (the newest accepted cut), the
   source runs of the logs since the current point, and the plan of the new VHD object.
2. Build: the copy windows and the part jobs of the plan, through a staged compose of the
   point's VHD key (deterministic, so a re-run after a crash rebuilds the same bytes, and
   an object that a crashed run already published is simply reused).
3. :func:`commit_point`: the next catalog version naming the point as current.
4. :func:`retention_plan` / :func:`commit_retention`: advance ``base`` to the oldest kept
   point (composing its VHD from the old base and the logs between), drop older points,
   fold their logs (rewriting the manifest retention cuts through); after the commit,
   :func:`collect_garbage` deletes what no catalog names (VHDs, folded logs, manifests).

The accepted logs come from :func:`~hotspare.catalog.catalog_logs`, only for the range of
positions a step needs, so a step reads the manifests of that range and no others.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from hotspare import layout
from hotspare.catalog import AcceptedLog, Catalog, RecoveryPoint, catalog_logs
from hotspare.catalog.manifest import sweep_manifests
from hotspare.catalog.model import utcnow
from hotspare.catalog.segments import drop_through
from hotspare.consolidate.build import PartJob, part_jobs, run_job
from hotspare.consolidate.damage import DamagedVhd
from hotspare.consolidate.plan import VhdPlan, plan_vhd, previous_layout
from hotspare.consolidate.sources import Sources, compute_sources
from hotspare.errors import AlreadyExists, HotspareError, NotFound
from hotspare.faults import crash_point
from hotspare.machine import Policy
from hotspare.store.base import CopyRange, PartReceipt, Store
from hotspare.vhd import VhdReader


def point_key(machine: str, disk: str, epoch: int, seq: int) -> str:
    return layout.vhd_key(machine, disk, f"point-{layout.num(epoch)}-{layout.num(seq)}")


def disk_uuid(machine: str, disk: str) -> uuid.UUID:
    """The VHD unique id of a disk: stable across its points, so hypervisors see one disk."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"hotspare:{machine}/{disk}")


@dataclass
class VhdBuild:
    """A VHD object to make from a previous one (or from nothing) plus some logs."""

    key: str
    previous: str | None
    logs: list[AcceptedLog]
    sources: Sources
    plan: VhdPlan
    timestamp: datetime  # the VHD's own timestamp: from the logs' contents, so a re-run rebuilds the same bytes
    exists: bool  # a crashed or concurrent run already published it
    # The point's time: when its newest log was accepted (the ingest's clock), never the
    # agent's ``ts``, whose clock may be days off and would mislead retention and --at.
    point_time: datetime | None = None

    def jobs(self, store: Store, token: str) -> list[PartJob]:
        return part_jobs(self.plan, self.sources, self.key, token, disk_uuid(*_machine_disk(self.key)), self.timestamp)


def _machine_disk(key: str) -> tuple[str, str]:
    parts = key.split("/")
    return parts[1], parts[3]


def plan_build(store: Store, catalog: Catalog, previous: str | None, logs: list[AcceptedLog], key: str) -> VhdBuild:
    logs = sorted(logs, key=lambda lg: (lg.epoch, lg.first_seq))
    timestamp = max((lg.captured_at or lg.accepted_at for lg in logs), default=utcnow())
    point_time = max((lg.accepted_at for lg in logs), default=utcnow())
    sources = compute_sources(store, [lg.key for lg in logs], catalog.disk_size)
    prev_layout = None
    if previous is not None:
        try:
            with store.open(previous) as f:
                prev_layout = previous_layout(VhdReader(f, previous), previous)
        except HotspareError as err:
            if getattr(err, "transient", False):
                raise
            raise DamagedVhd(previous, getattr(err, "reason", None) or str(err)) from err
    plan = plan_vhd(catalog.disk_size, sources, previous, prev_layout)
    exists = False
    try:
        size = store.size(key)
        if size != plan.layout.file_size:
            raise HotspareError(f"{key} exists with {size} bytes, the plan makes {plan.layout.file_size}: "
                                "not written by this plan; remove it after checking no catalog names it")
        exists = True
    except NotFound:
        pass
    return VhdBuild(key, previous, logs, sources, plan, timestamp, exists, point_time)


def prepare(store: Store, catalog: Catalog) -> VhdBuild | None:
    """The build of a new current point, or None when no log is newer than the current one."""
    current = catalog.point("current")
    after = current.position if current else (-1, -1)
    logs = catalog_logs(store, catalog, after=after)
    cuts = [lg for lg in logs if lg.cut]
    if not cuts:
        return None  # points are made at cuts only: logs of an unfinished cycle wait for theirs
    newest = cuts[-1]
    new = [lg for lg in logs if lg.position <= newest.position]
    key = point_key(catalog.machine, catalog.disk, newest.epoch, newest.last_seq)
    return plan_build(store, catalog, catalog.vhd.get("current"), new, key)


def copy_window(store: Store, build: VhdBuild, token: str, number: int) -> PartReceipt:
    w = build.plan.windows[number - 1]
    assert w.copy and build.previous is not None
    return store.compose_part(build.key, token, w.number, w.start, [CopyRange(build.previous, w.start, w.end - w.start)])


def run_build(store: Store, build: VhdBuild, *, workers: int = 4) -> list[PartReceipt]:
    """Build ``build`` in this process, ``workers`` parts at a time (the flow maps the same
    steps to tasks instead). Copies and builds overlap: the server copies while we build."""
    if build.exists:
        return []
    token = store.begin_compose(build.key)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="hotspare-build") as pool:
            copies = [pool.submit(copy_window, store, build, token, w.number) for w in build.plan.windows if w.copy]
            jobs = [pool.submit(run_job, store, job) for job in build.jobs(store, token)]
            receipts = [f.result() for f in copies] + [r for f in jobs for r in f.result()]
        finish_build(store, build, token, receipts)
    except BaseException:
        store.abort_compose(build.key, token)
        raise
    return receipts


def finish_build(store: Store, build: VhdBuild, token: str, receipts: list[PartReceipt]) -> None:
    crash_point("consolidate-before-publish")
    try:
        store.finish_compose(build.key, token, receipts, create_only=True)
    except AlreadyExists:
        pass  # a concurrent run published the same point: same content (same disk state)


def commit_point(catalog: Catalog, build: VhdBuild) -> Catalog:
    """The next catalog: the built point becomes current (and base, for the first point)."""
    newest = max(build.logs, key=lambda lg: lg.position)
    point = RecoveryPoint(id=f"{newest.epoch}-{newest.last_seq}", epoch=newest.epoch, seq=newest.last_seq,
                          time=build.point_time or build.timestamp, vhd=build.key, bytes_applied=build.sources.applied_bytes,
                          consistent=newest.consistent)
    base = catalog.vhd.get("base") or build.key
    points = [p.model_copy(update={"vhd": p.vhd if p.vhd == base else ""}) for p in catalog.points]
    return catalog.next(points=points + [point], vhd={"current": build.key, "base": base})


def kept_points(catalog: Catalog, policy: Policy, now: datetime | None = None) -> list[RecoveryPoint]:
    """The newest ``retention_points`` points younger than ``retention_hours``; the current
    point is always kept."""
    now = now or utcnow()
    cutoff = now - timedelta(hours=policy.retention_hours)
    pts = sorted(catalog.points, key=lambda p: p.position)
    kept = [p for p in pts[-policy.retention_points:] if p.time >= cutoff]
    return kept or pts[-1:]


def retention_plan(store: Store, catalog: Catalog, policy: Policy) -> VhdBuild | None:
    """The build of the new base VHD when the window moved, else None."""
    base = catalog.point("base")
    kept = kept_points(catalog, policy)
    if base is None or not kept or kept[0].position <= base.position:
        return None
    new_base = kept[0]
    key = point_key(catalog.machine, catalog.disk, new_base.epoch, new_base.seq)
    logs = catalog_logs(store, catalog, after=base.position, upto=new_base.position)
    if key == catalog.vhd.get("current"):
        # The new base is the current point: its VHD exists, nothing to compose.
        return VhdBuild(key, base.vhd, logs, Sources([], {}, 0), None, new_base.time, exists=True)  # type: ignore[arg-type]
    return plan_build(store, catalog, base.vhd, logs, key)


def commit_retention(store: Store, catalog: Catalog, build: VhdBuild, policy: Policy) -> Catalog:
    """The next catalog: base moved to the oldest kept point, the logs up to it dropped (a
    manifest that straddles it is rewritten as a new one, create-only, for that version)."""
    kept = kept_points(catalog, policy)
    new_base = kept[0]
    manifests, tail, folded = drop_through(store, catalog, new_base.position, catalog.version + 1)
    points = [p.model_copy(update={"vhd": build.key}) if p.id == new_base.id else p for p in kept]
    return catalog.next(points=points, tail=tail, manifests=manifests, folded=folded,
                        vhd={**catalog.vhd, "base": build.key})


def _position_of(key: str) -> tuple[int, int] | None:
    name = key.rsplit("/", 1)[-1]
    parts = name.removesuffix(".vhd").split("-")
    if len(parts) == 3 and parts[0] == "point" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def collect_garbage(store: Store, catalog: Catalog, replaced: list[str] | None = None) -> int:
    """Delete what ``catalog`` no longer needs; returns the count. Runs after a commit.

    ``replaced``: VHD keys this run's commit stopped naming (the previous current). Beyond
    those, only VHDs older than the base are swept: a VHD between base and current that no
    catalog names yet may be a concurrent run's new point or base, published and about to
    be committed. Folded logs are deleted too, and the manifests no catalog names that
    were written for ``catalog``'s version or before (a newer one may be about to be named)."""
    named = set(catalog.vhd.values())
    base = catalog.point("base")
    deleted = 0
    for key in replaced or []:
        if key not in named:
            store.delete(key)
            deleted += 1
    for o in store.list(layout.vhd_prefix(catalog.machine, catalog.disk)):
        pos = _position_of(o.key)
        if o.key not in named and pos is not None and base is not None and pos < base.position:
            store.delete(o.key)
            deleted += 1
    for epoch, seq in catalog.folded.items():
        for o in store.list(layout.logs_prefix(catalog.machine, catalog.disk, epoch)):
            seqs = layout.parse_log_name(o.key)
            if seqs and seqs[1] <= seq:
                store.delete(o.key)
                deleted += 1
    return deleted + sweep_manifests(store, catalog)
