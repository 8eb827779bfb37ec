"""The VM host interface, and the spec and handle every host speaks.

A host launches a VM from a :class:`VmSpec` and answers with a :class:`VmHandle`. The handle
is plain JSON: a flow stores it in the machine's state, and after a crash of the flow (not
of the VM) hands it back to any host object of the same kind to find the VM again. Each
host also writes it to ``<workdir>/handle.json``, so :meth:`VmHost.find_running` finds a VM
from its work directory alone and a second launch there adopts the VM instead of starting
another one.
"""

from __future__ import annotations

import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hotspare import layout
from hotspare.demodisk import Marker, parse_markers
from hotspare.errors import HotspareError
from hotspare.localfile import load_model, write_atomic
from hotspare.machine import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:
    from hotspare.catalog import Catalog, RecoveryPoint
    from hotspare.machine import DiskSpec
    from hotspare.store.base import Store

HostKind = Literal["local-qemu", "docker-qemu", "ec2"]
DiskFormat = Literal["raw", "vpc"]
Accel = Literal["kvm", "tcg"]
HANDLE_FILE = "handle.json"


NBD_PREFIX = "nbd+unix://"
# A disk already on EBS (a point's snapshot, made before the launch): the EC2 host boots it
# without an upload.
EBS_SNAPSHOT_PREFIX = "ebs-snapshot://"
_EBS_SNAPSHOT = re.compile(r"ebs-snapshot://(snap-[0-9a-f]{8,32})")


def ebs_snapshot_of(backing: str) -> str | None:
    """The snapshot id of an ``ebs-snapshot://SNAPSHOT`` backing, else None."""
    m = _EBS_SNAPSHOT.fullmatch(backing)
    return m.group(1) if m else None


def nbd_socket_of(backing: str) -> str | None:
    """The unix socket of an ``nbd+unix:///[EXPORT]?socket=PATH`` backing, else None."""
    if not backing.startswith(NBD_PREFIX):
        return None
    _, _, query = backing.partition("?")
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "socket" and value:
            return value
    raise ValueError(f"NBD backing {backing!r} names no socket (want nbd+unix:///EXPORT?socket=PATH)")


def nbd_export_of(backing: str) -> str:
    """The export name of an ``nbd+unix:///EXPORT?socket=PATH`` backing ("" for the default)."""
    return backing[len(NBD_PREFIX):].partition("?")[0].lstrip("/")


class VmDisk(BaseModel):
    """One disk of the VM: a local qcow2 overlay in the work directory over ``backing``,
    which the VM never writes. ``backing`` is a local image file (raw, or vpc for a VHD)
    or a read-only NBD export on a unix socket, ``nbd+unix:///EXPORT?socket=PATH`` (what
    ``hotspare serve`` gives): the VM boots at once and reads what it has not pulled local
    from there, until :func:`hotspare.vm.qemu.stream.start_streams` has copied it all. For the
    EC2 host, ``ebs-snapshot://SNAPSHOT``: a point's EBS snapshot (:meth:`VmHost.point_disk`)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="the machine's disk name (the capture ships it under this name)")
    backing: str = Field(description="local image path, or nbd+unix:///EXPORT?socket=PATH")
    backing_format: DiskFormat = Field("raw", description="format of the backing's bytes: raw, or vpc")
    size: int | None = Field(None, gt=0, description="bytes the guest sees; None: the backing's virtual size")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, description="granularity of the capture's dirty bitmap (the "
                                                            "machine's block size)")

    @field_validator("name")
    @classmethod
    def _disk_name(cls, v: str) -> str:
        return layout.check_name("disk", v)

    @field_validator("backing")
    @classmethod
    def _backing(cls, v: str) -> str:
        if v.startswith(NBD_PREFIX):
            sock = nbd_socket_of(v)
            assert sock is not None
            if not os.path.isabs(sock):
                raise ValueError(f"NBD backing {v!r}: the socket path must be absolute")
            return v
        if ebs_snapshot_of(v) is not None:
            return v
        if "://" in v:
            raise ValueError(f"backing {v!r}: want a local image path, nbd+unix:///EXPORT?socket=PATH "
                             "or ebs-snapshot://snap-...")
        return os.path.abspath(v)  # QEMU resolves it from the work directory

    @property
    def is_nbd(self) -> bool:
        return self.backing.startswith(NBD_PREFIX)


class VmSpec(BaseModel):
    """What to boot: every disk of a machine, in the machine's order (the first boots)."""

    model_config = ConfigDict(frozen=True)

    machine: str = Field(description="the protected machine this VM stands in for")
    disks: list[VmDisk] = Field(min_length=1, description="the machine's disks in its order; the first boots")
    cpus: int = Field(1, ge=1, le=256)
    memory_mib: int = Field(512, ge=32)
    workdir: Path = Field(description="the VM's own directory: overlays, sockets, logs, handle.json")

    @model_validator(mode="before")
    @classmethod
    def _one_boot_disk(cls, data: Any) -> Any:
        # ``boot_disk=PATH, format=FMT``: a VM of one local disk named disk0 (EC2's hosts and
        # older callers speak so).
        if isinstance(data, dict) and "boot_disk" in data and "disks" not in data:
            data = dict(data)
            boot = data.pop("boot_disk")
            data["disks"] = [VmDisk(name="disk0", backing=os.fspath(boot), backing_format=data.pop("format", "raw"))]
        return data

    @field_validator("machine")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return layout.check_name("machine", v)

    @field_validator("disks")
    @classmethod
    def _unique(cls, v: list[VmDisk]) -> list[VmDisk]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"disk names repeat: {names}")
        return v

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # QEMU and later processes resolve these paths, from other working directories.
        return Path(os.path.abspath(v))

    @property
    def boot_disk(self) -> Path:
        """The first disk's backing (a path for local backings)."""
        return Path(self.disks[0].backing)

    @property
    def format(self) -> DiskFormat:
        return self.disks[0].backing_format


class HandleDisk(BaseModel):
    """One disk of a launched VM, as QEMU runs it."""

    name: str
    backing: str
    backing_format: DiskFormat = "raw"
    size: int
    block_size: int = DEFAULT_BLOCK_SIZE
    overlay: str = Field(description="the local qcow2 that takes the VM's writes")
    local: str = Field(description="the local qcow2 under it that block-stream fills from the backing")
    node: str = Field(description="QEMU node name of the overlay: the bitmaps and the capture's views live on it")
    device: str = Field(description="the guest disk's qdev id")
    backing_needed: bool = Field(True, description="False once block-stream copied the backing into the overlay: "
                                                   "the server of an NBD backing may stop")


class EbsDisk(BaseModel):
    """One disk of an EC2 VM: the EBS snapshot its volume is made from, and the device
    name its block device mapping gives it."""

    name: str
    backing: str = Field(description="the spec's backing: a local image path or ebs-snapshot://SNAPSHOT")
    snapshot_id: str = Field(description="the snapshot the volume is made from (the capture's first base)")
    device: str = Field(description="the block device mapping's name, e.g. /dev/xvda (root), /dev/sdf")
    size: int = Field(gt=0, description="bytes of the replica's disk (the volume is whole GiB, maybe larger)")


class VmHandle(BaseModel):
    """Everything needed to find and drive a launched VM again, from any process."""

    host: HostKind
    vm_id: str = Field(description="unique per launch, also QEMU's -name guest=")
    machine: str
    workdir: str
    boot_disk: str = Field(description="the first disk's backing")
    format: DiskFormat
    accel: Accel = Field(description="what QEMU really uses: kvm, or tcg where KVM does not work")
    pid: int | None = Field(None, description="the QEMU process, for hosts that run it on this machine")
    container_id: str | None = Field(None, description="for hosts that run QEMU in a container")
    qmp_socket: str | None = None
    serial_log: str
    disks: list[HandleDisk] = Field(default_factory=list, description="QEMU hosts: every disk, in the machine's order")
    ebs_disks: list[EbsDisk] = Field(default_factory=list, description="EC2 host: every disk, in the machine's order")
    disk_device: str = Field("disk0", description="the boot disk's qdev id (for QMP)")
    started_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    def disk(self, name: str) -> HandleDisk:
        for d in self.disks:
            if d.name == name:
                return d
        raise HotspareError(f"VM {self.vm_id} has no disk {name!r} (it has {[d.name for d in self.disks]})")

    @property
    def servers_needed(self) -> list[str]:
        """The NBD backings the VM still reads from; one that is not listed may stop."""
        return [d.backing for d in self.disks if d.backing_needed and d.backing.startswith(NBD_PREFIX)]


def handle_path(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / HANDLE_FILE


def save_handle(handle: VmHandle) -> Path:
    """Write ``<workdir>/handle.json`` atomically (a reader never sees half a handle)."""
    path = handle_path(handle.workdir)
    write_atomic(path, handle.model_dump_json(indent=1))
    return path


def load_handle(workdir: str | os.PathLike[str]) -> VmHandle | None:
    """The handle last written in ``workdir``, or None when no VM was launched there."""
    return load_model(handle_path(workdir), VmHandle, "VM handle", "remove it if no VM runs there")


class VmHost(ABC):
    """A place that runs VMs: local QEMU, Docker-hosted QEMU, EC2.

    Every method takes the handle :meth:`launch` returned (or a copy of it, read back from
    JSON); none keeps per-VM state in the host object, so a new process can carry on.
    """

    kind: HostKind

    @abstractmethod
    def launch(self, spec: VmSpec) -> VmHandle:
        """Boot ``spec``'s disk, never writing to it; return once the VM runs. If the VM of
        ``spec.workdir`` already runs, return its handle without starting another one."""

    @abstractmethod
    def find_running(self, workdir: str | os.PathLike[str]) -> VmHandle | None:
        """The handle of the VM running from ``workdir``, or None."""

    @abstractmethod
    def is_alive(self, handle: VmHandle) -> bool:
        """Whether the VM's process (or instance) still exists."""

    @abstractmethod
    def status(self, handle: VmHandle) -> str:
        """``running``, ``paused``, ... as the hypervisor says, or ``gone`` if the VM is dead."""

    @abstractmethod
    def serial_log(self, handle: VmHandle) -> str:
        """Everything the guest wrote on its serial console so far."""

    @abstractmethod
    def screendump(self, handle: VmHandle, path: str | os.PathLike[str]) -> Path:
        """Save the VM's screen as a PNG at ``path``."""

    @abstractmethod
    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None:
        """Stop the VM gracefully: pause its vCPUs, run ``before_quit`` (the final capture of
        its writes) while nothing changes, then quit. Stopping a gone VM does nothing. If
        ``before_quit`` raises, the VM stays paused (its last writes are not lost) and the
        error propagates; call again to retry."""

    @abstractmethod
    def kill(self, handle: VmHandle) -> None:
        """End the VM at once (no capture); killing a gone VM does nothing."""

    def point_disk(self, store: Store, catalog: Catalog, disk: DiskSpec, point: RecoveryPoint,
                   workdir: Path) -> VmDisk | None:
        """The VM disk of ``point``, for a host that cannot read a point served over NBD
        (EC2: the point's EBS snapshot); None, as for every QEMU host: serve the point."""
        return None

    def release(self, handle: VmHandle, *, wait: float = 0.0) -> None:
        """Delete what the VM's launch made besides the VM and its work directory (a cloud
        host's image, snapshots and volume), once the VM is gone; nothing for QEMU hosts."""

    def wait_for_marker(self, handle: VmHandle, timeout: float = 60.0, *, after: int | None = None,
                        poll: float = 0.2) -> Marker:
        """Wait for the guest's marker line on the serial console (hotspare.demodisk.MARKER_RE)
        with a counter above ``after`` (any, if None); returns the newest such marker."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in parse_markers(self.serial_log(handle)) if after is None or m.counter > after]
            if found:
                return found[-1]
            if not self.is_alive(handle):
                raise HotspareError(f"VM {handle.vm_id} ended before printing a marker"
                                    f"{'' if after is None else f' past counter {after}'}; "
                                    f"console tail: {self.serial_log(handle)[-400:]!r}")
            if time.monotonic() > deadline:
                raise HotspareError(f"VM {handle.vm_id}: no marker{'' if after is None else f' past counter {after}'} "
                                    f"on the serial console in {timeout:.0f} s (accel {handle.accel}); "
                                    f"console tail: {self.serial_log(handle)[-400:]!r}")
            time.sleep(poll)
