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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hotspare import layout
from hotspare.demodisk import Marker, parse_markers
from hotspare.errors import HotspareError
from hotspare.localfile import load_model, write_atomic

HostKind = Literal["local-qemu", "docker-qemu", "ec2"]
DiskFormat = Literal["raw", "vpc"]
Accel = Literal["kvm", "tcg"]
HANDLE_FILE = "handle.json"


class VmSpec(BaseModel):
    """What to boot: a machine's boot disk, materialised locally from the replica."""

    model_config = ConfigDict(frozen=True)

    machine: str = Field(description="the protected machine this VM stands in for")
    boot_disk: Path = Field(description="local raw or VHD image; the VM never writes to it")
    format: DiskFormat = Field("raw", description="raw, or vpc for a VHD (fixed or dynamic)")
    cpus: int = Field(1, ge=1, le=256)
    memory_mib: int = Field(512, ge=32)
    workdir: Path = Field(description="the VM's own directory: overlays, sockets, logs, handle.json")

    @field_validator("machine")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return layout.check_name("machine", v)

    @field_validator("boot_disk", "workdir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # QEMU and later processes resolve these paths, from other working directories.
        return Path(os.path.abspath(v))


class VmHandle(BaseModel):
    """Everything needed to find and drive a launched VM again, from any process."""

    host: HostKind
    vm_id: str = Field(description="unique per launch, also QEMU's -name guest=")
    machine: str
    workdir: str
    boot_disk: str
    format: DiskFormat
    accel: Accel = Field(description="what QEMU really uses: kvm, or tcg where KVM does not work")
    pid: int | None = Field(None, description="the QEMU process, for hosts that run it on this machine")
    container_id: str | None = Field(None, description="for hosts that run QEMU in a container")
    qmp_socket: str | None = None
    serial_log: str
    overlays: list[str] = Field(default_factory=list,
                                description="qcow2 layers over the boot disk at launch, bottom to top; "
                                            "the top one takes the VM's writes")
    disk_device: str = Field("disk0", description="the guest disk's qdev id (for QMP)")
    started_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


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
