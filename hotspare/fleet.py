"""The fleet: which protected machines of a store have work for a scheduled job.

Words used here:

- *job*: ``ingest`` (new extent logs to validate and accept) or ``consolidate`` (new logs,
  or accepted logs past a cut that no recovery point holds yet).
- *survey*: what one machine has waiting, read from its registration, each disk's newest
  catalog and a listing of its log prefixes. No log is opened, so a survey of a machine
  costs a few small GETs and one listing per disk epoch.

One scheduled run per job serves every machine: the flow surveys the store, then runs the
per-machine flow for each machine that has work. A machine protected after the deployment
is found by the next survey, so protecting needs no redeploy. A machine whose registration
or catalog cannot be read is reported with its reason and never stops the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hotspare.catalog import Catalog, catalog_logs, load_catalog
from hotspare.errors import HotspareError
from hotspare.catalog import list_pending
from hotspare.machine import list_machines, load_machine
from hotspare.store.base import Store

Job = Literal["ingest", "consolidate"]
JOBS: tuple[Job, ...] = ("ingest", "consolidate")


@dataclass(frozen=True)
class Survey:
    machine: str
    pending_logs: int = 0  # log objects that no catalog has accepted or refused yet
    unpointed_logs: int = 0  # accepted logs up to the newest cut, newer than the current point
    error: str = ""  # why the machine could not be surveyed (then it has no work)

    def has_work(self, job: Job) -> bool:
        if self.error:
            return False
        if job == "ingest":
            return self.pending_logs > 0
        return self.pending_logs > 0 or self.unpointed_logs > 0

    @property
    def summary(self) -> str:
        if self.error:
            return self.error
        return f"{self.pending_logs} new log(s), {self.unpointed_logs} accepted log(s) not in a point"


def lease_name(machine: str) -> str:
    """The name of the machine's concurrency limit (one slot): every scheduled job on the
    machine holds it, so two never work on one machine."""
    return f"hotspare-machine-{machine}"


def unpointed(store: Store, catalog: Catalog) -> int:
    """Accepted logs that a new recovery point would fold in: those after the current
    point up to the newest cut (points are made at cuts only)."""
    current = catalog.point("current")
    logs = catalog_logs(store, catalog, after=current.position if current else None)
    cuts = [i for i, lg in enumerate(logs) if lg.cut]
    return cuts[-1] + 1 if cuts else 0


def survey(store: Store, machine: str) -> Survey:
    """What ``machine`` has waiting; an unreadable registration or catalog becomes
    ``error`` (naming the object and the reason) instead of an exception."""
    try:
        cfg = load_machine(store, machine)
        pending = unpointed_logs = 0
        for disk in cfg.disks:
            catalog = load_catalog(store, machine, disk.name, disk.size)
            pending += len(list_pending(store, machine, disk.name, catalog))
            unpointed_logs += unpointed(store, catalog)
    except HotspareError as err:
        return Survey(machine, error=f"cannot survey machine {machine}: {err}")
    return Survey(machine, pending, unpointed_logs)


def survey_fleet(store: Store) -> list[Survey]:
    """A survey of every machine protected in ``store``, in name order."""
    return [survey(store, m) for m in sorted(list_machines(store))]


def with_work(surveys: list[Survey], job: Job) -> list[str]:
    if job not in JOBS:
        raise HotspareError(f"fleet job {job!r} is unknown: use one of {', '.join(JOBS)}")
    return [s.machine for s in surveys if s.has_work(job)]
