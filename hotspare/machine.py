"""A protected machine's registration (``machine.json``) and its policy.

The registration names the machine's disks, where the agent reads each one, and its size;
the policy says how the machine is watched and failed over. Both are validated on load:
a hand-edited or corrupt ``machine.json`` gives an error naming the key and the field.
"""

from __future__ import annotations

import os
import re
import stat
from datetime import datetime

from pydantic import BaseModel, Field, ValidationError, field_validator

from hotspare import layout
from hotspare.catalog.model import utcnow
from hotspare.errors import AlreadyExists, InvalidObject, NotFound, UsageError, field_error
from hotspare.store.base import Store

MACHINE_FORMAT = 1
DEFAULT_BLOCK_SIZE = 64 << 10
# The demo guest's marker line (hotspare.demodisk.MARKER_RE), what a drill waits for by default.
DRILL_PATTERN = r"hotspare-marker counter=\d+ boot="


class Policy(BaseModel):
    heartbeat_window: int = Field(60, title="Heartbeat window (s)", ge=10, description='Seconds without a heartbeat before the machine counts as down.')
    rpo: int = Field(900, title="RPO (s)", ge=10, description='Seconds a shipped log may wait to be accepted before the machine counts as stalled (three runs of the 5-minute fleet ingest).')
    auto_approve: bool = Field(False, title="Auto-approve", description='Fail over and cut over without waiting for an operator.')
    approval_timeout: int = Field(3600, title="Approval timeout (s)", ge=1, description='Seconds to wait for an approval; then the request is rejected.')
    host: str = Field("local", title="VM host", description='Where the VM runs after a failover: local, docker, ec2, or the name of a VM host block.')

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        layout.check_name("VM host", v)
        return v
    vm_cpus: int = Field(1, title="VM CPUs", ge=1, description='Virtual CPUs of the failed-over VM.')
    vm_memory_mib: int = Field(512, title="VM memory (MiB)", ge=64, description='Memory of the failed-over VM, in MiB.')
    retention_points: int = Field(24, title="Recovery points kept", ge=1, description='Recovery points kept.')
    retention_hours: float = Field(24.0, title="Retention (hours)", gt=0, description='Age of the oldest recovery point kept, in hours.')
    notify_block: str = Field("", title="Notification block", description='A Prefect notification block (TYPE-SLUG/NAME, or NAME of a custom-webhook block) that approval requests notify, applied by hotspare deploy; empty: none.')
    drill_pattern: str = Field(DRILL_PATTERN, title="Drill: console pattern", min_length=1, description="Regular expression the booted guest must print on its serial console (the default is the demo guest's marker line).")
    drill_probes: list[str] = Field(default_factory=list, title="Drill: probe commands", description="Commands run on the drill's host once the pattern showed; each must exit 0. They get HOTSPARE_DRILL_SERIAL (the console log), HOTSPARE_DRILL_QMP (the QMP socket) and HOTSPARE_DRILL_VM in their environment (the VM has no network).")
    drill_timeout: float = Field(300.0, title="Drill: boot timeout (s)", gt=0, description='Seconds a drilled VM has to show its boot evidence.')

    @field_validator("drill_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"drill pattern {v!r} is not a regular expression: {err}") from None
        return v


class DiskSpec(BaseModel):
    name: str
    path: str = Field(description="the disk image or block device the agent reads on the machine")
    size: int = Field(gt=0, description="bytes, a multiple of 512")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, description="bytes per tracked block")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        layout.check_name("disk", v)
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v % 512:
            raise ValueError(f"disk size {v} is not a multiple of 512 bytes")
        return v

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v < 4096 or v > (16 << 20) or v & (v - 1):
            raise ValueError(f"block size {v} must be a power of two from 4 KiB to 16 MiB")
        return v


class MachineConfig(BaseModel):
    format_version: int = MACHINE_FORMAT
    name: str
    disks: list[DiskSpec] = Field(min_length=1)
    policy: Policy = Field(default_factory=Policy)
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        layout.check_name("machine", v)
        return v

    def disk(self, name: str) -> DiskSpec:
        for d in self.disks:
            if d.name == name:
                return d
        raise UsageError(f"machine {self.name} has no disk {name!r} (disks: {', '.join(d.name for d in self.disks)})")


def device_size(path: str) -> int:
    """Size of an image file or a block device, in bytes."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    if stat.S_ISBLK(st.st_mode):
        with open(path, "rb") as f:
            return f.seek(0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not an image file or block device")
    return st.st_size


def parse_disk_arg(arg: str, block_size: int = DEFAULT_BLOCK_SIZE) -> DiskSpec:
    """``NAME=PATH`` from the command line into a DiskSpec with the size read from PATH."""
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--disk {arg!r}: expected NAME=PATH")
    layout.check_name("disk", name)
    size = device_size(path)
    if size == 0 or size % 512:
        raise UsageError(f"{path}: size {size} is not a positive multiple of 512 bytes")
    return DiskSpec(name=name, path=os.path.abspath(path), size=size, block_size=block_size)


def load_machine(store: Store, machine: str) -> MachineConfig:
    key = layout.machine_key(layout.check_name("machine", machine))
    try:
        raw = store.get(key)
    except NotFound:
        raise UsageError(f"machine {machine!r} is not protected in {store.url} (run: hotspare protect {machine} --disk NAME=PATH)") from None
    try:
        cfg = MachineConfig.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidObject(key, field_error(err)) from err
    if cfg.name != machine:
        raise InvalidObject(key, f"names machine {cfg.name!r}, expected {machine!r}")
    return cfg


def save_machine(store: Store, cfg: MachineConfig, *, create_only: bool) -> None:
    store.put(layout.machine_key(cfg.name), cfg.model_dump_json(indent=1).encode(), create_only=create_only)


def protect_machine(store: Store, name: str, disks: list[DiskSpec], policy_changes: dict) -> tuple[MachineConfig, bool]:
    """Register machine ``name`` with ``disks`` and its policy, or update an existing one's
    policy and disk paths: (the registration, whether it is new). Disks cannot change their
    names, sizes or block sizes in place (a replica cannot change size): that is refused
    with the way that works."""
    if len({d.name for d in disks}) != len(disks):
        raise UsageError("--disk names must be unique")
    try:
        cfg = MachineConfig(name=name, disks=disks, policy=Policy(**policy_changes))
    except ValidationError as err:
        raise UsageError(f"machine {name}: {field_error(err)}") from None
    try:
        save_machine(store, cfg, create_only=True)
        return cfg, True
    except AlreadyExists:
        pass
    old = load_machine(store, name)
    resized = [(d, o) for d in disks for o in old.disks if d.name == o.name and d.size != o.size]
    if resized and [d.name for d in old.disks] == [d.name for d in disks]:
        # The agent tells a resized disk to re-protect; this is the way that works.
        d, o = resized[0]
        raise UsageError(f"disk {d.name} of machine {name} is now {d.size} bytes, its replica {o.size}: a replica "
                         f"cannot change size in place. Protect the resized machine under a new name, which seeds a "
                         f"new replica: hotspare protect {name}-2 " + " ".join(f"--disk {x.name}={x.path}" for x in disks)
                         + f" (then run its agent as {name}-2); {name}'s recovery points stay readable with "
                         f"hotspare export {name}")
    if [(d.name, d.size, d.block_size) for d in old.disks] != [(d.name, d.size, d.block_size) for d in disks]:
        raise UsageError(f"machine {name} is already protected with other disks "
                         f"({', '.join(f'{d.name}={d.size}' for d in old.disks)}); disks cannot change in place")
    new = old.model_copy(update={"disks": disks, "policy": old.policy.model_copy(update=policy_changes)})
    save_machine(store, new, create_only=False)
    return new, False


def list_machines(store: Store) -> list[str]:
    names = []
    for info in store.list("machines/"):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] == "machine.json":
            names.append(parts[1])
    return names
