"""The failback flow: bring the returning machine's disk to the replica's state while the
VM serves, cut over with only the last deltas, verify every block, resume protection.

The phases, their orders to the restoring agent and what each commits in the machine's
state are the engine's (``hotspare.failback.controller``). This flow runs them one by one
and gives them Prefect: tasks with retries for publishing orders and hashing the replica,
the wait for the agent with a progress artifact, the ingest and consolidate flows, the
cut-over approval (a RunInput showing the remaining bytes and the estimated downtime;
auto-approve per policy; a rejection or timeout leaves the VM serving), the VM stop through
the machine's VM host block, ``hotspare.failback.<step>`` events and the artifacts (the
plan, the approval, the verification, the summary).

A re-run after a crash continues where the last run stopped and never stops the VM twice.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed

from blocks.vmhost import resolve_vm_host
from flows.approval import ApprovalRequest, ask_approval, machine_facts
from flows.consolidate import consolidate
from flows.failover import artifact_slug
from flows.ingest import ingest
from hotspare import failover as engine
from hotspare.failback.controller import CutOverRequest, FailbackController, FailbackSteps
from hotspare.failback.model import CutOverAnswer, FailbackResult
from hotspare.machine import MachineConfig, load_machine
from hotspare.state import MachineState, load_state
from hotspare.store import Store
from hotspare.vm.host import VmHandle
from tasks.common import resolve_store
from tasks.events import emit_machine_event
from tasks.failback import hash_replica, publish, publish_apply, wait_for_agent

__all__ = ["FailbackResult", "failback"]


def _run_name() -> str:
    return f"failback {engine.machine_name(flow_run.parameters['machine'])}"


@flow(name="failback", flow_run_name=_run_name)
def failback(machine: str, store: str | None = None, store_block: str | None = None, approve: bool = False,
             target_disk: dict[str, str] | None = None, vm_dir: str | None = None, agent_timeout: float = 1800,
             catch_up_bytes: int = 64 << 20, max_catch_up: int = 3):
    """Fail ``machine`` back from its VM onto its own (or a replacement) disk; see the module docstring."""
    machine = engine.machine_name(machine)
    st = resolve_store(store, store_block)
    cfg = load_machine(st, machine)
    state = load_state(st, machine)
    workdir = engine.vm_dir(machine, vm_dir)
    run = FailbackController(st, cfg, state, _steps(st, cfg, state, store_block, workdir), run_id=str(flow_run.id),
                             workdir=workdir, agent_timeout=agent_timeout, approve=approve,
                             catch_up_bytes=catch_up_bytes, max_catch_up=max_catch_up)
    result = run.start(target_disk)
    while result is None:
        result = run.step()
    if result.outcome == "failed-back":
        return result
    return (Completed if result.outcome == "already" else Cancelled)(message=result.message, data=result)


def _steps(st: Store, cfg: MachineConfig, state: MachineState, store_block: str | None, workdir: Path) -> FailbackSteps:
    machine, vm_epoch = cfg.name, state.epoch
    params = {"machine": machine, "store": st.url if store_block is None else None, "store_block": store_block}
    slug = artifact_slug(machine)

    def ask_cutover(req: CutOverRequest) -> CutOverAnswer:
        vm = (state.vm or {}).get("vm_id", "?")
        answer = ask_approval(ApprovalRequest(
            "failback", machine, f"**Cut over {machine} to its own disk?** Phase one is applied; "
            f"{req.remaining} bytes changed on the VM since.",
            f"Approving stops the VM (estimated downtime {req.estimate:.0f} s: the VM's last writes, phase two and a "
            "block-for-block verification). Rejecting leaves the VM serving.", req.timeout,
            mode="restore", epoch=vm_epoch - 1,
            facts=[*machine_facts(st, cfg, f"{state.host or 'local'} (VM {vm})"),
                   ("Bytes to move at cut-over", str(req.remaining)), ("Estimated downtime", f"{req.estimate:.0f} s")]))
        return CutOverAnswer.model_validate(answer.model_dump())

    def stop_vm(handle: VmHandle) -> int:
        host = resolve_vm_host(state.host or "local")
        return len(engine.ship_last_writes(st, cfg, handle, host, workdir, vm_epoch))

    def key(name: str) -> str:
        return "-".join(["failback", *([name] if name else []), slug])

    return FailbackSteps(
        wait=wait_for_agent, ingest=lambda: ingest(**params), consolidate=lambda: consolidate(**params),
        ask_cutover=ask_cutover, stop_vm=stop_vm, publish_apply=publish_apply, publish=publish,
        hash_replica=hash_replica, log=get_run_logger(),
        event=lambda name, payload: emit_machine_event(f"hotspare.failback.{name}", machine, mode="restore",
                                                       epoch=vm_epoch - 1, payload=payload),
        table=lambda name, rows, description: create_table_artifact(rows, key=key(name), description=description),
        note=lambda name, text, description: create_markdown_artifact(text, key=key(name), description=description))
