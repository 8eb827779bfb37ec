"""What ``hotspare status`` reports for one machine, as plain data (``status --json`` prints
it as it is): the state and its phase, the last heartbeat (age, clock skew, mode, a stall
the agent lived through), per disk the newest point and the replication lag, the VM's
live health, the newest drill verdicts, and every stall (:mod:`hotspare.stall`) with the
line that explains it."""

from __future__ import annotations

from typing import Any

from hotspare.catalog import catalog_logs, load_catalog
from hotspare.catalog.model import utcnow
from hotspare.drill import last_drills
from hotspare.fleetview import vm_health
from hotspare.heartbeat import SKEW_REPORTED, load_heartbeat
from hotspare.machine import load_machine
from hotspare.stall import machine_stalls
from hotspare.state import load_state
from hotspare.store.base import Store


def machine_status(st: Store, machine: str) -> dict[str, Any]:
    """One machine's status (see the module's docstring)."""
    cfg = load_machine(st, machine)
    state = load_state(st, machine)
    hb = load_heartbeat(st, machine)
    disks = {}
    cats = {d.name: load_catalog(st, machine, d.name, d.size) for d in cfg.disks}
    stalls = machine_stalls(st, cfg, state.state, hb, cats)
    for d in cfg.disks:
        cat = cats[d.name]
        cur = cat.point("current")
        disks[d.name] = {
            "size": d.size, "catalog_version": cat.version, "applied_seq": cat.applied_seq(cat.epoch),
            "newest_point": cur.id if cur else None, "newest_point_time": cur.time.isoformat() if cur else None,
            "lag_seconds": round(max(0.0, (utcnow() - cur.time).total_seconds()), 1) if cur else None,
            "logs_not_consolidated": (len(catalog_logs(st, cat, after=cur.position)) if cur else cat.log_count),
            "logs_accepted": cat.log_count, "manifests": len(cat.manifests),
            "fenced_epochs": [f.epoch for f in cat.fences],
            "capture": hb.disks.get(d.name) if hb else None,  # tracker, served (where), consistent
        }
    return {
        "machine": machine, "state": state.state, "epoch": state.epoch,
        "since": (state.at if state.version else cfg.created_at).isoformat(),
        "phase": state.phase or None, "host": state.host, "vm": state.vm,
        "vm_health": vm_health(state),  # the VM's QMP status and its capture, checked now
        "heartbeat": None if hb is None else {"time": hb.time.isoformat(), "age_seconds": round(hb.age, 1),
                                              "received": hb.received_at.isoformat() if hb.received_at else None,
                                              "clock_skew_seconds": None if hb.skew is None else round(hb.skew, 1),
                                              "clock_skewed": hb.skew is not None and abs(hb.skew) > SKEW_REPORTED,
                                              "mode": hb.mode, "epoch": hb.epoch,
                                              "fresh": hb.age <= cfg.policy.heartbeat_window,
                                              "restore": hb.restore.model_dump(mode="json") if hb.restore else None,
                                              # a stall the agent lived through and reported once past it
                                              "last_stall": hb.last_stall},
        "policy": cfg.policy.model_dump(), "disks": disks, "drill": drill_status(last_drills(cats)),
        "stalled": bool(stalls), "stalls": [dict(x.payload(), line=x.line()) for x in stalls],
    }


def drill_status(found: dict) -> dict[str, Any]:
    """The newest drills of a machine's points (:func:`hotspare.drill.last_drills`) as plain data."""
    last, ok = found["last"], found["last_success"]
    return {"drilled": last is not None, "newest_verified_point": found["newest_verified_point"],
            "last_success": ok.isoformat() if ok else None,
            "last_success_age_seconds": round((utcnow() - ok).total_seconds(), 1) if ok else None,
            "last_verdict": last.verdict if last else None, "last_point": found["last_point"],
            "last_reason": last.reason if last else None}
