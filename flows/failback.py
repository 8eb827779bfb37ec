"""The failback flow: bring the returning machine's disk to the replica's state while the
VM serves, cut over with only the last deltas, verify every block, resume protection.

1. plan: the byte ranges to move are the VM epoch's writes, the machine's divergence (its
   unshipped writes) and its late logs, all taking the replica's content; when one of them
   cannot be known (or with ``target_disk``, replacement hardware) every block of the disk
   is compared with the replica instead. A table artifact shows them.
2. phase one, the VM still serving: apply the replica's content at point T1, then short
   catch-up rounds while the remaining delta exceeds ``catch_up_bytes``.
3. cut-over approval (a RunInput showing the remaining bytes and the estimated downtime;
   auto-approve per policy; a rejection or timeout leaves the VM serving).
4. cut-over: stop the VM with its last writes shipped; phase two applies only what changed
   after the last applied point.
5. verify: the agent hashes every block; any difference from the replica fails the run with
   the block's offset and keeps the fence (a re-run repairs and verifies again).
6. finish: fence the VM epoch (a new epoch begins), the agent adopts the verified hash map
   and returns to normal protection, the VM's files are removed.

Every step is recorded in the machine's state (``failing-back`` with ``phase``) and every
order is idempotent by its label, so a re-run after a crash continues where it stopped and
never stops the VM twice.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed
from pydantic import BaseModel

from blocks.vmhost import resolve_vm_host
from flows.approval import Approval, ApprovalRequest, ask_approval, machine_facts
from flows.consolidate import consolidate
from flows.failover import artifact_slug
from flows.ingest import ingest
from hotspare import failover as engine
from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.catalog.model import utcnow
from hotspare.errors import AlreadyExists, HotspareError, LostRace, Outcome, UsageError
from hotspare.failback import ranges as rg
from hotspare.failback.content import differing_ranges
from hotspare.failback.orders import Order, RestoreProgress, applied_upto, bytes_per_phase, load_orders
from hotspare.failback.plan import Position, phase_one_sources, read_hashes, replica_changes
from hotspare.faults import crash_point
from hotspare.fence import ReplicaMoved, fence_disk
from hotspare.machine import DiskSpec, MachineConfig, load_machine, save_machine
from hotspare.state import MachineState, commit_state, load_state
from hotspare.store import Store
from hotspare.vm.host import VmHandle
from hotspare.vm.qemu.capture import VmCapture
from tasks.common import resolve_store
from tasks.events import emit_machine_event
from tasks.failback import find_order, hash_replica, publish, publish_apply, restore_progress, wait_for_agent

DEFAULT_RATE = 100e6  # bytes/s assumed for estimates until the agent has measured its own
VM_STOP_SECONDS = 5.0


class FailbackResult(BaseModel):
    machine: str
    outcome: Outcome
    message: str
    epoch: int | None = None
    bytes_moved: dict[str, int] = {}
    downtime_s: float | None = None
    verified_blocks: int | None = None
    verify_read_bytes: int | None = None  # what the downtime's verification read of the machine's disk


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
    if state.state == "protected":
        done = state.step == "failed-back"
        if done:  # a run killed after its last commit: the VM's last writes may wait for a point (idempotent)
            consolidate(machine=machine, store=st.url if store_block is None else None, store_block=store_block)
        msg = f"{machine} is protected in epoch {state.epoch}: " + ("its failback is finished" if done else "nothing to fail back")
        return (Completed if done else Cancelled)(
            message=msg, data=FailbackResult(machine=machine, outcome="already" if done else "refused", message=msg))
    if state.state == "failing-over":
        msg = f"{machine} is failing over; fail back once it has failed over"
        return Cancelled(message=msg, data=FailbackResult(machine=machine, outcome="refused", message=msg))
    run = _Failback(st, cfg, state, store_block=store_block, vm_dir=vm_dir, agent_timeout=agent_timeout)
    if state.phase != "finish" and restore_progress(st, machine, state.epoch, run.silence) is None:
        msg = (f"{machine}'s agent is not reporting in restore mode: run `hotspare agent {machine} --restore` on "
               "the machine (the VM keeps serving)")
        run.event("refused", reason=msg)
        return Cancelled(message=msg, data=FailbackResult(machine=machine, outcome="refused", message=msg))
    targets = _targets(cfg, target_disk, state)
    try:
        if state.state == "failed-over":
            run.state = commit_state(st, state.next(state="failing-back", phase="phase-one", step="started",
                                                    flow_run_id=str(flow_run.id),
                                                    failback={"targets": targets, "round": 0}))
        elif state.flow_run_id != str(flow_run.id):
            run.state = commit_state(st, state.next(flow_run_id=str(flow_run.id)))
    except AlreadyExists:
        msg = f"another flow moved {machine} first; not failing back twice"
        return Cancelled(message=msg, data=FailbackResult(machine=machine, outcome="lost-race", message=msg))
    run.targets = run.state.failback.get("targets", {}) if run.state.failback else {}

    while True:
        phase = run.state.phase
        if phase == "phase-one":
            answer = run.phase_one(approve, catch_up_bytes, max_catch_up)
            if not answer.approve:
                outcome = "timed-out" if answer.by == "timeout" else "rejected"
                msg = (f"cut-over of {machine} {outcome.replace('-', ' ')} by {answer.by}: {answer.why}; the VM keeps "
                       "serving and the machine stays in restore mode (re-run the failback to try again)")
                run.commit(step=f"cut-over {outcome}")
                run.event(outcome, by=answer.by, why=answer.why)
                return Cancelled(message=msg, data=FailbackResult(machine=machine, outcome=outcome, message=msg))
        elif phase == "cut-over":
            run.cut_over()
        elif phase == "phase-two":
            run.phase_two()
        elif phase == "verify":
            run.verify()
        elif phase == "finish":
            if (result := run.finish()) is not None:
                return result
        else:
            raise HotspareError(f"{machine}'s state has an unknown failback phase {phase!r}")


def _targets(cfg: MachineConfig, target_disk: dict[str, str] | None, state: MachineState) -> dict[str, str]:
    names = {d.name for d in cfg.disks}
    for name in target_disk or {}:
        if name not in names:
            raise UsageError(f"--target-disk {name}=...: {cfg.name} has no disk {name!r} (disks: {', '.join(sorted(names))})")
    recorded = (state.failback or {}).get("targets") if state.state == "failing-back" else None
    if recorded is not None and target_disk and target_disk != recorded:
        raise UsageError(f"{cfg.name}'s failback already runs with target disks {recorded}; finish it first")
    return dict(target_disk or recorded or {})


class _Failback:
    """One failback run's context and phases (each ends by committing the next phase)."""

    def __init__(self, st: Store, cfg: MachineConfig, state: MachineState, *, store_block: str | None,
                 vm_dir: str | None, agent_timeout: float) -> None:
        self.st, self.cfg, self.state = st, cfg, state
        self.machine = cfg.name
        self.vm_epoch = state.epoch
        self.store_block = store_block
        self.workdir = engine.vm_dir(cfg.name, vm_dir)
        self.agent_timeout = agent_timeout
        self.silence = max(60.0, 3.0 * cfg.policy.heartbeat_window)
        self.targets: dict[str, str] = {}
        self.log = get_run_logger()

    # -- bookkeeping ------------------------------------------------------------------------
    def event(self, name: str, **payload) -> None:
        self.log.info("%s: %s", name, payload or "")
        emit_machine_event(f"hotspare.failback.{name}", self.machine, mode="restore", epoch=self.vm_epoch - 1,
                           payload=payload)

    def commit(self, fb: dict | None = None, **changes) -> MachineState:
        if fb:
            changes["failback"] = {**(self.state.failback or {}), **fb}
        try:
            self.state = commit_state(self.st, self.state.next(**changes))
        except AlreadyExists:
            raise LostRace(f"{self.machine}'s state moved under this failback (another run?); stopping") from None
        return self.state

    def orders(self) -> list[Order]:
        return load_orders(self.st, self.machine, self.vm_epoch)

    def wait(self, order: Order) -> RestoreProgress:
        return wait_for_agent(self.st, self.machine, order, self.agent_timeout, self.silence)

    def progress(self) -> RestoreProgress:
        p = restore_progress(self.st, self.machine, self.vm_epoch, self.silence)
        if p is None:
            raise HotspareError(f"{self.machine}'s agent stopped reporting in restore mode; restart it with --restore")
        return p

    def _store_params(self) -> dict:
        return {"machine": self.machine, "store": self.st.url if self.store_block is None else None,
                "store_block": self.store_block}

    def consolidated(self) -> dict[str, Position]:
        """Each disk's newest recovery point after a consolidation (phase one's T1)."""
        consolidate(**self._store_params())
        out = {}
        for d in self.cfg.disks:
            point = load_catalog(self.st, self.machine, d.name, d.size).point("current")
            if point is None:
                raise HotspareError(f"{self.machine}/{d.name} has no consolidated point to fail back from")
            out[d.name] = point.position
        return out

    def applied(self) -> dict[str, Position]:
        """Each disk's newest accepted position of the VM epoch, after an ingest (no
        consolidation: the content comes from the last point plus the logs after it)."""
        ingest(**self._store_params())
        return {d.name: (self.vm_epoch, load_catalog(self.st, self.machine, d.name, d.size).applied_seq(self.vm_epoch))
                for d in self.cfg.disks}

    def last_upto(self, disk: str) -> tuple[int, int]:
        upto = applied_upto(self.orders(), disk)
        if upto is None:
            raise HotspareError(f"no failback order of {self.machine} has applied {disk} yet")
        return upto

    def replica_hashes(self, disk: DiskSpec, upto: Position) -> np.ndarray:
        return hash_replica(self.st, self.machine, self.vm_epoch, disk, upto)

    def compare(self, label: str, uptos: dict[str, Position], disks: list[str]) -> dict[str, rg.Ranges]:
        """The ranges where the machine's disks differ from the replica at ``uptos``: the
        agent hashes every block, the replica is hashed here."""
        specs = [d for d in self.cfg.disks if d.name in disks]
        order = publish(self.st, self.machine, self.vm_epoch, label, "scan", specs, self.targets)
        self.wait(order)
        return {d.name: _differing(self.st, _scan_key(order, d.name), d, self.replica_hashes(d, uptos[d.name]))
                for d in specs}

    def changes_since_applied(self, uptos: dict[str, Position], label: str) -> dict[str, rg.Ranges]:
        moves: dict[str, rg.Ranges | None] = {}
        for d in self.cfg.disks:
            cat = load_catalog(self.st, self.machine, d.name, d.size)
            moves[d.name] = replica_changes(self.st, cat, self.last_upto(d.name), uptos[d.name])
        return self._known(moves, uptos, label)

    def _known(self, moves: dict[str, rg.Ranges | None], uptos: dict[str, Position], label: str) -> dict[str, rg.Ranges]:
        unknown = [name for name, r in moves.items() if r is None]
        if unknown:
            self.log.info("%s: changed ranges unknown for %s; comparing every block", label, ", ".join(unknown))
            moves.update(self.compare(f"compare-{label}", uptos, unknown))
        return moves  # type: ignore[return-value]

    # -- phases -------------------------------------------------------------------------------
    def plan(self, uptos: dict[str, Position]) -> dict[str, rg.Ranges]:
        progress = self.progress()
        moves: dict[str, rg.Ranges | None] = {}
        rows = []
        for d in self.cfg.disks:
            if d.name in self.targets:
                moves[d.name] = None
                rows.append({"disk": d.name, "source": f"replacement disk {self.targets[d.name]}: every block that "
                             "differs", "blocks": "", "bytes": ""})
                continue
            cat = load_catalog(self.st, self.machine, d.name, d.size)
            sources = phase_one_sources(self.st, cat, d, uptos[d.name], progress.divergence.get(d.name))
            for name, r in sources.items():
                rows.append({"disk": d.name, "source": name, "blocks": "unknown" if r is None else rg.blocks(r, d.block_size),
                             "bytes": "unknown: every block compared" if r is None else rg.total(r)})
            moves[d.name] = None if any(r is None for r in sources.values()) else rg.union(*sources.values())
        known = self._known(moves, uptos, "phase-1")
        rate = progress.apply_rate or DEFAULT_RATE
        for d in self.cfg.disks:
            r = known[d.name]
            rows.append({"disk": d.name, "source": "to move (union, replica's content)",
                         "blocks": rg.blocks(r, d.block_size), "bytes": rg.total(r)})
        total = sum(rg.total(r) for r in known.values())
        rows.append({"disk": "all", "source": f"estimated phase one at {rate / 1e6:.0f} MB/s"
                     + ("" if progress.apply_rate else " (assumed, not yet measured)"),
                     "blocks": "", "bytes": f"{total} bytes, {total / rate:.1f} s"})
        create_table_artifact(rows, key=f"failback-plan-{artifact_slug(self.machine)}", description=f"Failback plan of {self.machine}")
        self.event("planned", bytes=total)
        return known

    def phase_one(self, approve: bool, catch_up_bytes: int, max_catch_up: int) -> Approval:
        for o in self.orders():  # a re-run first waits for what was already ordered
            self.wait(o)
        if find_order(self.st, self.machine, self.vm_epoch, "phase-1") is None:
            uptos = self.consolidated()
            order = publish_apply(self.st, self.machine, self.vm_epoch, "phase-1", self.cfg.disks, uptos,
                                  self.plan(uptos), self.targets)
            self.event("phase-one", bytes=order.bytes, upto={k: v.upto for k, v in order.disks.items()})
            crash_point("failback-after-order")  # a re-run must wait for this order, not plan another
            self.wait(order)
        rounds = sum(1 for o in self.orders() if o.label.startswith("catch-up"))
        while True:
            uptos = self.applied()
            delta = self.changes_since_applied(uptos, f"catch-up-{rounds + 1}")
            remaining = sum(rg.total(r) for r in delta.values())
            if remaining <= catch_up_bytes or rounds >= max_catch_up:
                break
            rounds += 1
            order = publish_apply(self.st, self.machine, self.vm_epoch, f"catch-up-{rounds}", self.cfg.disks, uptos,
                                  delta, self.targets)
            self.event("catch-up", round=rounds, bytes=order.bytes)
            self.wait(order)
        self.commit(step="phase one applied")
        for d in self.cfg.disks:  # hash the replica's base point now, not during the downtime
            self.replica_hashes(d, self.last_upto(d.name))
        # The agent hashes the whole disk now, while the VM serves, and keeps that map: the
        # verification inside the downtime then re-hashes only the blocks written since.
        if find_order(self.st, self.machine, self.vm_epoch, "pre-scan") is None:
            self.wait(publish(self.st, self.machine, self.vm_epoch, "pre-scan", "scan", self.cfg.disks, self.targets))
        progress = self.progress()
        # Inside the downtime: apply the remaining bytes, re-hash as many, stop the VM.
        estimate = (2 * remaining / (progress.apply_rate or DEFAULT_RATE) + VM_STOP_SECONDS)
        policy = self.cfg.policy
        if approve or policy.auto_approve:
            answer = Approval(decision="approve", by="policy" if policy.auto_approve else "operator (--approve)",
                              why="auto-approve" if policy.auto_approve else "approved when started")
        else:
            vm = (self.state.vm or {}).get("vm_id", "?")
            answer = ask_approval(ApprovalRequest(
                "failback", self.machine, f"**Cut over {self.machine} to its own disk?** Phase one is applied; "
                f"{remaining} bytes changed on the VM since.",
                f"Approving stops the VM (estimated downtime {estimate:.0f} s: the VM's last writes, phase two and a "
                "block-for-block verification). Rejecting leaves the VM serving.", policy.approval_timeout,
                mode="restore", epoch=self.vm_epoch - 1,
                facts=[*machine_facts(self.st, self.cfg, f"{self.state.host or 'local'} (VM {vm})"),
                       ("Bytes to move at cut-over", str(remaining)), ("Estimated downtime", f"{estimate:.0f} s")]))
        create_markdown_artifact(f"**Cut-over of {self.machine}**: {'approved' if answer.approve else 'rejected'} by "
                                 f"{answer.by or 'unknown'}: {answer.why or '(no reason given)'}; {remaining} bytes "
                                 f"remaining, estimated downtime {estimate:.0f} s",
                                 key=f"failback-approval-{artifact_slug(self.machine)}", description="cut-over approval")
        if answer.approve:
            self.commit(phase="cut-over", step="approved", approval=answer.model_dump(),
                        fb={"cutover_at": utcnow().isoformat(), "estimated_downtime_s": round(estimate, 1)})
        return answer

    def cut_over(self) -> None:
        """Stop the VM with its last writes shipped (once: the phase moves on right after)."""
        vm = self.state.vm
        if vm:
            handle = VmHandle.model_validate(vm)
            engine.stop_capture(self.workdir)
            keys = VmCapture(resolve_vm_host(self.state.host or "local"), handle, self.st, epoch=self.vm_epoch,
                             disks=self.cfg.disks).final_capture()
            self.event("vm-stopped", vm_id=handle.vm_id, last_logs=len(keys))
        crash_point("failback-after-vm-stop")
        self.commit(phase="phase-two", step="vm stopped", vm=None, fb={"vm": vm or (self.state.failback or {}).get("vm")})

    def phase_two(self) -> None:
        """What changed after the last applied point (again, if the replica moved after it)."""
        n = int((self.state.failback or {}).get("phase_two_round", 0))
        label = "phase-2" if n == 0 else f"phase-2-{n}"
        order = find_order(self.st, self.machine, self.vm_epoch, label)
        if order is None:
            uptos = self.applied()
            order = publish_apply(self.st, self.machine, self.vm_epoch, label, self.cfg.disks, uptos,
                                  self.changes_since_applied(uptos, label), self.targets)
        self.event("phase-two", bytes=order.bytes)
        self.wait(order)
        self.commit(phase="verify", step="phase two applied")

    def replica_moved(self, why: str) -> None:
        """Logs arrived after the last applied point: apply them in another phase-two round."""
        n = int((self.state.failback or {}).get("phase_two_round", 0)) + 1
        self.log.warning("%s: %s; applying what changed in phase two again", self.machine, why)
        self.commit(phase="phase-two", step="replica moved", fb={"phase_two_round": n})

    def verify(self) -> None:
        fb = self.state.failback or {}
        rnd = int(fb.get("round", 0))
        uptos = {d.name: self.last_upto(d.name) for d in self.cfg.disks}
        moved = [name for name, at in self.applied().items() if at != uptos[name]]
        if moved:
            return self.replica_moved(f"the replica of {', '.join(moved)} moved past the last applied point")
        if self.state.step == "verify-failed":  # a re-run repairs what the last verification found
            last = find_order(self.st, self.machine, self.vm_epoch, f"verify-{rnd - 1}")
            assert last is not None
            repair = {d.name: _differing(self.st, _scan_key(last, d.name), d, self.replica_hashes(d, uptos[d.name]))
                      for d in self.cfg.disks}
            order = publish_apply(self.st, self.machine, self.vm_epoch, f"repair-{rnd}", self.cfg.disks, uptos,
                                  repair, self.targets)
            self.event("repair", bytes=order.bytes)
            self.wait(order)
            self.commit(step="repaired")
        order = publish(self.st, self.machine, self.vm_epoch, f"verify-{rnd}", "scan", self.cfg.disks, self.targets)
        # The agent re-hashes only the blocks written since its last scan (its kept map).
        reread = sum(self.wait(order).last_scan_bytes.values())
        scans = {d.name: _scan_key(order, d.name) for d in self.cfg.disks}
        rows, bad, blocks = [], [], 0
        for d in self.cfg.disks:
            disk_h = read_hashes(self.st, scans[d.name], -(-d.size // d.block_size))
            diff = np.flatnonzero(disk_h != self.replica_hashes(d, uptos[d.name]))
            blocks += len(disk_h)
            rows.append({"disk": d.name, "replica at": "{}-{}".format(*uptos[d.name]), "blocks": len(disk_h),
                         "differing": len(diff),
                         "first differing offset": int(diff[0]) * d.block_size if len(diff) else ""})
            if len(diff):
                bad.append(f"disk {d.name} differs from the replica in {len(diff)} block(s) of {d.block_size} bytes, "
                           f"first at offset {int(diff[0]) * d.block_size}")
        create_table_artifact(rows, key=f"failback-verify-{artifact_slug(self.machine)}",
                              description=f"Block-for-block verification of {self.machine}")
        if bad:
            self.commit(step="verify-failed", fb={"round": rnd + 1, "mismatch": bad})
            self.event("verify-failed", mismatch=bad)
            raise HotspareError(f"verification of {self.machine} failed: {'; '.join(bad)}. The fence stays: the "
                                f"replica (epoch {self.vm_epoch}) is still the truth and can boot the VM again; "
                                "re-run the failback to repair and verify again")
        self.event("verified", blocks=blocks)
        self.commit(phase="finish", step="verified", fb={"verified_blocks": blocks, "scans": scans,
                                                         "verify_read_bytes": reread})

    def finish(self) -> FailbackResult | None:
        fb = self.state.failback or {}
        new_epoch = self.vm_epoch + 1
        for d in self.cfg.disks:  # at the verified point: any later log of the VM epoch is refused
            upto = self.last_upto(d.name)
            try:
                fence_disk(self.st, self.machine, d, self.vm_epoch, f"failback run {flow_run.id}",
                           after_seq=upto[1] if upto[0] == self.vm_epoch else -1)
            except ReplicaMoved as err:
                self.replica_moved(str(err))
                return None
        if self.targets:  # the replacement disks are the machine's disks from now on
            disks = [d.model_copy(update={"path": self.targets.get(d.name, d.path)}) for d in self.cfg.disks]
            save_machine(self.st, self.cfg.model_copy(update={"disks": disks}), create_only=False)
        order = publish(self.st, self.machine, self.vm_epoch, "finish", "finish", self.cfg.disks, self.targets,
                        new_epoch=new_epoch, scans=fb.get("scans", {}))
        self.wait(order)
        engine.discard_vm_files(self.workdir)
        downtime = (utcnow() - datetime.fromisoformat(fb["cutover_at"])).total_seconds() if fb.get("cutover_at") else None
        moved = bytes_per_phase(self.orders())
        self.commit(state="protected", epoch=new_epoch, phase="", step="failed-back", vm=None,
                    fb={"moved": moved, "downtime_s": downtime, "finished_at": utcnow().isoformat()})
        crash_point("failback-before-last-consolidation")  # a re-run must still make that point
        try:  # the VM's last writes into a recovery point, now that the machine serves again
            consolidate(**self._store_params())
        except Exception as err:  # noqa: BLE001 - the scheduled consolidation catches up
            self.log.warning("consolidation after the failback of %s failed (%s); the schedule will retry",
                             self.machine, err)
        rows = [{"phase": k, "bytes moved": v} for k, v in moved.items()]
        rows += [{"phase": "cut-over downtime (VM stop to protected again)", "bytes moved": f"{downtime:.1f} s" if downtime else ""},
                 {"phase": "verification", "bytes moved": f"{fb.get('verified_blocks')} blocks equal the replica "
                                                          f"({fb.get('verify_read_bytes')} bytes re-read from the disk)"}]
        create_table_artifact(rows, key=f"failback-{artifact_slug(self.machine)}", description=f"Failback of {self.machine}")
        self.event("finished", epoch=new_epoch, moved=moved, downtime_s=downtime)
        msg = (f"{self.machine} failed back: protected in epoch {new_epoch}, {sum(moved.values())} bytes moved, "
               f"verification re-read {fb.get('verify_read_bytes')} bytes of the disk")
        return FailbackResult(machine=self.machine, outcome="failed-back", message=msg, epoch=new_epoch,
                              bytes_moved=moved, downtime_s=downtime, verified_blocks=fb.get("verified_blocks"),
                              verify_read_bytes=fb.get("verify_read_bytes"))


def _scan_key(order: Order, disk: str) -> str:
    return layout.failback_hashes_key(order.machine, order.vm_epoch, f"scan-{order.version}", disk)


def _differing(st: Store, key: str, disk: DiskSpec, replica: np.ndarray) -> rg.Ranges:
    return differing_ranges(read_hashes(st, key, len(replica)), replica, disk.block_size, disk.size)


