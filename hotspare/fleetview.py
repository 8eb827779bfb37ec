"""The fleet at a glance: one row per protected machine, as ``hotspare status`` shows it and
the fleet runs publish it (the ``hotspare-fleet`` table artifact in the UI).

Words used here:

- *heartbeat age*: seconds since the store received the machine's last heartbeat.
- *replica lag*: seconds since the newest recovery point of the machine's slowest disk
  (the data a failover now would lose, at most).
- *VM health*: for a machine with a launched VM, what its hypervisor says now (QMP
  ``query-status`` through the VM's host: ``running``, ``paused``, ``gone``...) and whether
  the process capturing the VM's writes is alive. A VM or a capture that should be up and
  is not is *dead*; the publishers emit an event for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hotspare.catalog import load_catalog
from hotspare.catalog.model import utcnow
from hotspare.errors import HotspareError
from hotspare.heartbeat import load_heartbeat
from hotspare.machine import list_machines, load_machine
from hotspare.state import MachineState, load_state
from hotspare.store.base import Store

ARTIFACT_KEY = "hotspare-fleet"
VM_DEAD = "hotspare.machine.vm-dead"
CAPTURE_DEAD = "hotspare.machine.capture-dead"
HOST_OF_KIND = {"local-qemu": "local", "docker-qemu": "docker", "ec2": "ec2"}


def vm_health(state: MachineState) -> dict[str, Any] | None:
    """The live status of ``state``'s VM and of its capture, or None without a VM."""
    from hotspare import failover as fo
    from hotspare.vm.host import VmHandle

    if not state.vm:
        return None
    handle = VmHandle.model_validate(state.vm)
    try:  # the handle's host kind names the built-in host to ask, even behind a VM host block
        status = fo.vm_host(HOST_OF_KIND.get(handle.host, handle.host)).status(handle)
    except (HotspareError, OSError) as err:
        status = f"unknown ({err})"
    # The VM's writes are captured while it is the machine's truth: failed over, and
    # failing back until the cut-over stops it.
    capture_expected = state.state == "failed-over" or (state.state == "failing-back" and state.phase == "phase-one")
    pid = fo.capture_pid(Path(handle.workdir))
    return {"vm_id": handle.vm_id, "host": state.host or handle.host, "status": status,
            "running": status == "running", "capture": "alive" if pid else ("dead" if capture_expected else "off"),
            "capture_pid": pid}


def _age(t) -> float:
    return round(max(0.0, (utcnow() - t).total_seconds()), 1)


def fleet_row(st: Store, machine: str) -> dict[str, Any]:
    """One machine's row; an unreadable machine becomes a row that says why."""
    try:
        cfg = load_machine(st, machine)
        state = load_state(st, machine)
        hb = load_heartbeat(st, machine)
        lag: float | None = 0.0
        newest = None
        for d in cfg.disks:
            cat = load_catalog(st, machine, d.name, d.size)
            cur = cat.point("current")
            lag = None if cur is None or lag is None else max(lag, _age(cur.time))
            pts = sorted((p for p in cat.points if p.consistent), key=lambda p: p.position)
            if d is cfg.disks[0] and pts:
                newest = pts[-1]
        vm = vm_health(state)
    except HotspareError as err:
        return {"machine": machine, "state": "unreadable", "heartbeat age (s)": "", "replica lag (s)": "",
                "newest consistent point": "", "point age (s)": "", "VM": "", "VM status": "", "capture": "",
                "problem": str(err)}
    problems = []
    if hb is not None and hb.age > cfg.policy.heartbeat_window and state.state == "protected":
        problems.append("heartbeat silent")
    if vm and vm["status"] != "running" and state.state in ("failed-over", "failing-back"):
        problems.append(f"VM {vm['status']}")
    if vm and vm["capture"] == "dead":
        problems.append("capture dead")
    return {"machine": machine, "state": state.state + (f" ({state.phase})" if state.phase else ""),
            "heartbeat age (s)": "never" if hb is None else round(hb.age, 1),
            "replica lag (s)": "no point" if lag is None else lag,
            "newest consistent point": newest.id if newest else "none",
            "point age (s)": _age(newest.time) if newest else "",
            "VM": f"{vm['host']}:{vm['vm_id']}" if vm else "", "VM status": vm["status"] if vm else "",
            "capture": vm["capture"] if vm else "", "problem": ", ".join(problems)}


def fleet_rows(st: Store) -> list[dict[str, Any]]:
    return [fleet_row(st, m) for m in sorted(list_machines(st))]


def dead(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(event, machine, detail) for each dead VM or capture in ``rows``."""
    out = []
    for r in rows:
        if r["VM"] and r["VM status"] != "running" and r["state"].split(" ")[0] in ("failed-over", "failing-back"):
            out.append((VM_DEAD, r["machine"], f"VM {r['VM']} is {r['VM status']}"))
        if r["capture"] == "dead":
            out.append((CAPTURE_DEAD, r["machine"], f"the capture of VM {r['VM']} is not running"))
    return out
