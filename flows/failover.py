"""The failover flow: confirm the machine is silent, get an approval (or apply the
auto-approve policy), fence its epoch, catch up the last logs, give every disk its backing,
launch the VM on all of them, verify it booted, start capturing its writes, record the
state, then pull the disks local in the background (block-stream) and record when no
backing is needed any more.

Each step is recorded in the machine's state chain, so a re-run after a crash continues
from the last committed step; the VM's work directory holds its handle, so a second launch
adopts the running VM instead of starting another.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed
from pydantic import BaseModel

from flows.approval import Approval, ApprovalRequest, ask_approval, machine_facts
from flows.consolidate import consolidate
from hotspare import failover as engine
from hotspare.errors import AlreadyExists, HotspareError, LostRace, MachineLive, Outcome, Refused, VmFailed
from hotspare.faults import crash_point
from hotspare.machine import load_machine
from hotspare.state import MachineState, commit_state, load_state
from hotspare.vm.host import VmSpec
from hotspare.vm.host import load_handle as load_vm_handle
from blocks.vmhost import resolve_vm_host
from tasks.common import resolve_store
from tasks.events import emit_machine_event
from tasks.failover import disk_backings, fence, launch_vm, stream_disks, wait_disks_local


class FailoverResult(BaseModel):
    machine: str
    outcome: Outcome
    message: str
    epoch: int | None = None
    vm_id: str | None = None
    accel: str | None = None
    marker: int | None = None
    disks_local: bool | None = None  # every disk streamed local: no backing (server) needed


SERIAL_TAIL = 20  # lines of the VM's serial console in the failover's console artifact


def _step(event: str, machine: str, state: MachineState, **payload) -> None:
    get_run_logger().info("%s: %s", event, payload or "")
    emit_machine_event(f"hotspare.failover.{event}", machine, epoch=state.epoch, payload=payload)


def _run_name() -> str:
    return f"failover {engine.machine_name(flow_run.parameters['machine'])}"


@flow(name="failover", flow_run_name=_run_name)
def failover(machine: str, store: str | None = None, store_block: str | None = None, approve: bool = False,
             vm_dir: str | None = None, expect_marker: bool = True, boot_timeout: float = 120.0,
             stream_timeout: float = 600.0):
    """Fail ``machine`` over to a VM booted from its replica (see the module docstring)."""
    machine = engine.machine_name(machine)
    logger = get_run_logger()
    st = resolve_store(store, store_block)
    cfg = load_machine(st, machine)
    policy = cfg.policy
    state = load_state(st, machine)
    workdir = engine.vm_dir(machine, vm_dir)

    if state.state == "failed-over":
        msg = f"{machine} is already failed over (epoch {state.epoch}, VM {state.vm and state.vm.get('vm_id')})"
        return Completed(message=msg, data=FailoverResult(machine=machine, outcome="already", message=msg))
    if state.state == "failing-back":
        raise Refused(f"{machine} is failing back; a failover now would fight it")
    if state.state == "protected":
        try:
            silence = engine.check_silent(st, cfg, state)
        except MachineLive as err:
            _step("refused", machine, state, reason=str(err))
            return Cancelled(message=str(err), data=FailoverResult(machine=machine, outcome="refused", message=str(err)))
        _step("silent", machine, state, detail=silence)
        if approve or policy.auto_approve:
            answer = Approval(decision="approve", by="policy" if policy.auto_approve else "operator (--approve)",
                              why="auto-approve" if policy.auto_approve else "approved when started")
        else:
            answer = ask_approval(ApprovalRequest(
                "failover", machine,
                f"**Fail over {machine}?** No heartbeat within its {policy.heartbeat_window} s window.",
                "Approving fences the machine's epoch, folds in the logs it shipped, and boots the newest point (the "
                "one above or newer) as a VM on the host above. Reject if the machine is only unreachable, not down.",
                policy.approval_timeout, epoch=state.epoch, facts=machine_facts(st, cfg, policy.host)))
        create_markdown_artifact(f"**Failover of {machine}**: {'approved' if answer.approve else 'rejected'} "
                                 f"by {answer.by or 'unknown'}: {answer.why or '(no reason given)'}",
                                 key=f"failover-approval-{artifact_slug(machine)}", description="failover approval")
        if not answer.approve:
            outcome = "timed-out" if answer.by == "timeout" else "rejected"
            msg = f"failover of {machine} {outcome.replace('-', ' ')} by {answer.by}: {answer.why}"
            _step(outcome, machine, state, by=answer.by, why=answer.why)
            return Cancelled(message=msg, data=FailoverResult(machine=machine, outcome=outcome, message=msg))
        # The machine may have come back while the operator decided.
        try:
            engine.check_silent(st, cfg, state)
        except MachineLive as err:
            return Cancelled(message=str(err), data=FailoverResult(machine=machine, outcome="refused", message=str(err)))
        try:
            state = commit_state(st, state.next(state="failing-over", step="approved", reason=silence,
                                                flow_run_id=str(flow_run.id), host=policy.host,
                                                approval=answer.model_dump()))
        except AlreadyExists:
            msg = f"another flow moved {machine} first; not failing over twice"
            return Cancelled(message=msg, data=FailoverResult(machine=machine, outcome="lost-race", message=msg))
    # state is failing-over: continue from its last step.
    old_epoch = state.epoch
    fence(st, machine, cfg.disks, old_epoch, f"failover run {flow_run.id}")
    _step("fenced", machine, state, epoch=old_epoch)
    consolidate(machine=machine, store=st.url if store_block is None else None, store_block=store_block)
    backings = disk_backings(st, machine, cfg.disks, workdir, policy.host)
    points = {vd.name: point for point, vd in backings}
    _step("materialised", machine, state, points=points)
    host = resolve_vm_host(policy.host)
    handle = launch_vm(policy.host, VmSpec(machine=machine, disks=[vd for _, vd in backings], cpus=policy.vm_cpus,
                                           memory_mib=policy.vm_memory_mib, workdir=workdir))
    crash_point("failover-after-launch")  # a re-run must adopt this VM, not start another
    try:
        state = _commit(st, state.next(step="launched", vm=handle.model_dump(mode="json")))
        _step("launched", machine, state, vm_id=handle.vm_id, accel=handle.accel)
        marker = host.wait_for_marker(handle, timeout=boot_timeout).counter if expect_marker else None
        status = host.status(handle)
        if status != "running":
            raise VmFailed(f"VM {handle.vm_id} of {machine} is {status}, not running")
        shot = host.screendump(handle, workdir / "screen.png")
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(Path(shot).read_bytes()).decode(),
                              key=f"failover-screen-{artifact_slug(machine)}",
                              description=f"{machine}'s VM screen after boot")
        console = host.serial_log(handle).splitlines()[-SERIAL_TAIL:]
        create_markdown_artifact(f"**{machine}'s serial console after boot** (last {len(console)} lines of VM "
                                 f"{handle.vm_id})\n\n```\n" + "\n".join(console) + "\n```",
                                 key=f"failover-console-{artifact_slug(machine)}",
                                 description=f"{machine}'s VM serial console after boot")
        engine.start_capture(st.url, workdir, epoch=old_epoch + 1, docker_url=getattr(host, "base_url", None))
        state = _commit(st, state.next(state="failed-over", step="verified", epoch=old_epoch + 1))
    except BaseException as err:
        # A VM that failed its checks never became the machine's truth, and must not keep
        # running unseen: stop its capture (if it started) and the VM, and say so in the state.
        stopped = engine.stop_failed_vm(host, handle, workdir)
        state = load_state(st, machine)
        if state.state == "failing-over":
            with contextlib.suppress(AlreadyExists):
                state = commit_state(st, state.next(step="boot-failed", vm=None, reason=f"{type(err).__name__}: {err}"))
        _step("boot-failed", machine, state, vm_id=handle.vm_id, error=str(err), stopped=stopped)
        if isinstance(err, LostRace):
            raise
        if isinstance(err, Exception):
            raise VmFailed(f"failover of {machine}: VM {handle.vm_id} was launched, then failed: {err}. "
                                f"{stopped}. {machine} stays fenced (state failing-over): fix the cause and run "
                                f"the failover again") from err
        raise
    _step("failed-over", machine, state, vm_id=handle.vm_id, accel=handle.accel, marker=marker)
    disks_local = _pull_disks_local(st, state, policy.host, handle, stream_timeout)
    create_table_artifact([{"machine": machine, "points": ", ".join(f"{d}: {p}" for d, p in points.items()),
                            "disks local": disks_local, "new epoch": old_epoch + 1, "host": policy.host,
                            "VM": handle.vm_id, "accel": handle.accel, "QMP status": status,
                            "guest marker": marker if marker is not None else "", "VM dir": str(workdir),
                            "serial console (last line)": console[-1] if console else ""}],
                          key=f"failover-{artifact_slug(machine)}", description=f"Failover of {machine}")
    logger.info("%s failed over: VM %s (%s), epoch %d", machine, handle.vm_id, handle.accel, old_epoch + 1)
    return FailoverResult(machine=machine, outcome="failed-over", message=f"{machine} runs as VM {handle.vm_id}",
                          epoch=old_epoch + 1, vm_id=handle.vm_id, accel=handle.accel, marker=marker,
                          disks_local=disks_local)


def _pull_disks_local(st, state: MachineState, host_kind: str, handle, timeout: float) -> bool:
    """Wait for the VM's disks to stream local (the VM serves meanwhile); when all are, the
    state's handle says no backing is needed, so their servers may stop. A stream that
    fails or outlasts ``timeout`` leaves the VM serving on its backings: logged, not fatal."""
    logger = get_run_logger()
    try:
        stream_disks(host_kind, handle)
        status = wait_disks_local(host_kind, handle, timeout)
    except HotspareError as err:
        logger.warning("%s: pulling the disks local failed: %s; the VM keeps reading its backings", state.machine, err)
        return False
    done = all(s.done for s in status)
    if not done:
        logger.warning("%s: disks not local after %.0f s (%s); the streams go on in QEMU", state.machine, timeout,
                       ", ".join(f"{s.disk} {100 * s.fraction:.0f}%" for s in status))
        return False
    current = load_vm_handle(handle.workdir) or handle
    with contextlib.suppress(AlreadyExists):
        commit_state(st, state.next(step="disks-local", vm=current.model_dump(mode="json")))
    stopped = engine.stop_servers(Path(handle.workdir), current)
    _step("disks-local", state.machine, state, disks=[s.disk for s in status], servers_stopped=stopped)
    return True


def _commit(st, state: MachineState) -> MachineState:
    try:
        return commit_state(st, state)
    except AlreadyExists:
        raise LostRace(f"{state.machine}'s state moved under this failover (another flow?); stopping") from None


def artifact_slug(machine: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in machine.lower())
