"""The consolidate flow: ingest, then fold the newly accepted logs of each disk into a new
recovery point (new chunks in new packs, only the index pages the logs touch), commit it,
move the retention window and collect what no retained point references.

The engine (:func:`hotspare.replica.consolidate.consolidate_disk`) owns the loop; this flow
passes it a ``run_jobs`` that maps the part jobs to ``build-parts`` tasks, so a Dask or Ray
task runner spreads a large disk across workers (each job is self-contained).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed

from flows.ingest import ingest
from hotspare.errors import UsageError
from hotspare.machine import DiskSpec, Policy, load_machine
from hotspare.replica.build import PartJob, PartResult
from hotspare.replica.consolidate import DiskConsolidation
from hotspare.replica.consolidate import consolidate_disk as engine_consolidate_disk
from hotspare.store import Store
from tasks.common import resolve_store
from tasks.consolidate import build_parts, commit


def _artifact_key(prefix: str, machine: str) -> str:
    return f"{prefix}-{''.join(c if c.isalnum() else '-' for c in machine.lower())}"


def run_jobs_as_tasks(store: Store, label: str):
    def run_jobs(jobs: list[PartJob]) -> list[PartResult]:
        if not jobs:
            return []
        progress = create_progress_artifact(0.0, description=f"{label}: building {len(jobs)} part(s)")
        futures = build_parts.map(unmapped(store), jobs)
        order = {id(f): i for i, f in enumerate(futures)}
        results: list[PartResult | None] = [None] * len(jobs)
        for done, fut in enumerate(as_completed(futures), 1):
            results[order[id(fut)]] = fut.result()
            update_progress_artifact(progress, 100.0 * done / len(jobs))
        return [r for r in results if r is not None]
    return run_jobs


def consolidate_disk(store: Store, machine: str, disk: DiskSpec, policy: Policy) -> DiskConsolidation:
    logger = get_run_logger()
    return engine_consolidate_disk(store, machine, disk, policy,
                                   run_jobs=run_jobs_as_tasks(store, f"{machine}/{disk.name}"),
                                   commit=commit, warn=lambda msg: logger.warning("%s", msg))


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
        [{"disk": r.disk, "point": (r.point or "(nothing new)") + (" (converted from VHD)" if r.converted else ""),
          "logs": r.logs, "bytes applied": r.bytes_applied, "bytes read": r.bytes_read,
          "bytes uploaded": r.bytes_uploaded, "packs written": r.packs_written, "pages written": r.pages_written,
          "chunks written": r.chunks_written, "chunks deduplicated": r.chunks_deduplicated,
          "zero chunks": r.chunks_zero,
          "MB/s applied": round(r.bytes_applied / r.seconds / 1e6, 1) if r.seconds and r.bytes_applied else 0,
          "lag (s)": round(r.lag_seconds, 1) if r.lag_seconds is not None else "", "points": r.points,
          "base": r.base or "", "objects deleted": r.deleted, "bytes freed": r.bytes_freed,
          "packs kept": r.packs_kept, "bytes stored": r.bytes_stored, "packs repacked": r.packs_repacked,
          "dead bytes (estimate)": r.dead_bytes}
         for r in results],
        key=_artifact_key("consolidate", machine), description=f"Consolidation of {machine}")
    return results
