"""Capture of a VM's writes as extent logs of a new epoch, by rotating qcow2 overlays.

One capture step (:meth:`VmCapture.ship_once`), every few seconds:

1. rotate: a new empty overlay is put on top of the running VM's chain (QMP
   ``blockdev-add`` + ``blockdev-snapshot``), so the overlay that took the guest's writes
   until now is frozen; QEMU flushes it as part of the switch;
2. ship: the ranges the frozen overlay itself holds (``qemu-img map`` of that file alone)
   are read straight from the qcow2 file at their mapped offsets (zero clusters become
   null extents), written as an extent log whose seqs continue the epoch's (more than one
   past LOG_TARGET bytes), and uploaded create-only to ``layout.log_key``;
3. commit: the shipped overlay is folded into ``base.qcow2`` (QMP ``block-commit``) and
   deleted.

Why commit into base.qcow2, and not keep every overlay or stream: keeping them would add a
layer every few seconds, and reads and open files grow with the chain; ``block-stream``
into the active overlay would copy old writes into it and the next rotation would ship them
again. An intermediate commit into a base that is never shipped keeps the chain at three or
four layers, needs no pivot of the active layer, runs while the guest keeps writing, and
never touches the boot disk (the replica image), which stays read-only under base.qcow2.

Crash safety: the state file (``<workdir>/capture-<disk>.json``) records the epoch, the last
shipped seq and the frozen overlays already uploaded; the chain itself is read from QEMU
(or, for a dead VM, from the qcow2 headers), never from memory. A crash after an upload but
before the state is saved ships that overlay again under new seqs (a later seq supersedes
the same bytes, nothing is lost); the store is checked for such seqs so none is reused.
If an upload fails, the frozen overlays stay in the chain and the next step ships them
first, in write order.

A VM that died (killed, crashed) is shipped offline: every overlay above base.qcow2,
its last active one included, holds writes up to the death, and is read from the files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from hotspare import layout
from hotspare.capture.upload import DEFAULT_LOG_TARGET
from hotspare.errors import HotspareError, StoreError
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.faults import crash_point
from hotspare.store.base import Store
from hotspare.vm import chain
from hotspare.vm.capture_state import CaptureState, load_state, save_state
from hotspare.vm.host import VmHandle
from hotspare.vm.local import file_lock
from hotspare.vm.qmp import QmpClient, QmpError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0
COMMIT_TIMEOUT = 300.0
MAX_FROZEN = 8  # frozen overlays waiting for the store before rotation pauses
# A log is closed at about this many data bytes, as the agent does, so that a large
# backlog never makes one huge object.
LOG_TARGET = DEFAULT_LOG_TARGET


class QmpHost(Protocol):
    """What capture needs from a host: QEMU hosts whose overlay files this process reads."""

    def qmp(self, handle: VmHandle) -> QmpClient: ...
    def is_alive(self, handle: VmHandle) -> bool: ...
    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None: ...


class VmCapture:
    """Ships one VM disk's writes to ``store`` as extent logs of ``epoch``."""

    def __init__(self, host: QmpHost, handle: VmHandle, store: Store, *, disk: str, epoch: int,
                 disk_size: int | None = None) -> None:
        self.host, self.handle, self.store = host, handle, store
        self.workdir = Path(handle.workdir)
        self.ovdir = chain.overlay_dir(self.workdir)
        self.virtual_size = chain.image_size(handle.boot_disk, handle.format)
        size = self.virtual_size if disk_size is None else disk_size
        self.state_path = self.workdir / f"capture-{layout.check_name('disk', disk)}.json"
        self._lock = threading.Lock()
        self.state = load_state(self.state_path) or CaptureState(machine=handle.machine, disk=disk, epoch=epoch, disk_size=size)
        if (self.state.machine, self.state.disk, self.state.epoch, self.state.disk_size) != (handle.machine, disk, epoch, size):
            raise HotspareError(f"{self.state_path}: capture state is for machine {self.state.machine} disk "
                                f"{self.state.disk} epoch {self.state.epoch} size {self.state.disk_size}, not "
                                f"{handle.machine} {disk} epoch {epoch} size {size}")

    # -- one step ------------------------------------------------------------------------
    def ship_once(self) -> list[str]:
        """Rotate, ship and commit once; returns the keys of the logs uploaded (none when the
        guest wrote nothing since the last step)."""
        return self._step(final=False)

    def _step(self, final: bool) -> list[str]:
        with self._lock, file_lock(self.workdir / "capture.lock"):
            self.state.last_seq = self.state.last_in_store(self.store)
            live = self.host.is_alive(self.handle)
            if live:
                try:
                    base, frozen, active = self._rotate(force=final)
                except QmpError:
                    if self.host.is_alive(self.handle):
                        raise
                    live = False
                crash_point("vm-capture-after-rotate")
            if not live:
                layers = chain.chain_from_files(self.workdir, self.handle.boot_disk)
                base, frozen = (layers[0], layers[1:]) if layers else ("", [])
            keys = []
            for overlay in frozen:  # oldest first, so seqs follow the order of the writes
                if overlay not in self.state.shipped:
                    keys += self._ship(overlay)
                    crash_point("vm-capture-after-upload")
                    self.state.shipped.append(overlay)
                    save_state(self.state_path, self.state)
            if live:
                try:
                    self._commit(base, frozen, active)
                except QmpError:
                    if self.host.is_alive(self.handle):
                        raise
                    # Died after the upload: what is shipped is recorded; the next step is offline.
            return keys

    def _rotate(self, force: bool) -> tuple[str, list[str], str]:
        """Freeze the active overlay under a new one; (base, frozen overlays oldest first,
        active overlay). While the store is failing, frozen overlays pile up; past
        MAX_FROZEN the active one is left to grow instead, so that the chain (and QEMU's
        open files) stays bounded; the final capture always rotates."""
        with self.host.qmp(self.handle) as q:
            self._settle_jobs(q)  # a commit left running by a crashed capture must end first
            layers = chain.live_chain(q, self.handle.disk_device)
            if len(layers) < 2 or os.path.basename(layers[0]) != chain.BASE:
                raise HotspareError(f"VM {self.handle.vm_id}: unexpected disk chain {layers} (want base.qcow2 "
                                    "under at least one overlay)")
            self._drop_orphan_nodes(q, layers)
            if len(layers) - 2 >= MAX_FROZEN and not force:
                return layers[0], layers[1:-1], layers[-1]
            index = 1 + max((chain.overlay_index(p) or 0 for p in self.ovdir.glob("ov-*.qcow2")), default=0)
            new = str(self.ovdir / chain.overlay_name(index))
            chain.create_overlay(Path(new), layers[-1], "qcow2", self.virtual_size)
            try:
                q.execute("blockdev-add", chain.overlay_blockdev(new, None))
                try:
                    # Drains the guest's in-flight writes and flushes the old top first.
                    q.execute("blockdev-snapshot", node=chain.node_name(layers[-1]), overlay=chain.node_name(new))
                except QmpError:
                    q.execute("blockdev-del", {"node-name": chain.node_name(new)})
                    raise
            except QmpError:
                os.unlink(new)
                raise
        return layers[0], layers[1:], new

    def _ship(self, overlay: str) -> list[str]:
        """Upload what ``overlay`` holds as logs (one, unless it holds more than LOG_TARGET
        bytes); their keys, none if it holds nothing. ``last_seq`` is saved with the
        overlay's entry in ``shipped``."""
        src = os.open(overlay, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.state.ship(self.store, self._extents(overlay, src), self.workdir, overlay,
                                   log_target=LOG_TARGET)
        finally:
            os.close(src)

    def _extents(self, overlay: str, src: int) -> Iterator[tuple[int, int, bytes | None]]:
        """The overlay's clusters as (offset, length, data or None for zeros)."""
        size = self.state.disk_size
        for a in chain.allocations(overlay):
            if a.offset + a.length > size:
                raise HotspareError(f"{overlay}: guest wrote {a.offset}+{a.length}, past the disk's {size} bytes")
            for off in range(0, a.length, MAX_EXTENT):
                n = min(MAX_EXTENT, a.length - off)
                data = None
                if a.host_offset is not None:
                    data = os.pread(src, n, a.host_offset + off)
                    if len(data) != n:
                        raise HotspareError(f"{overlay}: short read at file offset {a.host_offset + off}")
                yield a.offset + off, n, data

    def _commit(self, base: str, frozen: list[str], active: str) -> None:
        """Fold the shipped overlays into base.qcow2, oldest first, and delete them."""
        with self.host.qmp(self.handle) as q:
            for overlay in frozen:
                job = f"hs-commit-{uuid.uuid4().hex[:8]}"
                q.execute("block-commit", {"job-id": job, "device": chain.node_name(active),
                                           "top-node": chain.node_name(overlay), "base-node": chain.node_name(base),
                                           "auto-dismiss": False})
                crash_point("vm-capture-commit-started")
                self._wait_job(q, job)
                # Nodes opened by -blockdev or blockdev-add belong to the monitor and stay
                # open after leaving the chain until deleted.
                q.execute("blockdev-del", {"node-name": chain.node_name(overlay)})
                self.state.shipped = [s for s in self.state.shipped if s != overlay]
                save_state(self.state_path, self.state)
                Path(overlay).unlink(missing_ok=True)
            in_use = set(chain.live_chain(q, self.handle.disk_device))
        # Files left by a crash between steps: below the active overlay and not in the
        # chain. Compared by inode, never by spelling of the path, since a wrong delete
        # would lose the guest's disk on its next boot.
        used = {(st.st_dev, st.st_ino) for st in (os.stat(p) for p in in_use)}
        top = chain.overlay_index(active) or 0
        for path in self.ovdir.glob("ov-*.qcow2"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if (chain.overlay_index(path) or top) < top and (st.st_dev, st.st_ino) not in used:
                path.unlink(missing_ok=True)
        if any(s not in in_use for s in self.state.shipped):
            self.state.shipped = [s for s in self.state.shipped if s in in_use]
            save_state(self.state_path, self.state)

    def _drop_orphan_nodes(self, q: QmpClient, layers: list[str]) -> None:
        """Close overlay nodes QEMU keeps open outside the chain: left by a capture that
        crashed between a commit and its blockdev-del, or by a half-failed rotation."""
        in_chain = {chain.node_name(p) for p in layers}
        for node in q.execute("query-named-block-nodes", flat=True):
            name = str(node.get("node-name", ""))
            if name.startswith("hs-ov-") and name not in in_chain:
                try:
                    q.execute("blockdev-del", {"node-name": name})
                except QmpError as err:
                    log.warning("VM %s: cannot close orphan node %s: %s", self.handle.vm_id, name, err)

    def _settle_jobs(self, q: QmpClient) -> None:
        for job in q.execute("query-jobs"):
            if str(job.get("id", "")).startswith("hs-commit-"):
                self._wait_job(q, job["id"], check=False)

    def _wait_job(self, q: QmpClient, job: str, *, check: bool = True) -> None:
        deadline = time.monotonic() + COMMIT_TIMEOUT
        while True:
            info = next((j for j in q.execute("query-jobs") if j.get("id") == job), None)
            if info is None:
                return
            if info["status"] == "concluded":
                q.execute("job-dismiss", id=job)
                if check and info.get("error"):
                    raise HotspareError(f"VM {self.handle.vm_id}: commit job {job} failed: {info['error']}")
                return
            if time.monotonic() > deadline:
                raise HotspareError(f"VM {self.handle.vm_id}: commit job {job} still {info['status']} "
                                    f"after {COMMIT_TIMEOUT:.0f} s")
            time.sleep(0.02)

    # -- loop and end --------------------------------------------------------------------
    def run(self, interval: float = DEFAULT_INTERVAL, stop: threading.Event | None = None,
            on_ship: Callable[[list[str]], object] | None = None) -> None:
        """Ship every ``interval`` seconds until ``stop`` is set or the VM is gone (after
        shipping its last writes). Transient store errors are logged and retried."""
        stop = stop or threading.Event()
        while not stop.is_set():
            started = time.monotonic()
            alive = self.host.is_alive(self.handle)
            try:
                keys = self.ship_once()
            except (StoreError, QmpError) as err:
                # A slow store or a QMP socket busy with another client: the frozen overlays
                # wait in the chain and the next step ships them. Anything else is a fault.
                transient = err.transient if isinstance(err, StoreError) else err.error_class is None
                if not transient or not self.host.is_alive(self.handle):
                    raise
                log.warning("capture of %s: %s; retrying in %.0f s", self.handle.vm_id, err, interval)
                keys = []
            if keys and on_ship is not None:
                on_ship(keys)
            if not alive:
                return
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def final_capture(self, timeout: float = 30.0) -> list[str]:
        """Stop the VM with nothing lost: pause it, ship its last writes, then quit it.
        For a VM that is already gone, ship what its overlays hold."""
        keys: list[str] = []
        paused_capture = False

        def capture_paused() -> None:
            nonlocal paused_capture
            keys.extend(self._step(final=True))
            paused_capture = True

        self.host.stop(self.handle, timeout, before_quit=capture_paused)
        if not paused_capture:
            keys.extend(self.ship_once())  # the VM was gone before the pause: ship offline
        return keys
