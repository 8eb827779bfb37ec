"""The consolidate flow: ingest, then fold the newly accepted logs of each disk into a new
current VHD (only changed parts rebuilt, the rest copied on the server), commit it as a
recovery point, and move the retention window.

Changed parts are built by mapped tasks (``build-parts``), so a Dask or Ray task runner
spreads a large disk across workers; each gets a self-contained job.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from pydantic import BaseModel

from flows.ingest import ingest
from hotspare.catalog import Catalog, commit_catalog, load_catalog
from hotspare.catalog.model import utcnow
from hotspare.consolidate import damage
from hotspare.consolidate import point as engine
from hotspare.consolidate.damage import DamagedObject, DamagedVhd
from hotspare.errors import AlreadyExists, HotspareError, InvalidLog, UsageError
from hotspare.faults import crash_point
from hotspare.ingest import quarantine
from hotspare.machine import DiskSpec, Policy, load_machine
from hotspare.store import Store
from tasks.common import resolve_store
from tasks.consolidate import build_parts, copy_parts, publish

MAX_RACES = 5


class DiskConsolidation(BaseModel):
    disk: str
    point: str | None = None  # the new current point's id, None when nothing was new
    vhd: str | None = None
    logs: int = 0
    bytes_applied: int = 0
    parts_rewritten: int = 0
    parts_copied: int = 0
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    lag_seconds: float | None = None  # now minus the newest captured write in the point
    base: str | None = None
    deleted: int = 0


def _artifact_key(prefix: str, machine: str) -> str:
    return f"{prefix}-{''.join(c if c.isalnum() else '-' for c in machine.lower())}"


def build_vhd(store: Store, build: engine.VhdBuild, label: str) -> tuple[int, int, int]:
    """Run a build as tasks; returns (parts rewritten, parts copied, bytes uploaded)."""
    if build.exists:
        return 0, 0, 0
    token = store.begin_compose(build.key)
    try:
        jobs = build.jobs(store, token)
        copied = copy_parts.submit(store, build, token) if build.previous else None
        progress = create_progress_artifact(0.0, description=f"{label}: building {len(jobs)} batch(es) of parts")
        receipts = []
        futures = build_parts.map(unmapped(store), jobs)
        for done, fut in enumerate(as_completed(futures), 1):
            receipts += fut.result()
            update_progress_artifact(progress, 100.0 * done / max(1, len(jobs)))
        if copied is not None:
            receipts += copied.result()
        publish(store, build, token, receipts)
    except BaseException:
        store.abort_compose(build.key, token)
        raise
    rewritten = sum(1 for w in build.plan.windows if not w.copy)
    return rewritten, len(build.plan.windows) - rewritten, sum(r.uploaded for r in receipts)


def consolidate_disk(store: Store, machine: str, disk: DiskSpec, policy: Policy) -> DiskConsolidation:
    logger = get_run_logger()
    t0 = time.monotonic()
    out = DiskConsolidation(disk=disk.name)
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        try:
            build = engine.prepare(store, catalog)
            if build is None:
                break
            rewritten, copied, uploaded = build_vhd(store, build, f"{machine}/{disk.name}")
        except (InvalidLog, DamagedVhd) as err:
            fix = damage.repair(store, catalog, err)
            if fix is None:
                raise
            try:
                commit_catalog(store, fix.catalog)
            except AlreadyExists:
                continue  # the catalog moved: re-plan (and re-check) from the new one
            if fix.quarantine:
                quarantine(store, fix.quarantine, fix.catalog.rejected[-1].reason)
            if fix.wait_for_resync:
                raise DamagedObject(fix.message) from err
            logger.warning("%s", fix.message)
            continue
        nxt = engine.commit_point(catalog, build)
        crash_point("consolidate-before-commit")
        try:
            nxt = commit_catalog(store, nxt)
        except AlreadyExists:
            logger.info("another consolidation committed catalog v%d of %s first; re-planning", nxt.version, disk.name)
            continue
        pt = nxt.points[-1]
        out = DiskConsolidation(
            disk=disk.name, point=pt.id, vhd=build.key, logs=len(build.logs), bytes_applied=build.sources.applied_bytes,
            parts_rewritten=rewritten, parts_copied=copied, bytes_uploaded=uploaded,
            bytes_copied=build.plan.copied_bytes if copied else 0,
            lag_seconds=(utcnow() - pt.time).total_seconds())
        crash_point("consolidate-before-gc")
        engine.collect_garbage(store, nxt, replaced=[catalog.vhd["current"]] if catalog.vhd.get("current") else [])
        break
    else:
        raise HotspareError(f"consolidation of {machine}/{disk.name} lost {MAX_RACES} races in a row")
    catalog = advance_base(store, machine, disk, policy, out)
    out.base = (catalog.point("base").id if catalog.point("base") else None)
    out.seconds = time.monotonic() - t0
    return out


def advance_base(store: Store, machine: str, disk: DiskSpec, policy: Policy, out: DiskConsolidation) -> Catalog:
    """Move the retention window: compose the new base, drop old points, fold their logs."""
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        build = engine.retention_plan(store, catalog, policy)
        if build is None:
            return catalog
        build_vhd(store, build, f"{machine}/{disk.name} base")
        nxt = engine.commit_retention(store, catalog, build, policy)
        try:
            nxt = commit_catalog(store, nxt)
        except AlreadyExists:
            continue
        out.deleted += engine.collect_garbage(store, nxt, replaced=[catalog.vhd["base"]])
        return nxt
    raise HotspareError(f"retention of {machine}/{disk.name} lost {MAX_RACES} races in a row")


def load_policy(name: str) -> Policy:
    """The policy of the machine policy block ``name``; UsageError when there is none."""
    from blocks.policy import MachinePolicy

    try:
        return MachinePolicy.load(name).policy()
    except ValueError as err:  # Prefect: "Unable to find block document named ..."
        raise UsageError(f"--policy-block {name!r}: no machine policy block of that name "
                         f"(create one in the Prefect UI, type hotspare-machine-policy): {err}") from None


@flow(name="consolidate", flow_run_name="consolidate {machine}")
def consolidate(machine: str, store: str | None = None, store_block: str | None = None,
                policy_block: str | None = None) -> list[DiskConsolidation]:
    """Ingest, then compact the new logs of every disk of ``machine`` into recovery points."""
    st = resolve_store(store, store_block)
    cfg = load_machine(st, machine)
    policy = load_policy(policy_block) if policy_block else cfg.policy  # before any work: a bad name fails fast
    ingest(machine=machine, store=store, store_block=store_block)
    results = [consolidate_disk(st, machine, d, policy) for d in cfg.disks]
    create_table_artifact(
        [{"disk": r.disk, "point": r.point or "(nothing new)", "logs": r.logs, "bytes applied": r.bytes_applied,
          "parts rewritten": r.parts_rewritten, "parts copied": r.parts_copied, "bytes uploaded": r.bytes_uploaded,
          "bytes copied on the server": r.bytes_copied,
          "MB/s applied": round(r.bytes_applied / r.seconds / 1e6, 1) if r.seconds and r.bytes_applied else 0,
          "lag (s)": round(r.lag_seconds, 1) if r.lag_seconds is not None else "", "base": r.base or ""}
         for r in results],
        key=_artifact_key("consolidate", machine), description=f"Consolidation of {machine}")
    return results
