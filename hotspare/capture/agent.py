"""The agent: on each cycle, scan every disk of the machine, ship the changes as extent logs,
checkpoint the hash map, and send a heartbeat.

Durability rule: a log is uploaded create-only first; the hash map that no longer shows its
blocks as changed is persisted after. A crash between the two re-ships those blocks in the
next cycle under new seqs (the orphan upload stays valid and is superseded), so no write is
ever lost. Logs close only at chunk boundaries, so at a checkpoint every changed block
before the scan position is in an uploaded log.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hotspare.capture.scan import scan
from hotspare.capture.state import DiskState, StateDir
from hotspare.catalog import load_catalog
from hotspare.capture.upload import DEFAULT_LOG_TARGET, last_seq_in_store, upload_log
from hotspare.errors import HotspareError
from hotspare.faults import crash_point
from hotspare.heartbeat import send_heartbeat
from hotspare.extentlog import Extent, LogWriter
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.machine import DiskSpec, MachineConfig, device_size
from hotspare.store.base import Store



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
        log_target: int = DEFAULT_LOG_TARGET,
        emit: Callable[[dict], None] | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.state = StateDir(state_dir)
        self.log_target = log_target
        self.emit = emit
        self.progress = progress
        self.stop_requested = False
        self._lock_fd: int | None = None

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

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- one cycle -----------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        reports = []
        for spec in self.config.disks:
            reports.append(self.ship_disk(spec))
            if self.stop_requested:
                break
        self.heartbeat(reports)
        return CycleReport(self.config.name, reports, stopped=self.stop_requested)

    def ship_disk(self, spec: DiskSpec) -> DiskReport:
        t0 = time.monotonic()
        size = device_size(spec.path)
        if size != spec.size:
            raise HotspareError(f"disk {spec.name} ({spec.path}) is {size} bytes, registered as {spec.size}: "
                                "re-protect the machine to change a disk's size")
        state = self.state.load(spec.name) or DiskState.fresh(epoch=0, block_size=spec.block_size, disk_size=size)
        if (state.block_size, state.disk_size) != (spec.block_size, spec.size):
            raise HotspareError(f"agent state of disk {spec.name} is for another geometry; remove "
                                f"{self.state.root}/{spec.name}.json to re-seed")
        catalog = load_catalog(self.store, self.config.name, spec.name, spec.size)
        if catalog.fence_of(state.epoch) is not None:
            raise Fenced(f"machine {self.config.name} is fenced: epoch {state.epoch} ended at a failover and its "
                         "VM's replica is the truth now; nothing shipped. Run `hotspare agent "
                         f"{self.config.name} --restore` to fail back")
        state.last_seq = last_seq_in_store(self.store, self.config.name, spec.name, state.epoch, state.last_seq)
        resync_from = None
        if catalog.resync_from is not None and state.resynced_for != catalog.resync_from:
            # A log was rejected and left a hole: re-send every block (zeros included), and
            # mark the first log so ingest lets it close the hole.
            # Recorded with the first checkpoint, so a crash mid-resync continues it
            # instead of flipping the hashes back.
            resync_from = state.resynced_for = catalog.resync_from
            state.hashes ^= np.uint64(0xFFFFFFFFFFFFFFFF)
        report = DiskReport(disk=spec.name, epoch=state.epoch, resync=resync_from is not None)
        on_progress = self.progress(spec.name, size) if self.progress else None

        writer: LogWriter | None = None
        tmp: str | None = None
        ts = datetime.now(timezone.utc)

        def ship(cut: bool) -> None:
            nonlocal writer, tmp, resync_from
            assert writer is not None and tmp is not None
            # A live disk's scan is a fuzzy read: its cycle ends at a cut that is not consistent.
            key, meta = upload_log(self.store, writer, tmp, machine=self.config.name, disk=spec.name,
                                   epoch=state.epoch, who="agent", cut=cut, consistent=False)
            crash_point("agent-after-upload")
            state.last_seq = meta.last_seq
            self.state.save(spec.name, state)  # after the upload is durable, never before
            report.logs.append(key)
            writer, tmp, resync_from = None, None, None

        try:
            for chunk in scan(spec.path, state.hashes, spec.block_size, size, max_run=MAX_EXTENT, progress=on_progress):
                report.scanned_bytes = chunk.end
                for run in chunk.runs:
                    if writer is not None and writer.data_bytes + writer.rows * 64 >= self.log_target:
                        ship(cut=False)  # full, and more follows: only the cycle's last log is a cut
                    if writer is None:
                        fd, tmp = tempfile.mkstemp(prefix=f".{spec.name}-", suffix=".parquet", dir=self.state.root)
                        os.close(fd)
                        writer = LogWriter(tmp, machine=self.config.name, disk=spec.name, epoch=state.epoch,
                                           disk_size=size, resync_from=resync_from)
                    seq = state.last_seq + 1 + writer.rows
                    writer.add(Extent(seq=seq, offset=run.offset, length=run.length, data=run.data, ts=ts))
                    report.extents += 1
                    if run.data is None:
                        report.zero_bytes += run.length
                    else:
                        report.data_bytes += run.length
                if self.stop_requested:
                    if writer is not None:
                        ship(cut=False)
                    report.last_seq = state.last_seq
                    report.seconds = time.monotonic() - t0
                    return report
            if writer is not None:
                ship(cut=True)
        except BaseException:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            raise
        self.state.save(spec.name, state)
        report.last_seq = state.last_seq
        report.seconds = time.monotonic() - t0
        return report

    # -- heartbeat -----------------------------------------------------------------------
    def heartbeat(self, reports: list[DiskReport]) -> dict:
        return send_heartbeat(self.store, self.config.name, mode="normal",
                              epoch=max((r.epoch for r in reports), default=0), emit=self.emit,
                              disks={r.disk: {"last_seq": r.last_seq, "shipped_bytes": r.data_bytes + r.zero_bytes}
                                     for r in reports})

    def run(self, *, interval: float, once: bool, on_cycle: Callable[[CycleReport], None] | None = None) -> None:
        while True:
            report = self.cycle()
            if on_cycle:
                on_cycle(report)
            if once or self.stop_requested:
                return
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not self.stop_requested:
                time.sleep(min(0.2, interval))
            if self.stop_requested:
                return


def report_dict(report: CycleReport) -> dict:
    return {"machine": report.machine, "stopped": report.stopped, "disks": [asdict(d) for d in report.disks]}
