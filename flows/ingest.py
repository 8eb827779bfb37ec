"""The ingest flow: accept the new extent logs of every disk of a machine.

Validation runs as mapped tasks, one per batch of logs (concurrency from the task runner,
retries on store I/O);
bad logs go to quarantine; each disk's next catalog version is committed create-only, and
a lost race re-plans from the winner's catalog. A gap waited on for longer than the
heartbeat window becomes a resync request, and every stall of a disk (hotspare.stall) is
logged, returned and sent as a ``hotspare.machine.stalled`` event.
"""

from __future__ import annotations

from pydantic import BaseModel
from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_table_artifact

from hotspare import ingest as engine
from hotspare.catalog import list_pending
from hotspare.machine import DiskSpec, MachineConfig, load_machine
from hotspare.stall import STALLED_EVENT, Stall, disk_stalls
from hotspare.store import Store
from tasks.events import emit_machine_event
from tasks.common import resolve_store
from tasks.ingest import commit, quarantine_log, validate_logs

class Outcome(BaseModel):
    key: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.detail}"


class DiskIngest(BaseModel):
    disk: str
    catalog_version: int
    applied_seq: int
    accepted: list[Outcome] = []
    accepted_bytes: int = 0
    rejected: list[Outcome] = []
    waiting: list[Outcome] = []
    resync_from: int | None = None
    stalled: list[str] = []  # one line per stall of this disk (hotspare.stall)


class IngestResult(BaseModel):
    machine: str
    disks: list[DiskIngest]

    @property
    def rejected(self) -> list[Outcome]:
        return [r for d in self.disks for r in d.rejected]

    @property
    def stalled(self) -> list[str]:
        return [s for d in self.disks for s in d.stalled]


def _validate_as_tasks(store: Store, batches: list[list[str]], machine: str, disk: DiskSpec) -> list:
    futures = validate_logs.map(unmapped(store), batches, unmapped(machine), unmapped(disk))
    return [r for f in futures for r in f.result()]


def ingest_disk(store: Store, cfg: MachineConfig, disk: DiskSpec) -> DiskIngest:
    logger = get_run_logger()
    machine = cfg.name
    # A log missing for a heartbeat window is lost, not late (the agent uploads in order).
    catalog, p = engine.ingest_disk(store, machine, disk, validate=_validate_as_tasks, commit=commit,
                                    quarantine_one=quarantine_log, gap_timeout=cfg.policy.heartbeat_window)
    if p.gap_stalled:
        logger.warning("disk %s: %s", disk.name, p.gap_stalled)
    elif catalog.resync_from is not None:
        logger.warning("disk %s: rejected logs left a hole at seq %d; the agent will resync the disk",
                       disk.name, catalog.resync_from)
    for key, why in p.waiting:
        logger.info("waiting: %s (%s)", key, why)
    stalls = disk_stalls(catalog, list_pending(store, machine, disk.name, catalog), cfg)
    if p.gap_stalled:  # this run turned the gap into a resync request: say why, not only that
        stalls = [Stall(machine, "seq-gap", p.gap_stalled, disk=disk.name)]
    for stall in stalls:
        emit_machine_event(STALLED_EVENT, machine, epoch=catalog.epoch, payload=stall.payload())
    return DiskIngest(disk=disk.name, catalog_version=catalog.version, applied_seq=catalog.applied_seq(catalog.epoch),
                      accepted=[Outcome(key=i.key) for i in p.accepted],
                      accepted_bytes=sum(i.data_bytes for i in p.accepted),
                      rejected=[Outcome(key=k, detail=r) for k, r in p.rejected],
                      waiting=[Outcome(key=k, detail=w) for k, w in p.waiting], resync_from=catalog.resync_from,
                      stalled=[s.line() for s in stalls])


@flow(name="ingest", flow_run_name="ingest {machine}")
def ingest(machine: str, store: str | None = None, store_block: str | None = None) -> IngestResult:
    """Validate and accept the new extent logs of ``machine``; quarantine the bad ones."""
    st = resolve_store(store, store_block)
    cfg = load_machine(st, machine)
    result = IngestResult(machine=machine, disks=[ingest_disk(st, cfg, d) for d in cfg.disks])
    rows = [{"disk": d.disk, "log": o.key.rsplit("/", 1)[-1], "outcome": outcome, "detail": o.detail}
            for d in result.disks
            for outcome, items in (("accepted", d.accepted), ("rejected", d.rejected), ("waiting", d.waiting))
            for o in items]
    rows += [{"disk": d.disk, "log": "", "outcome": "stalled", "detail": line} for d in result.disks for line in d.stalled]
    if not rows:
        rows = [{"disk": d.disk, "log": "", "outcome": "nothing new", "detail": f"applied up to seq {d.applied_seq}"}
                for d in result.disks]
    create_table_artifact(rows, key=f"ingest-{machine.lower().replace('_', '-').replace('.', '-')}",
                          description=f"Extent logs of {machine} accepted and rejected by this ingest")
    return result
