"""The drill flow: boot a recovery point of a machine in an isolated VM (no network,
throw-away overlays over the served point), wait for the policy's boot evidence, publish
the screen and a table, commit the verdict into the catalog, and emit
``hotspare.drill.verified`` or ``hotspare.drill.failed`` (resource
``hotspare.machine.<machine>``) for automations and notifications. A failed drill fails
the run with the reason. Without a machine, every protected machine is drilled in turn,
each as its own subflow run ("drill web1"), which is what the daily deployment does.

The engine (:mod:`hotspare.drill`) tears the VM and its servers down whatever happens, and
a drill killed before it could cleans up at the start of the next one. Two drills of one
machine never run at once: each holds the machine's drill lease (:mod:`tasks.drill`).
"""

from __future__ import annotations

import base64

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.failover import artifact_slug
from hotspare import drill as engine
from hotspare.consolidate.export import parse_at
from hotspare.errors import HotspareError
from hotspare.failover import machine_name
from hotspare.machine import list_machines, load_machine
from tasks.common import resolve_store
from tasks.drill import DrillBusy, boot_point, drill_lease, record_verdict
from tasks.events import emit_machine_event


class DrillResult(BaseModel):
    machine: str
    verdict: str  # verified, failed, untested, busy
    message: str
    points: dict[str, str] = {}
    seconds: float | None = None
    reason: str = ""
    vm_id: str = ""


def _run_name() -> str:
    m = flow_run.parameters.get("machine")
    return f"drill {machine_name(m)}" if m else "drill every machine"


@flow(name="drill", flow_run_name=_run_name)
def drill(machine: str | None = None, store: str | None = None, store_block: str | None = None,
          point: str | None = None, at: str | None = None, vm_dir: str | None = None,
          boot_timeout: float | None = None, busy_wait: float = 300.0) -> DrillResult | list[DrillResult]:
    """Drill ``machine``'s point (``point`` id, or the newest at or before ``at``, an ISO
    time, or the newest), or the newest point of every machine when ``machine`` is None."""
    if machine is None:
        return _drill_all(store, store_block, vm_dir, boot_timeout, busy_wait)
    machine = machine_name(machine)
    logger = get_run_logger()
    st = resolve_store(store, store_block)
    cfg = load_machine(st, machine)
    when = parse_at(at)
    with drill_lease(machine, busy_wait):
        outcome = boot_point(st, cfg, engine.drill_dir(machine, vm_dir), point, when, boot_timeout)
        if outcome.cleaned:
            logger.warning("%s: a dead drill had left: %s", machine, "; ".join(outcome.cleaned))
        committed = record_verdict(st, cfg, outcome.points, outcome.verdict)
    v = outcome.verdict
    slug = artifact_slug(machine)
    if outcome.screen:
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(outcome.screen).decode(),
                              key=f"drill-screen-{slug}",
                              description=f"{machine}'s drilled VM screen ({v.verdict})")
    create_table_artifact([{"machine": machine, "disk": d, "point": p, "verdict": v.verdict,
                            "boot seconds": "" if v.seconds is None else f"{v.seconds:.1f}",
                            "reason": v.reason, "VM": outcome.vm_id, "accel": outcome.accel,
                            "catalog version": "" if committed.get(d) is None else committed[d],
                            "host": cfg.policy.host} for d, p in outcome.points.items()],
                          key=f"drill-{slug}", description=f"Drill of {machine}")
    emit_machine_event(f"hotspare.drill.{v.verdict}", machine,
                       payload={"points": outcome.points, "seconds": v.seconds, "reason": v.reason,
                                "vm_id": outcome.vm_id, "flow_run_id": str(flow_run.id)})
    result = DrillResult(machine=machine, verdict=v.verdict, message=outcome.message, points=outcome.points,
                         seconds=v.seconds, reason=v.reason, vm_id=outcome.vm_id)
    if not outcome.ok:
        raise engine.DrillFailed(outcome.message)
    logger.info("%s", outcome.message)
    return result


def _drill_all(store: str | None, store_block: str | None, vm_dir: str | None, boot_timeout: float | None,
               busy_wait: float) -> list[DrillResult]:
    """Drill every protected machine's newest point, one after the other (a drill boots a
    VM; the host's cores are better spent on one at a time), and fail if any failed."""
    st = resolve_store(store, store_block)
    results = []
    for m in sorted(list_machines(st)):
        try:
            results.append(drill(machine=m, store=store, store_block=store_block, vm_dir=vm_dir,
                                 boot_timeout=boot_timeout, busy_wait=busy_wait))
        except DrillBusy as err:
            results.append(DrillResult(machine=m, verdict="busy", message=str(err)))
        except HotspareError as err:
            results.append(DrillResult(machine=m, verdict="failed", message=str(err), reason=str(err)))
    create_table_artifact([{"machine": r.machine, "verdict": r.verdict, "points": ", ".join(f"{d} {p}" for d, p in
                                                                                          r.points.items()),
                            "boot seconds": "" if r.seconds is None else f"{r.seconds:.1f}", "detail": r.message}
                           for r in results] or [{"machine": "", "verdict": "no machine protected"}],
                          key="drill-fleet", description="Drills of every protected machine")
    bad = [r for r in results if r.verdict not in ("verified", "busy")]
    if bad:
        raise HotspareError(f"drill: {len(bad)} of {len(results)} machine(s) not verified: "
                            + "; ".join(r.message for r in bad))
    return results
