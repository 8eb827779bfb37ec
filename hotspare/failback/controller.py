"""The failback controller: one run's phase machine over the machine's state chain.

Each phase ends by committing the next (``hotspare.failback.model``), and every order is
idempotent by its label, so a re-run after a crash continues where the last one stopped and
never stops the VM twice:

1. plan: the byte ranges to move are the VM epoch's writes, the machine's divergence (its
   unshipped writes) and its late logs, all taking the replica's content; when one of them
   cannot be known (or with a target disk, replacement hardware) every block of the disk
   is compared with the replica instead.
2. ``phase-one``, the VM still serving: apply the replica's content at point T1, then short
   catch-up rounds while the remaining delta exceeds ``catch_up_bytes``; then the cut-over
   decision, shown the remaining bytes and the estimated downtime (policy or operator).
3. ``cut-over``: stop the VM with its last writes shipped; ``phase-two`` applies only what
   changed after the last applied point.
4. ``verify``: the agent hashes every block; a difference from the replica fails the run
   with the block's offset and keeps the fence (a re-run repairs and verifies again).
5. ``finish``: fence the VM epoch (a new epoch begins), the agent adopts the verified hash
   map and returns to normal protection, the VM's files are removed.

The controller takes what an orchestrator provides as :class:`FailbackSteps`, as
``hotspare.ingest.ingest_disk`` does: the flow passes Prefect tasks, its pause for the
approval, events and artifacts; a test passes plain functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hotspare import failover as vms
from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.catalog.model import utcnow
from hotspare.errors import AlreadyExists, HotspareError, LostRace, UsageError
from hotspare.failback import publish as channel
from hotspare.failback import ranges as rg
from hotspare.failback.content import differing_ranges
from hotspare.failback.model import CutOverAnswer, FailbackProgress, FailbackResult
from hotspare.failback.orders import Order, RestoreProgress, applied_upto, bytes_per_phase, find_order, load_orders
from hotspare.failback.plan import Position, phase_one_sources, read_hashes, replica_changes
from hotspare.faults import crash_point
from hotspare.fence import ReplicaMoved, fence_disk
from hotspare.machine import DiskSpec, MachineConfig, save_machine
from hotspare.state import MachineState, commit_state
from hotspare.store.base import Store
from hotspare.vm.host import VmHandle

DEFAULT_RATE = 100e6  # bytes/s assumed for estimates until the agent has measured its own
VM_STOP_SECONDS = 5.0


def downtime_estimate(remaining: int, apply_rate: float | None) -> float:
    """Seconds inside the downtime: apply the remaining bytes, re-hash as many, stop the VM."""
    return 2 * remaining / (apply_rate or DEFAULT_RATE) + VM_STOP_SECONDS


@dataclass(frozen=True)
class CutOverRequest:
    """What the cut-over decision is asked on."""

    machine: str
    vm_epoch: int
    remaining: int  # bytes changed on the VM since the last applied point
    estimate: float  # seconds of downtime
    timeout: int  # the policy's approval timeout


@dataclass
class FailbackSteps:
    """The orchestration a run needs. ``wait`` polls the agent until it reports an order
    done (store, machine, order, timeout, silence); ``ingest`` and ``consolidate`` bring the
    machine's replica up to date (consolidation ingests first); ``ask_cutover`` answers a
    :class:`CutOverRequest` (not called when the run or the policy approves beforehand);
    ``stop_vm`` stops the VM with its last writes shipped (its capture loop already stopped)
    and returns how many last logs it shipped. ``event`` (name, payload), ``table`` (name,
    rows, description) and ``note`` (name, markdown, description) report; the names are
    "plan", "approval", "verify" and "" (the run's summary)."""

    wait: Callable[[Store, str, Order, float, float], RestoreProgress]
    ingest: Callable[[], Any]
    consolidate: Callable[[], Any]
    ask_cutover: Callable[[CutOverRequest], CutOverAnswer]
    stop_vm: Callable[[VmHandle], int]
    publish_apply: Callable[..., Order] = channel.publish_apply
    publish: Callable[..., Order] = channel.publish
    hash_replica: Callable[[Store, str, int, DiskSpec, Position], np.ndarray] = channel.hash_replica
    event: Callable[[str, dict], None] = lambda name, payload: None
    table: Callable[[str, list[dict], str], None] = lambda name, rows, description: None
    note: Callable[[str, str, str], None] = lambda name, text, description: None
    log: Any = field(default_factory=lambda: logging.getLogger("hotspare.failback"))


def _targets(cfg: MachineConfig, target_disk: dict[str, str] | None, state: MachineState) -> dict[str, str]:
    names = {d.name for d in cfg.disks}
    for name in target_disk or {}:
        if name not in names:
            raise UsageError(f"--target-disk {name}=...: {cfg.name} has no disk {name!r} (disks: {', '.join(sorted(names))})")
    recorded = state.failback.targets if state.state == "failing-back" and state.failback else None
    if recorded is not None and target_disk and target_disk != recorded:
        raise UsageError(f"{cfg.name}'s failback already runs with target disks {recorded}; finish it first")
    return dict(target_disk or recorded or {})


class FailbackController:
    """One failback run of ``cfg``'s machine from ``state``: :meth:`start`, then
    :meth:`step` until it returns the run's result (each step carries out one phase)."""

    def __init__(self, store: Store, cfg: MachineConfig, state: MachineState, steps: FailbackSteps, *, run_id: str,
                 workdir: Path, agent_timeout: float = 1800, approve: bool = False, catch_up_bytes: int = 64 << 20,
                 max_catch_up: int = 3) -> None:
        self.st, self.cfg, self.state, self.steps = store, cfg, state, steps
        self.machine = cfg.name
        self.vm_epoch = state.epoch
        self.run_id = run_id
        self.workdir = workdir
        self.agent_timeout = agent_timeout
        self.approve, self.catch_up_bytes, self.max_catch_up = approve, catch_up_bytes, max_catch_up
        self.silence = max(60.0, 3.0 * cfg.policy.heartbeat_window)
        self.targets: dict[str, str] = {}
        self.log = steps.log

    @property
    def fb(self) -> FailbackProgress:
        return self.state.failback or FailbackProgress()

    def _result(self, outcome, message: str, **fields) -> FailbackResult:
        return FailbackResult(machine=self.machine, outcome=outcome, message=message, **fields)

    # -- bookkeeping ------------------------------------------------------------------------
    def event(self, name: str, **payload) -> None:
        self.log.info("%s: %s", name, payload or "")
        self.steps.event(name, payload)

    def commit(self, fb: dict | None = None, **changes) -> MachineState:
        if fb:
            unknown = set(fb) - set(FailbackProgress.model_fields)
            if unknown:  # a typo here would ride along as an extra key, unread for ever
                raise TypeError(f"not fields of FailbackProgress: {sorted(unknown)}")
            changes["failback"] = self.fb.model_copy(update=fb)
        try:
            self.state = commit_state(self.st, self.state.next(**changes))
        except AlreadyExists:
            raise LostRace(f"{self.machine}'s state moved under this failback (another run?); stopping") from None
        return self.state

    def orders(self) -> list[Order]:
        return load_orders(self.st, self.machine, self.vm_epoch)

    def find(self, label: str) -> Order | None:
        return find_order(self.st, self.machine, self.vm_epoch, label)

    def wait(self, order: Order) -> RestoreProgress:
        return self.steps.wait(self.st, self.machine, order, self.agent_timeout, self.silence)

    def progress(self) -> RestoreProgress:
        p = channel.restore_progress(self.st, self.machine, self.vm_epoch, self.silence)
        if p is None:
            raise HotspareError(f"{self.machine}'s agent stopped reporting in restore mode; restart it with --restore")
        return p

    def publish_apply(self, label: str, uptos: dict[str, Position], moves: dict[str, rg.Ranges]) -> Order:
        return self.steps.publish_apply(self.st, self.machine, self.vm_epoch, label, self.cfg.disks, uptos, moves,
                                        self.targets)

    def publish(self, label: str, kind: str, disks: list[DiskSpec] | None = None, **fields) -> Order:
        return self.steps.publish(self.st, self.machine, self.vm_epoch, label, kind,
                                  self.cfg.disks if disks is None else disks, self.targets, **fields)

    def consolidated(self) -> dict[str, Position]:
        """Each disk's newest recovery point after a consolidation (phase one's T1)."""
        self.steps.consolidate()
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
        self.steps.ingest()
        return {d.name: (self.vm_epoch, load_catalog(self.st, self.machine, d.name, d.size).applied_seq(self.vm_epoch))
                for d in self.cfg.disks}

    def last_upto(self, disk: str) -> tuple[int, int]:
        upto = applied_upto(self.orders(), disk)
        if upto is None:
            raise HotspareError(f"no failback order of {self.machine} has applied {disk} yet")
        return upto

    def replica_hashes(self, disk: DiskSpec, upto: Position) -> np.ndarray:
        return self.steps.hash_replica(self.st, self.machine, self.vm_epoch, disk, upto)

    def differing(self, order: Order, disk: DiskSpec, upto: Position) -> rg.Ranges:
        """The ranges where ``order``'s scan of ``disk`` differs from the replica at ``upto``."""
        replica = self.replica_hashes(disk, upto)
        return differing_ranges(read_hashes(self.st, _scan_key(order, disk.name), len(replica)), replica,
                                disk.block_size, disk.size)

    def compare(self, label: str, uptos: dict[str, Position], disks: list[str]) -> dict[str, rg.Ranges]:
        """The ranges where the machine's disks differ from the replica at ``uptos``: the
        agent hashes every block, the replica is hashed here."""
        specs = [d for d in self.cfg.disks if d.name in disks]
        order = self.publish(label, "scan", specs)
        self.wait(order)
        return {d.name: self.differing(order, d, uptos[d.name]) for d in specs}

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

    # -- the run ----------------------------------------------------------------------------
    def start(self, target_disk: dict[str, str] | None = None) -> FailbackResult | None:
        """Refuse what is no failback to run (the result), or commit the run's start."""
        machine, state = self.machine, self.state
        if state.state == "protected":
            done = state.step == "failed-back"
            if done:  # a run killed after its last commit: the VM's last writes may wait for a point (idempotent)
                self.steps.consolidate()
            msg = (f"{machine} is protected in epoch {state.epoch}: "
                   + ("its failback is finished" if done else "nothing to fail back"))
            return self._result("already" if done else "refused", msg)
        if state.state == "failing-over":
            return self._result("refused", f"{machine} is failing over; fail back once it has failed over")
        if state.phase != "finish" and channel.restore_progress(self.st, machine, state.epoch, self.silence) is None:
            msg = (f"{machine}'s agent is not reporting in restore mode: run `hotspare agent {machine} --restore` on "
                   "the machine (the VM keeps serving)")
            self.event("refused", reason=msg)
            return self._result("refused", msg)
        targets = _targets(self.cfg, target_disk, state)
        try:
            if state.state == "failed-over":
                self.state = commit_state(self.st, state.next(state="failing-back", phase="phase-one", step="started",
                                                              flow_run_id=self.run_id,
                                                              failback=FailbackProgress(targets=targets)))
            elif state.flow_run_id != self.run_id:
                self.state = commit_state(self.st, state.next(flow_run_id=self.run_id))
        except AlreadyExists:
            return self._result("lost-race", f"another flow moved {machine} first; not failing back twice")
        self.targets = dict(self.fb.targets)
        return None

    def step(self) -> FailbackResult | None:
        """Carry out the current phase; the run's result once it ended (a refused cut-over
        or the finish)."""
        phase = self.state.phase
        if phase == "phase-one":
            answer = self.phase_one()
            if not answer.approve:
                outcome = "timed-out" if answer.by == "timeout" else "rejected"
                msg = (f"cut-over of {self.machine} {outcome.replace('-', ' ')} by {answer.by}: {answer.why}; the VM "
                       "keeps serving and the machine stays in restore mode (re-run the failback to try again)")
                self.commit(step=f"cut-over {outcome}")
                self.event(outcome, by=answer.by, why=answer.why)
                return self._result(outcome, msg)
        elif phase == "cut-over":
            self.cut_over()
        elif phase == "phase-two":
            self.phase_two()
        elif phase == "verify":
            self.verify()
        elif phase == "finish":
            return self.finish()
        else:
            raise HotspareError(f"{self.machine}'s state has an unknown failback phase {phase!r}")
        return None

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
        self.steps.table("plan", rows, f"Failback plan of {self.machine}")
        self.event("planned", bytes=total)
        return known

    def phase_one(self) -> CutOverAnswer:
        for o in self.orders():  # a re-run first waits for what was already ordered
            self.wait(o)
        if self.find("phase-1") is None:
            uptos = self.consolidated()
            order = self.publish_apply("phase-1", uptos, self.plan(uptos))
            self.event("phase-one", bytes=order.bytes, upto={k: v.upto for k, v in order.disks.items()})
            crash_point("failback-after-order")  # a re-run must wait for this order, not plan another
            self.wait(order)
        rounds = sum(1 for o in self.orders() if o.label.startswith("catch-up"))
        while True:
            uptos = self.applied()
            delta = self.changes_since_applied(uptos, f"catch-up-{rounds + 1}")
            remaining = sum(rg.total(r) for r in delta.values())
            if remaining <= self.catch_up_bytes or rounds >= self.max_catch_up:
                break
            rounds += 1
            order = self.publish_apply(f"catch-up-{rounds}", uptos, delta)
            self.event("catch-up", round=rounds, bytes=order.bytes)
            self.wait(order)
        self.commit(step="phase one applied")
        for d in self.cfg.disks:  # hash the replica's base point now, not during the downtime
            self.replica_hashes(d, self.last_upto(d.name))
        # The agent hashes the whole disk now, while the VM serves, and keeps that map: the
        # verification inside the downtime then re-hashes only the blocks written since.
        if self.find("pre-scan") is None:
            self.wait(self.publish("pre-scan", "scan"))
        estimate = downtime_estimate(remaining, self.progress().apply_rate)
        policy = self.cfg.policy
        if self.approve or policy.auto_approve:
            answer = CutOverAnswer(decision="approve", by="policy" if policy.auto_approve else "operator (--approve)",
                                   why="auto-approve" if policy.auto_approve else "approved when started")
        else:
            answer = self.steps.ask_cutover(CutOverRequest(self.machine, self.vm_epoch, remaining, estimate,
                                                           policy.approval_timeout))
        self.steps.note("approval", f"**Cut-over of {self.machine}**: {'approved' if answer.approve else 'rejected'} "
                                    f"by {answer.by or 'unknown'}: {answer.why or '(no reason given)'}; {remaining} "
                                    f"bytes remaining, estimated downtime {estimate:.0f} s", "cut-over approval")
        if answer.approve:
            self.commit(phase="cut-over", step="approved", approval=answer.model_dump(),
                        fb={"cutover_at": utcnow(), "estimated_downtime_s": round(estimate, 1)})
        return answer

    def cut_over(self) -> None:
        """Stop the VM with its last writes shipped (once: the phase moves on right after)."""
        vm = self.state.vm
        if vm:
            handle = VmHandle.model_validate(vm)
            vms.stop_capture(self.workdir)
            self.event("vm-stopped", vm_id=handle.vm_id, last_logs=self.steps.stop_vm(handle))
        crash_point("failback-after-vm-stop")
        self.commit(phase="phase-two", step="vm stopped", vm=None, fb={"vm": vm or self.fb.vm})

    def phase_two(self) -> None:
        """What changed after the last applied point (again, if the replica moved after it)."""
        n = self.fb.phase_two_round
        label = "phase-2" if n == 0 else f"phase-2-{n}"
        order = self.find(label)
        if order is None:
            uptos = self.applied()
            order = self.publish_apply(label, uptos, self.changes_since_applied(uptos, label))
        self.event("phase-two", bytes=order.bytes)
        self.wait(order)
        self.commit(phase="verify", step="phase two applied")

    def replica_moved(self, why: str) -> None:
        """Logs arrived after the last applied point: apply them in another phase-two round."""
        self.log.warning("%s: %s; applying what changed in phase two again", self.machine, why)
        self.commit(phase="phase-two", step="replica moved", fb={"phase_two_round": self.fb.phase_two_round + 1})

    def verify(self) -> None:
        rnd = self.fb.round
        uptos = {d.name: self.last_upto(d.name) for d in self.cfg.disks}
        moved = [name for name, at in self.applied().items() if at != uptos[name]]
        if moved:
            return self.replica_moved(f"the replica of {', '.join(moved)} moved past the last applied point")
        if self.state.step == "verify-failed":  # a re-run repairs what the last verification found
            last = self.find(f"verify-{rnd - 1}")
            assert last is not None
            order = self.publish_apply(f"repair-{rnd}", uptos,
                                       {d.name: self.differing(last, d, uptos[d.name]) for d in self.cfg.disks})
            self.event("repair", bytes=order.bytes)
            self.wait(order)
            self.commit(step="repaired")
        order = self.publish(f"verify-{rnd}", "scan")
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
        self.steps.table("verify", rows, f"Block-for-block verification of {self.machine}")
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
        fb = self.fb
        new_epoch = self.vm_epoch + 1
        for d in self.cfg.disks:  # at the verified point: any later log of the VM epoch is refused
            upto = self.last_upto(d.name)
            try:
                fence_disk(self.st, self.machine, d, self.vm_epoch, f"failback run {self.run_id}",
                           after_seq=upto[1] if upto[0] == self.vm_epoch else -1)
            except ReplicaMoved as err:
                self.replica_moved(str(err))
                return None
        if self.targets:  # the replacement disks are the machine's disks from now on
            disks = [d.model_copy(update={"path": self.targets.get(d.name, d.path)}) for d in self.cfg.disks]
            save_machine(self.st, self.cfg.model_copy(update={"disks": disks}), create_only=False)
        self.wait(self.publish("finish", "finish", new_epoch=new_epoch, scans=fb.scans))
        vms.discard_vm_files(self.workdir)
        downtime = (utcnow() - fb.cutover_at).total_seconds() if fb.cutover_at else None
        moved = bytes_per_phase(self.orders())
        self.commit(state="protected", epoch=new_epoch, phase="", step="failed-back", vm=None,
                    fb={"moved": moved, "downtime_s": downtime, "finished_at": utcnow()})
        crash_point("failback-before-last-consolidation")  # a re-run must still make that point
        try:  # the VM's last writes into a recovery point, now that the machine serves again
            self.steps.consolidate()
        except Exception as err:  # noqa: BLE001 - the scheduled consolidation catches up
            self.log.warning("consolidation after the failback of %s failed (%s); the schedule will retry",
                             self.machine, err)
        rows = [{"phase": k, "bytes moved": v} for k, v in moved.items()]
        rows += [{"phase": "cut-over downtime (VM stop to protected again)", "bytes moved": f"{downtime:.1f} s" if downtime else ""},
                 {"phase": "verification", "bytes moved": f"{fb.verified_blocks} blocks equal the replica "
                                                          f"({fb.verify_read_bytes} bytes re-read from the disk)"}]
        self.steps.table("", rows, f"Failback of {self.machine}")
        self.event("finished", epoch=new_epoch, moved=moved, downtime_s=downtime)
        msg = (f"{self.machine} failed back: protected in epoch {new_epoch}, {sum(moved.values())} bytes moved, "
               f"verification re-read {fb.verify_read_bytes} bytes of the disk")
        return self._result("failed-back", msg, epoch=new_epoch, bytes_moved=moved, downtime_s=downtime,
                            verified_blocks=fb.verified_blocks, verify_read_bytes=fb.verify_read_bytes)


def _scan_key(order: Order, disk: str) -> str:
    return layout.failback_hashes_key(order.machine, order.vm_epoch, f"scan-{order.version}", disk)

