"""The agent: each cycle it captures every disk of the machine up to a cut, ships the
changes as extent logs, and sends a heartbeat.

Two trackers find the changes:

- ``qemu`` (default, :mod:`hotspare.capture.qemu`): the machine's storage daemon serves the
  disks and records every write in a dirty bitmap; each cycle freezes it with a view of the
  disks and ships exactly the dirty blocks, at a crash-consistent cut.
- ``scan`` (:mod:`hotspare.capture.scan`): each cycle re-reads the whole disk against the
  hash map. What it reads depends on whether the disks are *served* (their I/O goes through
  the machine's storage daemon):

  - served (``serve=True``, ``--serve``: the agent starts or adopts the daemon as for
    ``qemu``; or the machine's daemon already runs, started by an earlier agent): each cycle
    scans a frozen view of every disk (the qemu tracker's rescan, run every cycle), so its
    cuts are crash-consistent and marked so;
  - not served (the default when no daemon runs: disks the agent cannot serve, e.g. a
    mounted block device): each cycle reads the live disk. That read is fuzzy, so its cuts
    are marked not consistent, and failover prefers the newest consistent point.

  Once a daemon serves the disks the agent keeps them served (it restarts a daemon that
  dies, as for ``qemu``): the machine's I/O depends on it.

Durability rule, both trackers: a log is uploaded create-only first; the hash map that shows
its blocks as shipped is persisted after, and while the upload is in flight the map holds
``UNSHIPPED`` for them, so a crash in between re-sends them and never loses a write. The
agent's state must match the store: a state that claims seqs the store does not hold (a new
store, or another machine's state) is detected and the disk re-seeded.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from hotspare.capture.budget import CpuBudget
from hotspare.capture.daemon import DaemonError, StorageDaemon
from hotspare.capture.lease import AgentLease
from hotspare.capture.qemu import DiskWork, QemuTracker
from hotspare.capture.scan import scan
from hotspare.capture.state import UNSHIPPED, DiskState, StateDir
from hotspare.capture.upload import DEFAULT_LOG_TARGET, last_seq_in_store, ship_cycle
from hotspare.capture.watch import Alarm, StoreUnreachable, StoreWatch
from hotspare.catalog import load_catalog
from hotspare.errors import HotspareError, StagingError, StoreError
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.faults import crash_point
from hotspare.heartbeat import send_heartbeat
from hotspare.machine import DiskSpec, MachineConfig, device_size
from hotspare.stall import RESUMED_EVENT, STALLED_EVENT, Stall, store_stalls
from hotspare.store.base import Store
from hotspare.qmp import QmpError

Tracker = Literal["qemu", "scan"]
TRACKERS = ("qemu", "scan")
HEARTBEAT_SPACING = 1.0  # seconds


class Fenced(HotspareError):
    """The machine's epoch is fenced: it failed over and must not ship."""


@dataclass
class DiskReport:
    disk: str
    epoch: int
    scanned_bytes: int = 0
    logs: list[str] = field(default_factory=list)
    extents: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    last_seq: int = -1
    seconds: float = 0.0
    resync: bool = False
    tracker: str = "qemu"
    served: bool = False  # the disk's I/O goes through the storage daemon
    served_at: str | None = None  # where the machine reaches the disk, when served
    consistent: bool = False  # the cycle read a frozen view: its cut is crash-consistent
    rescan: str | None = None  # why this cycle compared a frozen view with the hash map
    paced_seconds: float = 0.0  # the cycle's waits for the agent's CPU budget (--cpu-limit)


@dataclass
class CycleReport:
    machine: str
    disks: list[DiskReport]
    stopped: bool = False  # a stop was requested and honoured mid-cycle


ProgressFactory = Callable[[str, int], Callable[[int], None]]


class Agent:
    def __init__(
        self,
        store: Store,
        config: MachineConfig,
        state_dir: str | os.PathLike,
        *,
        tracker: Tracker = "qemu",
        serve_dir: str | os.PathLike | None = None,
        fuse: bool = False,
        serve: bool = False,
        log_target: int = DEFAULT_LOG_TARGET,
        emit: Callable[[dict], None] | None = None,
        progress: ProgressFactory | None = None,
        say: Callable[[str], None] | None = None,
        alarm: Alarm | None = None,
        cpu_limit: float | None = None,
    ) -> None:
        if tracker not in TRACKERS:
            raise HotspareError(f"unknown tracker {tracker!r}: use one of {', '.join(TRACKERS)}")
        self.store = store
        self.config = config
        self.state = StateDir(state_dir)
        self.tracker = tracker
        self.log_target = log_target
        self.emit = emit
        self.progress = progress
        self.say = say or (lambda s: None)
        self.stop_requested = False
        self._lock_fd: int | None = None
        self.daemon = StorageDaemon(self.state.root, config, serve_dir=serve_dir, fuse=fuse)
        # The qemu tracker always serves; the scan tracker when told to, or once it finds the
        # machine's daemon running (see the module's docstring).
        self.served = tracker == "qemu" or serve
        self.budget = CpuBudget(cpu_limit)
        self.qemu = QemuTracker(self.daemon, self.state, store, config.name, log_target=log_target, say=self.say,
                                scan_every_cycle=tracker == "scan", budget=self.budget)
        self._work: dict[str, DiskWork] = {}
        self._last_beat = -HEARTBEAT_SPACING
        self.lease = AgentLease(store, config.name, self.state.root)
        # Stalls of the store's making: said in the log, sent as events (alarm), and in the
        # first heartbeat that gets through.
        self._epoch = 0  # of the last heartbeat: the events' epoch label
        self._alarm = alarm
        self._stalls: list[dict] = []  # what the store showed stalled at the last look
        self._stalls_at = -float("inf")
        self._stuck: dict | None = None  # a cycle's local fault the agent waits out (agent-stuck)
        self._disks_sent: dict[str, dict] = {}  # the disks of the last heartbeat
        self._answered: dict[str, int | None] = {}  # disk -> the resync request its state answered
        self.watch = StoreWatch(config.name, config.policy.heartbeat_window, say=self.say,
                                alarm=None if alarm is None else lambda ev, p: alarm(ev, dict(p, epoch=self._epoch)))

    # -- locking: one agent per machine and state directory ------------------------------
    def __enter__(self) -> "Agent":
        self.state.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state.root / "agent.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HotspareError(f"another agent for {self.config.name} is running (lock {self.state.root}/agent.lock)") from None
        self._lock_fd = fd
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.daemon.close()  # the daemon itself goes on serving the machine
        try:
            if not isinstance(exc, StoreUnreachable):  # else a release would wait for it again
                self.lease.release()
        except StoreError:
            pass  # an unreleased lease only makes the next agent wait a few seconds
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- one cycle -----------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        if not self.lease.held:
            self.lease.acquire()  # one shipping agent per machine
        if not self.served and self.daemon.running():
            self.served = True
            self.say("the storage daemon serves the disks: scanning frozen views (crash-consistent cuts)")
        if self.served:
            reports = self._served_cycle()
        else:
            reports = []
            for spec in self.config.disks:
                reports.append(self.ship_disk(spec))
                if self.stop_requested:
                    break
        # At most one heartbeat a second, however short the cycles.
        if time.monotonic() - self._last_beat >= HEARTBEAT_SPACING or any(r.logs for r in reports):
            self.lease.renew()
            self.heartbeat(reports)
            self._last_beat = time.monotonic()
        return CycleReport(self.config.name, reports, stopped=self.stop_requested)

    def _prepare(self, spec: DiskSpec, *, in_place: bool) -> DiskWork:
        """The disk's state, checked against the disk, the catalog and the store."""
        size = device_size(spec.path)
        if size != spec.size:
            # A replica cannot change size in place: shipping would write past its end, or
            # leave its tail stale. Protecting under a new name seeds a new replica.
            raise HotspareError(f"disk {spec.name} of {self.config.name} ({spec.path}) was {spec.size} bytes when "
                                f"protected and is now {size}: nothing shipped; re-protect it under a new name "
                                f"(hotspare protect {self.config.name}-2 "
                                + " ".join(f"--disk {d.name}={d.path}" for d in self.config.disks) + ")")
        state = self.state.load(spec.name, in_place=in_place)
        rescan = None
        if state is None:
            state = DiskState.fresh(epoch=0, block_size=spec.block_size, disk_size=size)
            rescan = "first pass (the seed)"
        if (state.block_size, state.disk_size) != (spec.block_size, spec.size):
            raise HotspareError(f"agent state of disk {spec.name} is for another geometry; remove "
                                f"{self.state.root}/{spec.name}.json to re-seed")
        catalog = load_catalog(self.store, self.config.name, spec.name, spec.size)
        if catalog.fence_of(state.epoch) is not None:
            raise Fenced(f"machine {self.config.name} is fenced: epoch {state.epoch} ended at a failover and its "
                         "VM's replica is the truth now; nothing shipped. Run `hotspare agent "
                         f"{self.config.name} --restore` to fail back")
        held = max(catalog.applied_seq(state.epoch), catalog.folded.get(state.epoch, -1))
        held = last_seq_in_store(self.store, self.config.name, spec.name, state.epoch, held)
        if state.last_seq > held:
            # The state claims logs the store never got (re-protected into a new store, or a
            # state directory from elsewhere): what the hash map says was shipped is not
            # there, so start again from what the store holds.
            rescan = (f"the store holds seqs up to {held} of epoch {state.epoch}, this agent's state claims "
                      f"{state.last_seq}: re-seeding the disk")
            self.say(f"{spec.name}: {rescan}")
            state.hashes[:] = DiskState.fresh(epoch=state.epoch, block_size=spec.block_size, disk_size=size).hashes
            state.bitmap = None
        state.last_seq = held
        if state.hashes_file is None or rescan:
            self.state.save(spec.name, state)
            if in_place:
                state = self.state.load(spec.name, in_place=True)  # type: ignore[assignment]
                assert state is not None
        work = DiskWork(spec=spec, state=state, rescan=rescan)
        self._answered[spec.name] = state.resynced_for
        if catalog.resync_from is not None and state.resynced_for != catalog.resync_from:
            # A log was rejected and left a hole: re-send every block (zeros included), and
            # mark the first log so ingest lets it close the hole.
            work.resync_from = catalog.resync_from
            work.rescan = f"the store asked for a resync from seq {catalog.resync_from}"
        return work

    def _served_cycle(self) -> list[DiskReport]:
        """One cycle of every disk through the storage daemon: a frozen view each, one cut."""
        t0, paced = time.monotonic(), self.budget.slept
        work = []
        for spec in self.config.disks:
            w = self._prepare(spec, in_place=True)
            old = self._work.get(spec.name)
            if old is not None and w.rescan is None and w.resync_from is None:
                w.state.bitmap = old.state.bitmap  # this process knows the lineage best
            work.append(w)
        self._work = {w.spec.name: w for w in work}
        self.qemu.cycle(work)
        self._answered.update({w.spec.name: w.state.resynced_for for w in work})
        seconds = time.monotonic() - t0
        reports = []
        for w in work:
            reports.append(DiskReport(disk=w.spec.name, epoch=w.state.epoch, scanned_bytes=w.read_bytes, logs=w.keys,
                                      rescan=w.scanned,
                                      extents=w.extents, data_bytes=w.data_bytes, zero_bytes=w.zero_bytes,
                                      last_seq=w.state.last_seq, seconds=seconds, resync=w.resync_from is not None,
                                      tracker=self.tracker, served=True, consistent=True,
                                      served_at=self.daemon.served_at(w.spec.name),
                                      paced_seconds=self.budget.slept - paced))
            w.keys, w.extents, w.data_bytes, w.zero_bytes, w.read_bytes, w.resync_from, w.scanned = \
                [], 0, 0, 0, 0, None, None
        return reports

    def ship_disk(self, spec: DiskSpec) -> DiskReport:
        """One cycle of ``spec`` on the scan tracker, not served: the live disk against the hash map."""
        t0, paced = time.monotonic(), self.budget.slept
        w = self._prepare(spec, in_place=False)
        state = w.state
        shipped = state.hashes.copy()  # the map as shipped: what is persisted
        if w.resync_from is not None:
            state.hashes ^= np.uint64(0xFFFFFFFFFFFFFFFF)
        report = DiskReport(disk=spec.name, epoch=state.epoch, resync=w.resync_from is not None, tracker="scan")
        on_progress = self.progress(spec.name, spec.size) if self.progress else None
        bs = spec.block_size
        ranges: list[tuple[int, int]] = []  # block range of each extent yielded, in seq order
        base, confirmed = state.last_seq + 1, 0  # extents [0, confirmed) are in uploaded logs

        def persist() -> None:
            saved, state.hashes = state.hashes, shipped
            try:
                self.state.save(spec.name, state)
            finally:
                state.hashes = saved

        def extents():
            for chunk in scan(spec.path, state.hashes, bs, spec.size, max_run=MAX_EXTENT, progress=on_progress):
                self.budget.pace()
                report.scanned_bytes = chunk.end
                for run in chunk.runs:
                    ranges.append((run.offset // bs, -(-(run.offset + run.length) // bs)))
                    report.extents += 1
                    if run.data is None:
                        report.zero_bytes += run.length
                    else:
                        report.data_bytes += run.length
                    yield run.offset, run.length, run.data
                if self.stop_requested:
                    return

        def before_upload() -> None:
            for a, b in ranges[confirmed:]:  # in flight: a crash from here on re-sends them
                shipped[a:b] = UNSHIPPED
            persist()

        def uploaded(key: str, meta) -> None:
            nonlocal confirmed
            crash_point("agent-after-upload")
            state.last_seq = meta.last_seq
            upto = meta.last_seq - base + 1
            for a, b in ranges[confirmed:upto]:
                shipped[a:b] = state.hashes[a:b]
            confirmed = upto
            persist()
            report.logs.append(key)

        # A live disk's scan is a fuzzy read: its cycle ends at a cut that is not consistent,
        # and a cycle stopped halfway ends at no cut at all.
        ship_cycle(self.store, extents(), machine=self.config.name, disk=spec.name, epoch=state.epoch,
                   disk_size=spec.size, last_seq=state.last_seq, workdir=self.state.root, consistent=False,
                   log_target=self.log_target, resync_from=w.resync_from, who="agent", on_upload=uploaded,
                   before_upload=before_upload, ends_cycle=lambda: not self.stop_requested)
        if w.resync_from is not None:
            state.resynced_for = self._answered[spec.name] = w.resync_from
        if not self.stop_requested:
            shipped[:] = state.hashes  # every block scanned and its changes shipped
        persist()
        report.last_seq = state.last_seq
        report.seconds = time.monotonic() - t0
        report.paced_seconds = self.budget.slept - paced
        return report

    # -- heartbeat -----------------------------------------------------------------------
    def _store_stalls(self) -> list[dict]:
        """The disks' stalls the store shows (a resync asked for, a gap, logs nobody
        ingests), looked at twice per heartbeat window: the agent is alive and can say so
        in its log, its heartbeat and an event even when no ingest runs. A new one is said
        once."""
        if time.monotonic() - self._stalls_at < self.config.policy.heartbeat_window / 2:
            return self._stalls
        self._stalls_at = time.monotonic()
        try:
            found = store_stalls(self.store, self.config)
        except StoreError as err:
            self.say(f"could not look for stalls: {err}")
            return self._stalls
        # A resync this agent sent already waits for ingest, not for the agent.
        found = [x for x in found if not (x.reason == "resync-pending" and x.seq == self._answered.get(x.disk or ""))]
        known = {x["line"] for x in self._stalls}
        for stall in found:
            if stall.line() not in known:
                self.say(f"{stall.disk}: stalled ({stall.reason}): {stall.detail}")
                if self._alarm is not None:
                    self.watch.send(STALLED_EVENT, dict(stall.payload(), epoch=self._epoch))
        self._stalls = [dict(x.payload(), line=x.line()) for x in found]
        return self._stalls

    def heartbeat(self, reports: list[DiskReport]) -> dict:
        ended = self.watch.ending()
        self._disks_sent = {r.disk: {"last_seq": r.last_seq, "shipped_bytes": r.data_bytes + r.zero_bytes,
                                     "tracker": r.tracker, "served": r.served, "served_at": r.served_at,
                                     "consistent": r.consistent, "rescan": r.rescan,
                                     "paced_seconds": round(r.paced_seconds, 3)} for r in reports}
        payload = send_heartbeat(self.store, self.config.name, mode="normal",
                                 epoch=max((r.epoch for r in reports), default=0), emit=self.emit, last_stall=ended,
                                 stalls=self._store_stalls(), disks=self._disks_sent)
        self._epoch = payload["epoch"]
        self.watch.contact(ended)
        if self._stuck is not None:
            self.say("shipping resumed")
            self.watch.send(RESUMED_EVENT, dict(self._stuck, epoch=self._epoch))
            self._stuck = None
        return payload

    def _stuck_cycle(self, err: StagingError) -> None:
        """A cycle failed on a local fault (its staging directory is full): the agent stays
        up and says so in its log, in a heartbeat whose ``stuck`` status reports as an
        ``agent-stuck`` stall, and in an event, until a cycle ships again. Nothing is lost:
        what the failed cycle read stays unshipped in its state and is sent again."""
        first = self._stuck is None
        since = self._stuck["since"] if self._stuck else datetime.now(timezone.utc).isoformat()
        stall = Stall(self.config.name, "agent-stuck", f"the agent is up but cannot ship: {err}")
        self._stuck = dict(stall.payload(), since=since)
        if first:
            self.say(f"stalled (agent-stuck): {err}; retrying every cycle")
            self.watch.send(STALLED_EVENT, dict(self._stuck, epoch=self._epoch))
        try:
            send_heartbeat(self.store, self.config.name, mode="normal", epoch=self._epoch, emit=self.emit,
                           disks=self._disks_sent, stuck=self._stuck)
        except StoreError as serr:
            self.say(f"heartbeat not sent either: {serr}")

    def _heartbeat_event_only(self, waiting: str) -> None:
        if self.emit is None:
            return
        try:
            epoch = max((w.state.epoch for w in self._work.values()), default=0)
            self.emit({"machine": self.config.name, "mode": "normal", "epoch": epoch, "host": "",
                       "time": datetime.now(timezone.utc).isoformat(), "disks": {}, "waiting_for_store": waiting,
                       "stalled": self.watch.stalled})
        except Exception as err:  # noqa: BLE001 - the event is a courtesy; the loop must go on
            self.say(f"heartbeat event not sent either: {err}")

    def run(self, *, interval: float, once: bool, on_cycle: Callable[[CycleReport], None] | None = None,
            give_up_after: float | None = None) -> None:
        """Cycle every ``interval`` seconds until stopped. Transient store faults are waited
        out (for ever, or until the store has been away for ``give_up_after`` seconds:
        then :class:`StoreUnreachable`)."""
        self.watch.give_up_after = give_up_after
        with self.watch:
            self._run(interval=interval, once=once, on_cycle=on_cycle, give_up_after=give_up_after)

    def _run(self, *, interval: float, once: bool, on_cycle: Callable[[CycleReport], None] | None,
             give_up_after: float | None) -> None:
        while True:
            started = time.monotonic()
            try:
                report = self.cycle()
            except StoreError as err:
                self._store_fault(err, interval, once, give_up_after)
            except StagingError as err:
                if once:
                    raise
                self._stuck_cycle(err)
            except Exception as err:
                if once or not self.served or not self._daemon_failed(err):
                    raise
                # The storage daemon died (killed, crashed): the machine's I/O stalls until a
                # new one serves it, which the next cycle starts; its bitmap is gone, so that
                # cycle compares a frozen view with the hash map. No heartbeat meanwhile: a
                # machine that cannot reach its disks is down.
                self.daemon.close()
                self.say(f"the storage daemon failed ({err}); starting a new one")
            else:
                if on_cycle:
                    on_cycle(report)
            if once or self.stop_requested:
                return
            # Cuts on a fixed cadence: a slow cycle delays the next cut, never shifts them all.
            deadline = max(time.monotonic(), started + interval)
            while time.monotonic() < deadline and not self.stop_requested:
                time.sleep(min(0.05, interval))
            if self.stop_requested:
                return

    def _daemon_failed(self, err: Exception) -> bool:
        """Whether a cycle's fault is the storage daemon's death: QMP or the daemon said so,
        or it is gone, whatever the read of its view raised then (a FUSE view of a dead
        daemon fails with ENOTCONN, an NBD map with a closed connection)."""
        return isinstance(err, (DaemonError, QmpError)) or not self.daemon.running()

    def _store_fault(self, err: StoreError, interval: float, once: bool, give_up_after: float | None) -> None:
        if once or not err.transient:
            raise err
        away = self.watch.unreachable_for()
        if give_up_after and away > give_up_after:
            raise StoreUnreachable(f"{self.config.name}: the store has not answered for {away:.0f}s "
                                   f"(--give-up-after {give_up_after:g}s): giving up, nothing captured is "
                                   f"lost; the last fault: {err}") from err
        # A long-running agent never exits on store trouble: nothing is lost (the frozen
        # bitmap stays, the hash map marks what was in flight), and it says what it waits
        # for, also in the heartbeat event when Prefect is reachable.
        self.say(f"waiting for the store: {err}; retrying every {interval:g}s")
        self._heartbeat_event_only(str(err))


def report_dict(report: CycleReport) -> dict:
    return {"machine": report.machine, "stopped": report.stopped, "disks": [asdict(d) for d in report.disks]}
