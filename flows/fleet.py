"""The fleet flows: one scheduled deployment per job serves every protected machine.

``fleet-ingest`` and ``fleet-consolidate`` survey the store (:mod:`hotspare.fleet`: the
machines with new logs, or with accepted logs no recovery point holds yet) and run the
per-machine ``ingest`` or ``consolidate`` flow as a subflow for each machine with work,
named after it ("ingest web1"), up to ``FLEET_PARALLEL`` machines at once. Each machine's
subflow runs while holding the machine's lease (a one-slot Prefect concurrency limit), so
two scheduled runs never work on one machine; a machine still busy after ``busy_wait``
seconds is skipped until the next run, so it holds up no other machine. A machine
protected after the deployment is in the next survey: no redeploy. A machine that fails,
or whose registration cannot be read, is reported in the table artifact and fails the
fleet run after every other machine has had its turn. Each run then refreshes the fleet view
(:mod:`hotspare.fleetview`, the ``hotspare-fleet`` table artifact).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.consolidate import consolidate
from flows.ingest import ingest
from hotspare import fleet as engine
from hotspare.errors import HotspareError
from tasks.fleet import MachineBusy, machine_lease, publish_fleet, survey_fleet

# Machines worked on at once by one fleet run; each machine's own flow maps its tasks too.
FLEET_PARALLEL = 8


class MachineRun(BaseModel):
    machine: str
    outcome: Literal["done", "busy", "failed", "unreadable", "nothing new"]
    detail: str = ""


@task(name="machine-job", task_run_name="{job} {machine}")
def machine_job(job: engine.Job, machine: str, store: str | None, store_block: str | None,
                policy_block: str | None, busy_wait: float) -> MachineRun:
    """Run the per-machine flow of ``job`` for ``machine`` under the machine's lease."""
    try:
        with machine_lease(machine, busy_wait):
            if job == "ingest":
                state = ingest(machine=machine, store=store, store_block=store_block, return_state=True)
            else:
                state = consolidate(machine=machine, store=store, store_block=store_block,
                                    policy_block=policy_block, return_state=True)
    except MachineBusy as err:
        get_run_logger().warning("%s", err)
        return MachineRun(machine=machine, outcome="busy", detail=str(err))
    if state.is_completed():
        return MachineRun(machine=machine, outcome="done", detail=f"{job} {machine}: {state.name}")
    return MachineRun(machine=machine, outcome="failed", detail=f"{job} {machine}: {state.message or state.name}")


def run_fleet(job: engine.Job, store: str | None, store_block: str | None, policy_block: str | None,
              busy_wait: float) -> list[MachineRun]:
    logger = get_run_logger()
    surveys = survey_fleet(store, store_block)
    todo = engine.with_work(surveys, job)
    logger.info("%d machine(s) protected, %d with %s work: %s", len(surveys), len(todo), job, ", ".join(todo) or "none")
    futures = [machine_job.submit(job, m, store, store_block, policy_block, busy_wait) for m in todo]
    runs = [f.result() for f in futures]
    runs += [MachineRun(machine=s.machine, outcome="unreadable", detail=s.error) for s in surveys if s.error]
    runs += [MachineRun(machine=s.machine, outcome="nothing new", detail=s.summary)
             for s in surveys if not s.error and s.machine not in todo]
    runs.sort(key=lambda r: r.machine)
    create_table_artifact([r.model_dump() for r in runs] or [{"machine": "", "outcome": "no machine protected",
                                                              "detail": ""}],
                          key=f"fleet-{job}", description=f"Machines covered by this fleet {job} run")
    publish_fleet(store, store_block)  # the fleet view (artifact hotspare-fleet), fresh after each run
    bad = [r for r in runs if r.outcome in ("failed", "unreadable")]
    if bad:
        raise HotspareError(f"fleet {job}: {len(bad)} of {len(runs)} machine(s) failed: "
                            + "; ".join(r.detail for r in bad))
    return runs


@flow(name="fleet-ingest", task_runner=ThreadPoolTaskRunner(max_workers=FLEET_PARALLEL))
def fleet_ingest(store: str | None = None, store_block: str | None = None, busy_wait: float = 30.0) -> list[MachineRun]:
    """Ingest the new extent logs of every protected machine that has some."""
    return run_fleet("ingest", store, store_block, None, busy_wait)


@flow(name="fleet-consolidate", task_runner=ThreadPoolTaskRunner(max_workers=FLEET_PARALLEL))
def fleet_consolidate(store: str | None = None, store_block: str | None = None, policy_block: str | None = None,
                      busy_wait: float = 30.0) -> list[MachineRun]:
    """Ingest and consolidate every protected machine with logs that no recovery point holds;
    ``policy_block`` overrides every machine's own policy."""
    return run_fleet("consolidate", store, store_block, policy_block, busy_wait)
