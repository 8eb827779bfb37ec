"""The agent's restore mode: what a fenced machine runs when it comes back.

It ships nothing. It first reports its *divergence* (the blocks whose content differs from
the hash map it last shipped: writes that never left the machine), then carries out the
failback flow's orders in order, reporting progress in its heartbeat. The store is the only
channel; the machine needs no inbound port.

Durability, as for capture: each data log is applied and the disk fsynced before the
progress that counts it is persisted (``restore.json``, replaced atomically). A crash
mid-log re-applies that whole log on restart; its extents carry the replica's full
content, so writing them again is harmless, and no block is ever counted as done before
it is durable.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Callable

import numpy as np

from hotspare import layout
from hotspare.capture.scan import scan
from hotspare.capture.state import DiskState, StateDir, zero_hashes
from hotspare.errors import HotspareError, UsageError
from hotspare.extentlog import validate_log
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.failback import ranges as rg
from hotspare.failback.known import KnownHashes
from hotspare.failback.orders import DiskDivergence, Order, RestoreProgress, load_orders
from hotspare.failback.plan import hashes_bytes, read_hashes
from hotspare.faults import crash_point
from hotspare.heartbeat import send_heartbeat
from hotspare.localfile import load_model, write_atomic
from hotspare.machine import DiskSpec, MachineConfig
from hotspare.replay import write_extents
from hotspare.state import load_state
from hotspare.store.base import Store

PROGRESS_FILE = "restore.json"


def open_target(path: str, size: int) -> int:
    """Open a disk for writing: an image file is created or extended to ``size``; a block
    device must be at least that large."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as err:
        raise HotspareError(f"{path}: cannot open for restore: {err.strerror}") from err
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        if st.st_size < size:
            os.ftruncate(fd, size)
        return fd
    have = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else -1
    if have < size:
        os.close(fd)
        raise HotspareError(f"{path}: not an image file or a block device of at least {size} bytes")
    return fd


def hash_disk(path: str, spec: DiskSpec, start: np.ndarray | None,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The xxh3 hash map of a disk; ``start`` (a previous map) only saves copying the
    blocks it already matches."""
    hashes = start.copy() if start is not None else zero_hashes(spec.size, spec.block_size)
    for _ in scan(path, hashes, spec.block_size, spec.size, max_run=MAX_EXTENT, progress=progress):
        pass
    return hashes


class _Stopped(Exception):
    """A stop was requested between two data logs of an order."""


class Restorer:
    """Restore mode for one machine and agent state directory."""

    def __init__(self, store: Store, config: MachineConfig, state_dir: str | os.PathLike, *,
                 emit: Callable[[dict], None] | None = None, say: Callable[[str], None] = lambda s: None) -> None:
        self.store = store
        self.config = config
        self.state = StateDir(state_dir)
        self.emit = emit
        self.say = say
        self.stop_requested = False
        self.progress: RestoreProgress | None = None
        self._last_beat = 0.0
        self._ready = False

    @property
    def _file(self):
        return self.state.root / PROGRESS_FILE

    def _save(self) -> None:
        assert self.progress is not None
        self.state.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._file, self.progress.model_dump_json())

    def _spec(self, disk: str) -> DiskSpec:
        for d in self.config.disks:
            if d.name == disk:
                return d
        raise HotspareError(f"a failback order names disk {disk!r}, which {self.config.name} does not have")

    # -- start: which failback, and the divergence ----------------------------------------
    def start(self) -> RestoreProgress:
        self.progress = load_model(self._file, RestoreProgress, "restore progress")
        if self.progress is None:
            ms = load_state(self.store, self.config.name)
            if ms.state not in ("failed-over", "failing-back"):
                raise UsageError(f"machine {self.config.name} is {ms.state} in epoch {ms.epoch}: nothing to "
                                 "restore; run the agent without --restore")
            self.progress = RestoreProgress(vm_epoch=ms.epoch)
            self._save()
        for spec in self.config.disks:
            if spec.name not in self.progress.divergence:
                self.progress.divergence[spec.name] = self._divergence(spec)
                self._save()
        self._ready = True
        return self.progress

    def _divergence(self, spec: DiskSpec) -> DiskDivergence:
        assert self.progress is not None
        shipped = self.state.load(spec.name)
        if shipped is None or shipped.epoch != self.progress.vm_epoch - 1:
            return DiskDivergence(error="no hash map of what this machine shipped in the fenced epoch")
        t0 = time.monotonic()
        try:
            now = hash_disk(spec.path, spec, shipped.hashes, progress=self._beat)
        except (HotspareError, OSError) as err:
            return DiskDivergence(error=str(err))
        self.progress.scan_rate = spec.size / max(1e-6, time.monotonic() - t0)
        blocks = np.flatnonzero(now != shipped.hashes).astype(np.uint64)
        key = layout.failback_hashes_key(self.config.name, self.progress.vm_epoch, "divergence", spec.name)
        self.store.put(key, hashes_bytes(blocks))
        nbytes = rg.total(rg.from_blocks(blocks, spec.block_size, spec.size))
        self.say(f"{spec.name}: {len(blocks)} block(s), {nbytes} bytes never shipped before the failover")
        return DiskDivergence(blocks=len(blocks), bytes=nbytes, key=key)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, *, interval: float, once: bool = False) -> bool:
        """Carry out orders until the failback finishes (True: protection resumed in the
        new epoch) or a stop is requested (False)."""
        progress = self.start()
        while True:
            try:
                for order in load_orders(self.store, self.config.name, progress.vm_epoch, after=progress.done):
                    if self.stop_requested:
                        return False
                    self.execute(order)
                    if order.kind == "finish":
                        self._file.unlink(missing_ok=True)
                        return True
            except _Stopped:
                return False
            except HotspareError as err:  # reported to the flow; retried next round
                progress.error = str(err)
                self.say(f"cannot carry out the failback's order: {err}")
            self.heartbeat(force=True)
            if once or self.stop_requested:
                return False
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not self.stop_requested:
                time.sleep(min(0.2, interval))

    def execute(self, order: Order) -> None:
        assert self.progress is not None
        if self.progress.working != order.version:
            self.progress.working, self.progress.position, self.progress.applied_bytes = order.version, 0, 0
            self._save()
        self.say(f"order {order.version} ({order.label}): {order.kind}, {order.bytes} bytes")
        if order.kind == "apply":
            self._apply(order)
        elif order.kind == "scan":
            self._scan(order)
        else:
            self._finish(order)
        self.progress.done, self.progress.working, self.progress.position = order.version, None, 0
        self.progress.error = None
        self._save()
        self.heartbeat(force=True)

    def _apply(self, order: Order) -> None:
        p = self.progress
        assert p is not None
        items = [(disk, key) for disk in sorted(order.disks) for key in order.disks[disk].logs]
        t0, moved = time.monotonic(), 0
        for i in range(p.position, len(items)):
            if self.stop_requested:  # between data logs: the progress says where to resume
                raise _Stopped
            disk, key = items[i]
            spec = self._spec(disk)
            raw = self.store.get(key)
            validate_log(io.BytesIO(raw), key, machine=self.config.name, disk=disk, epoch=order.vm_epoch,
                         disk_size=spec.size)
            target = order.disks[disk].target or spec.path
            known = self._known(order.vm_epoch, spec, target)
            known.before_write()
            fd = open_target(target, spec.size)
            try:
                n = write_extents(io.BytesIO(raw), key, fd, after_first=lambda: crash_point("restore-mid-apply"))
                os.fsync(fd)  # durable before it is counted, never after
            finally:
                os.close(fd)
            known.mark_log(raw)
            p.position, p.applied_bytes = i + 1, p.applied_bytes + n
            moved += n
            self._save()
            self.heartbeat()
        if moved:
            p.apply_rate = moved / max(1e-6, time.monotonic() - t0)

    def _scan(self, order: Order) -> None:
        p = self.progress
        assert p is not None
        for disk in sorted(order.disks):
            spec = self._spec(disk)
            path = order.disks[disk].target or spec.path
            known = self._known(order.vm_epoch, spec, path)
            os.close(open_target(path, spec.size))  # checks the target; it is opened to write
            fd = os.open(path, os.O_RDONLY)
            try:
                t0 = time.monotonic()
                again = known.rescan(fd)
            finally:
                os.close(fd)
            if again is not None:
                hashes, read = again
                self.say(f"{disk}: re-hashed {read} bytes written since the last scan (not the {spec.size}-byte disk)")
            else:
                shipped = self.state.load(disk)
                t0 = time.monotonic()
                hashes = hash_disk(path, spec, shipped.hashes if shipped else None, progress=self._beat)
                p.scan_rate = spec.size / max(1e-6, time.monotonic() - t0)
            known.keep(hashes)
            p.last_scan_bytes[disk] = read if again is not None else spec.size
            key = layout.failback_hashes_key(self.config.name, order.vm_epoch, f"scan-{order.version}", disk)
            self.store.put(key, hashes_bytes(hashes))
            p.scans[disk] = key

    def _known(self, vm_epoch: int, spec: DiskSpec, target: str) -> KnownHashes:
        return KnownHashes(self.state.root, vm_epoch, spec, target)

    def _finish(self, order: Order) -> None:
        """Adopt the verified hash maps as shipped in the new epoch: the next normal pass
        ships only what changes from now on."""
        assert order.new_epoch is not None
        for disk, key in order.scans.items():
            spec = self._spec(disk)
            hashes = read_hashes(self.store, key, -(-spec.size // spec.block_size))
            self.state.save(disk, DiskState(epoch=order.new_epoch, last_seq=-1, block_size=spec.block_size,
                                            disk_size=spec.size, hashes=hashes))
        self.say(f"failback finished: protection resumes in epoch {order.new_epoch}")

    # -- heartbeat ----------------------------------------------------------------------------
    def _beat(self, _bytes: int) -> None:
        """Keep beating through a long scan, so the flow knows the agent is alive (not during
        the divergence scan: the first restore heartbeat starts the failback, which needs it)."""
        if self._ready:
            self.heartbeat()

    def heartbeat(self, force: bool = False) -> dict | None:
        """A restore-mode heartbeat with the progress (at most one a second unless forced)."""
        if self.progress is None or (not force and time.monotonic() - self._last_beat < 1.0):
            return None
        self._last_beat = time.monotonic()
        return send_heartbeat(self.store, self.config.name, mode="restore", epoch=self.progress.vm_epoch - 1,
                              disks={}, restore=self.progress.model_dump(mode="json"), emit=self.emit)
