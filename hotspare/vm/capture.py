"""Capture of a VM's writes as extent logs of a new epoch, by rotating qcow2 overlays.

One capture step (:meth:`VmCapture.ship_once`), every few seconds:

1. rotate: a new empty overlay is put on top of the running VM's chain (QMP
   ``blockdev-add`` + ``blockdev-snapshot``), so the overlay that took the guest's writes
   until now is frozen; QEMU flushes it as part of the switch;
2. ship: the ranges the frozen overlay itself holds (``qemu-img map`` of that file alone)
   are read straight from the qcow2 file at their mapped offsets (zero clusters become
   null extents), written as one extent log whose seqs continue the epoch's, and uploaded
   create-only to ``layout.log_key``;
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
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError

from hotspare import layout
from hotspare.errors import AlreadyExists, HotspareError, StoreError
from hotspare.extentlog import Extent, LogWriter
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.store.base import Store
from hotspare.vm import chain
from hotspare.vm.host import VmHandle
from hotspare.vm.local import file_lock
from hotspare.vm.qmp import QmpClient, QmpError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0
COMMIT_TIMEOUT = 300.0


class QmpHost(Protocol):
    """What capture needs from a host: QEMU hosts whose overlay files this process reads."""

    def qmp(self, handle: VmHandle) -> QmpClient: ...
    def is_alive(self, handle: VmHandle) -> bool: ...
    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None: ...


class CaptureState(BaseModel):
    machine: str
    disk: str
    epoch: int = Field(ge=0)
    disk_size: int = Field(gt=0)
    last_seq: int = Field(-1, ge=-1, description="last seq uploaded in this epoch")
    shipped: list[str] = Field(default_factory=list,
                               description="frozen overlays whose extents are uploaded, not yet committed")


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
        self.state = self._load() or CaptureState(machine=handle.machine, disk=disk, epoch=epoch, disk_size=size)
        if (self.state.machine, self.state.disk, self.state.epoch, self.state.disk_size) != (handle.machine, disk, epoch, size):
            raise HotspareError(f"{self.state_path}: capture state is for machine {self.state.machine} disk "
                                f"{self.state.disk} epoch {self.state.epoch} size {self.state.disk_size}, not "
                                f"{handle.machine} {disk} epoch {epoch} size {size}")

    # -- one step ------------------------------------------------------------------------
    def ship_once(self) -> list[str]:
        """Rotate, ship and commit once; returns the keys of the logs uploaded (none when the
        guest wrote nothing since the last step)."""
        with self._lock, file_lock(self.workdir / "capture.lock"):
            self._catch_up_seq()
            live = self.host.is_alive(self.handle)
            if live:
                try:
                    base, frozen, active = self._rotate()
                except QmpError:
                    if self.host.is_alive(self.handle):
                        raise
                    live = False
            if not live:
                layers = chain.chain_from_files(self.workdir, self.handle.boot_disk)
                base, frozen = (layers[0], layers[1:]) if layers else ("", [])
            keys = []
            for overlay in frozen:  # oldest first, so seqs follow the order of the writes
                if overlay not in self.state.shipped:
                    key = self._ship(overlay)
                    if key:
                        keys.append(key)
                    self.state.shipped.append(overlay)
                    self._save()
            if live:
                try:
                    self._commit(base, frozen, active)
                except QmpError:
                    if self.host.is_alive(self.handle):
                        raise
                    # Died after the upload: what is shipped is recorded; the next step is offline.
            return keys

    def _rotate(self) -> tuple[str, list[str], str]:
        """Freeze the active overlay under a new one; (base, frozen overlays oldest first,
        new active overlay)."""
        with self.host.qmp(self.handle) as q:
            self._settle_jobs(q)  # a commit left running by a crashed capture must end first
            layers = chain.live_chain(q, self.handle.disk_device)
            if len(layers) < 2 or os.path.basename(layers[0]) != chain.BASE:
                raise HotspareError(f"VM {self.handle.vm_id}: unexpected disk chain {layers} (want base.qcow2 "
                                    "under at least one overlay)")
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

    def _ship(self, overlay: str) -> str | None:
        """Upload what ``overlay`` holds as one log; its key, or None if it holds nothing."""
        allocations = chain.allocations(overlay)
        if not allocations:
            return None
        st = self.state
        fd, tmp = tempfile.mkstemp(prefix=".capture-", suffix=".parquet", dir=self.workdir)
        os.close(fd)
        try:
            writer = LogWriter(tmp, machine=st.machine, disk=st.disk, epoch=st.epoch, disk_size=st.disk_size)
            ts = datetime.now(timezone.utc)
            src = os.open(overlay, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for a in allocations:
                    if a.offset + a.length > st.disk_size:
                        raise HotspareError(f"{overlay}: guest wrote {a.offset}+{a.length}, past the disk's "
                                            f"{st.disk_size} bytes")
                    for off in range(0, a.length, MAX_EXTENT):
                        n = min(MAX_EXTENT, a.length - off)
                        data = None
                        if a.host_offset is not None:
                            data = os.pread(src, n, a.host_offset + off)
                            if len(data) != n:
                                raise HotspareError(f"{overlay}: short read at file offset {a.host_offset + off}")
                        writer.add(Extent(seq=st.last_seq + 1 + writer.rows, offset=a.offset + off,
                                          length=n, data=data, ts=ts))
            finally:
                os.close(src)
            meta = writer.close()
            key = layout.log_key(st.machine, st.disk, st.epoch, meta.first_seq, meta.last_seq)
            try:
                self.store.put_file(key, tmp, create_only=True)
            except AlreadyExists:
                raise HotspareError(f"{key} already exists: is another capture shipping {st.machine} "
                                    f"disk {st.disk}?") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        st.last_seq = meta.last_seq
        log.info("shipped %s (%d extents, %d data bytes) from %s", key, writer.rows, writer.data_bytes, overlay)
        return key

    def _commit(self, base: str, frozen: list[str], active: str) -> None:
        """Fold the shipped overlays into base.qcow2, oldest first, and delete them."""
        with self.host.qmp(self.handle) as q:
            for overlay in frozen:
                job = f"hs-commit-{uuid.uuid4().hex[:8]}"
                q.execute("block-commit", {"job-id": job, "device": chain.node_name(active),
                                           "top-node": chain.node_name(overlay), "base-node": chain.node_name(base),
                                           "auto-dismiss": False})
                self._wait_job(q, job)
                # Nodes opened by -blockdev or blockdev-add belong to the monitor and stay
                # open after leaving the chain until deleted.
                q.execute("blockdev-del", {"node-name": chain.node_name(overlay)})
                self.state.shipped = [s for s in self.state.shipped if s != overlay]
                self._save()
                Path(overlay).unlink(missing_ok=True)
            in_use = set(chain.live_chain(q, self.handle.disk_device))
        for path in self.ovdir.glob("ov-*.qcow2"):  # left by a crash between steps
            if str(path) not in in_use:
                path.unlink(missing_ok=True)
        if any(s not in in_use for s in self.state.shipped):
            self.state.shipped = [s for s in self.state.shipped if s in in_use]
            self._save()

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
            except StoreError as err:
                if not err.transient:
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
            keys.extend(self.ship_once())
            paused_capture = True

        self.host.stop(self.handle, timeout, before_quit=capture_paused)
        if not paused_capture:
            keys.extend(self.ship_once())  # the VM was gone before the pause: ship offline
        return keys

    # -- state ---------------------------------------------------------------------------
    def _catch_up_seq(self) -> None:
        st = self.state
        prefix = layout.logs_prefix(st.machine, st.disk, st.epoch)
        after = f"{prefix}{layout.num(st.last_seq)}-~" if st.last_seq >= 0 else None
        for info in self.store.list(prefix, start_after=after):
            seqs = layout.parse_log_name(info.key)
            if seqs and seqs[1] > st.last_seq:
                st.last_seq = seqs[1]

    def _load(self) -> CaptureState | None:
        try:
            return CaptureState.model_validate_json(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as err:
            raise HotspareError(f"{self.state_path}: unreadable capture state ({err})") from err

    def _save(self) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(self.state.model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
