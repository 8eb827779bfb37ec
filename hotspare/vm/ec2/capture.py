"""Capture of an EC2 stand-in VM's writes as extent logs of a new epoch, by EBS snapshots.

Every disk of the VM is captured on its own: one :class:`Ec2DeltaCapture` per disk, which
snapshots that disk's volume and ships to that disk's log stream (its own state file too).
:func:`final_capture` ends the VM once, shipping every disk's last writes while it is stopped.

One capture step (:meth:`Ec2DeltaCapture.ship_once`), of one disk:

1. snapshot: ``CreateSnapshot`` of the disk's volume (crash-consistent while the instance
   runs; consistent once it is stopped, as in the final capture), waited for;
2. compare: the blocks that differ between the previous snapshot (at first, the snapshot
   the disk's volume was made from) and the new one;
3. ship: those blocks read with ``GetSnapshotBlock`` (checksums verified), written as extent
   logs whose seqs continue the epoch's (one 512 KiB extent per block, null data for a
   block that reads as zeros, a new log past LOG_TARGET bytes), uploaded create-only to
   ``layout.log_key``; then the new snapshot becomes the previous one and the old one is
   deleted (the disk's first snapshot stays: the image holds it).

Which blocks differ (``method``):

- ``list-changed-blocks`` (the default, and what real AWS uses): EBS's ``ListChangedBlocks``
  between the two snapshots, which are of one lineage (the disk's volume was made from the
  disk's first snapshot). Not exercised by the tests: moto's answer was wrong once (it listed a
  block both snapshots hold and missed one only the second holds).
- ``compare-listings``: ``ListSnapshotBlocks`` of both snapshots compared by index and
  token; where both hold a block under different tokens, both blocks are read and compared,
  so only real differences ship. It costs a full listing of both snapshots and two reads
  per candidate; it is the path the tests (on moto) exercise.

Crash safety: the state file (``<workdir>/ec2-capture-<disk>.json``) holds the epoch, the
last shipped seq and the previous snapshot. A crash after an upload but before the state
is saved ships the same blocks again under new seqs (a later seq supersedes the same
bytes, nothing is lost); the store is listed for seqs past the state's so none is reused.
Snapshots a crash leaves behind carry the VM id tag and go with :meth:`Ec2Host.release`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from hotspare import layout
from hotspare.capture.upload import DEFAULT_LOG_TARGET
from hotspare.errors import HotspareError, UsageError
from hotspare.localfile import file_lock, load_model, write_atomic
from hotspare.store.base import Store
from hotspare.vm.ec2.aws import Ec2Error, aws_call
from hotspare.vm.ec2.capture_state import CaptureCursor
from hotspare.vm.ec2.ebs import (
    EBS_BLOCK,
    ZERO_BLOCK,
    ChangedBlock,
    changed_blocks,
    changed_blocks_by_listing,
    image_size,
    read_block,
    wait_snapshot,
)
from hotspare.vm.ec2.host import Ec2Host
from hotspare.vm.ec2.resources import TAG_DISK, TAG_ROLE, tag_list
from hotspare.vm.host import VmHandle, ebs_snapshot_of

log = logging.getLogger(__name__)

ChangeMethod = Literal["list-changed-blocks", "compare-listings"]
# A log is closed at about this many data bytes, as the agent's and VmCapture's are.
LOG_TARGET = DEFAULT_LOG_TARGET
_UNCHANGED = object()


class Ec2CaptureState(CaptureCursor):
    base_snapshot: str | None = Field(None, description="the snapshot the next delta is taken against; "
                                                        "None: the VM's boot snapshot")


class Ec2DeltaCapture:
    """Ships one EC2 VM disk's writes to ``store`` as extent logs of ``epoch``."""

    def __init__(self, host: Ec2Host, handle: VmHandle, store: Store, *, disk: str, epoch: int,
                 disk_size: int | None = None, method: ChangeMethod = "list-changed-blocks") -> None:
        self.host, self.handle, self.store, self.method = host, handle, store, method
        self.workdir = Path(handle.workdir)
        # The launch's record of the disk (None for a handle of one disk from before it was kept).
        self.ebs_disk = host.ebs_disk(handle, disk) if handle.ebs_disks else None
        if disk_size is None and self.ebs_disk is not None:
            disk_size = self.ebs_disk.size
        if disk_size is None and ebs_snapshot_of(handle.boot_disk) is not None:
            raise UsageError(f"VM {handle.vm_id} boots from {handle.boot_disk}, a point's snapshot: give the "
                             "disk's size (disk_size), EBS volumes are whole GiB")
        size = image_size(handle.boot_disk, handle.format) if disk_size is None else disk_size
        self.state_path = self.workdir / f"ec2-capture-{layout.check_name('disk', disk)}.json"
        self._lock = threading.Lock()
        self.state = self._load() or Ec2CaptureState(machine=handle.machine, disk=disk, epoch=epoch, disk_size=size)
        if (self.state.machine, self.state.disk, self.state.epoch, self.state.disk_size) != (handle.machine, disk, epoch, size):
            raise HotspareError(f"{self.state_path}: capture state is for machine {self.state.machine} disk "
                                f"{self.state.disk} epoch {self.state.epoch} size {self.state.disk_size}, not "
                                f"{handle.machine} {disk} epoch {epoch} size {size}")

    # -- steps ---------------------------------------------------------------------------
    def ship_once(self) -> list[str]:
        """Snapshot the disk's volume and ship what changed since the previous snapshot;
        returns the keys of the logs uploaded (none when nothing changed)."""
        # One capture per disk at a time, across threads and processes (the state file).
        with self._lock, file_lock(self.state_path.with_suffix(".lock")):
            boot = self.host.boot_snapshot_id(self.handle, self._disk_name)
            base = self.state.base_snapshot or boot
            new = self.snapshot_disk()
            keys = self.ship_delta(base, new)
            self.state.base_snapshot = new
            self._save()
            if base != boot:
                try:
                    with aws_call("DeleteSnapshot", base):
                        self.host.ec2.delete_snapshot(SnapshotId=base)
                except Ec2Error as err:  # tagged: release() deletes it later
                    log.warning("capture of %s: previous snapshot not deleted: %s", self.handle.vm_id, err)
            return keys

    def final_capture(self, timeout: float = 30.0) -> list[str]:
        """:func:`final_capture` of this disk, for a VM of one disk."""
        return final_capture([self], timeout)

    @property
    def _disk_name(self) -> str | None:
        return self.ebs_disk.name if self.ebs_disk is not None else None

    def snapshot_disk(self) -> str:
        """A completed snapshot of the disk's volume, tagged for release."""
        volume = self.host.disk_volume_id(self.handle, self._disk_name)
        tags = self.host.resource_tags(self.handle.machine, self.handle.vm_id,
                                       **{TAG_ROLE: "capture", TAG_DISK: self.state.disk})
        with aws_call("CreateSnapshot", volume):
            snap = self.host.ec2.create_snapshot(
                VolumeId=volume, Description=f"hotspare capture of {self.handle.vm_id} disk {self.state.disk}",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": tag_list(tags)}])["SnapshotId"]
        cfg = self.host.config
        wait_snapshot(self.host.ec2, snap, timeout=cfg.snapshot_timeout, interval=cfg.poll_interval)
        return str(snap)

    def ship_delta(self, first: str, second: str) -> list[str]:
        """Ship the blocks that differ from snapshot ``first`` to snapshot ``second`` as
        logs; returns their keys. Replayed over the disk as ``first`` holds it, they give
        the disk as ``second`` holds it (up to the disk's size)."""
        ebs = self.host.ebs
        if self.method == "list-changed-blocks":
            changes = changed_blocks(ebs, first, second)
        else:
            changes = changed_blocks_by_listing(ebs, first, second)
        st = self.state
        st.last_seq = st.last_in_store(self.store)
        extents = (e for change, data in self._read_all(first, second, changes)
                   if (e := self._extent(second, change, data)) is not None)
        return st.ship(self.store, extents, self.workdir, second, log_target=LOG_TARGET, after_upload=self._save)

    # -- parts ---------------------------------------------------------------------------
    def _read_all(self, first: str, second: str, changes: list[ChangedBlock]) -> Iterator[tuple[ChangedBlock, object]]:
        """(change, data) in block order: bytes, None for zeros, or _UNCHANGED. Reads run
        upload_workers at a time, in windows, so memory holds a window of blocks only."""
        compare = self.method == "compare-listings"
        workers = self.host.config.upload_workers
        ebs = self.host.ebs

        def read(c: ChangedBlock) -> object:
            if c.second_token is None:
                return None  # the second snapshot does not hold it: zeros
            data = read_block(ebs, second, c.index, c.second_token)
            if compare:
                # Listing tokens say nothing about data; compare what both snapshots hold.
                before = read_block(ebs, first, c.index, c.first_token) if c.first_token else ZERO_BLOCK
                if before == data:
                    return _UNCHANGED
            return None if data == ZERO_BLOCK else data

        window = 4 * workers
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ebs-get") as pool:
            for start in range(0, len(changes), window):
                batch = changes[start:start + window]
                yield from zip(batch, pool.map(read, batch))

    def _extent(self, snapshot: str, change: ChangedBlock, data: object) -> tuple[int, int, bytes | None] | None:
        """(offset, length, data) of the block cut to the disk's size, or None to skip."""
        if data is _UNCHANGED:
            return None
        size = self.state.disk_size
        offset = change.index * EBS_BLOCK
        length = min(EBS_BLOCK, size - offset)
        assert data is None or isinstance(data, bytes)
        # The volume is whole GiB, the disk may be smaller: the guest can write past the
        # disk's end, and those bytes have no place in the replica.
        if data is not None and (length <= 0 or data[length:] != ZERO_BLOCK[length:]):
            raise HotspareError(f"VM {self.handle.vm_id}: {snapshot} block {change.index} holds data past the "
                                f"disk's {size} bytes (the guest wrote beyond the replica's disk)")
        if length <= 0:
            return None
        return offset, length, None if data is None else data[:length]

    def _load(self) -> Ec2CaptureState | None:
        return load_model(self.state_path, Ec2CaptureState, "capture state")

    def _save(self) -> None:
        write_atomic(self.state_path, self.state.model_dump_json(indent=1))


def final_capture(captures: Sequence[Ec2DeltaCapture], timeout: float = 30.0) -> list[str]:
    """Ship the VM's last writes, every disk's, and end it: a running VM is stopped first,
    so that its disks no longer change, each disk is shipped, and the VM is terminated; a
    gone VM's kept volumes are shipped offline. Then everything the VM left is released.
    ``captures``: one per disk of the VM, all of one handle; returns the keys uploaded."""
    if not captures:
        raise UsageError("final_capture needs the capture of every disk of the VM")
    host, handle = captures[0].host, captures[0].handle
    if any(c.handle.vm_id != handle.vm_id for c in captures):
        raise UsageError(f"final_capture of VM {handle.vm_id}: the captures are of different VMs")
    # Ending the VM with a disk left out would drop that disk's last writes for good.
    missing = sorted({d.name for d in handle.ebs_disks} - {c.state.disk for c in captures})
    if missing:
        raise UsageError(f"final capture of VM {handle.vm_id} ({handle.machine}) misses disk(s) "
                         f"{', '.join(missing)}: pass an Ec2DeltaCapture of every disk to hotspare.vm.ec2.capture.final_capture")
    keys: list[str] = []

    def ship_all() -> None:
        for c in captures:
            keys.extend(c.ship_once())

    if host.is_alive(handle):
        host.stop(handle, timeout, before_quit=ship_all)
    else:
        ship_all()
        host.release(handle)
    return keys
