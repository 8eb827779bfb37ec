"""The ``vms`` fixture: VMs on a LocalQemuHost, every QEMU process a test starts killed by
its finalizer, which also checks that none is left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotspare.vm import LocalQemuHost, VmHandle, VmSpec
from tests.helpers import require


def qemu_pids(vm_id: str) -> list[int]:
    """Live QEMU processes of ``vm_id`` (whoever started them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if f"guest={vm_id}".encode() in cmdline and state != "Z":
                pids.append(int(entry))
    return pids


class Vms:
    """Launches VMs and remembers them, so the fixture can kill every one."""

    def __init__(self, host: LocalQemuHost) -> None:
        self.host = host
        self.handles: list[VmHandle] = []

    def launch(self, spec: VmSpec) -> VmHandle:
        try:
            handle = self.host.launch(spec)
        finally:
            found = self.host.find_running(spec.workdir)
            if found is not None:
                self.track(found)
        return handle

    def track(self, handle: VmHandle) -> VmHandle:
        if all(h.vm_id != handle.vm_id for h in self.handles):
            self.handles.append(handle)
        return handle


@pytest.fixture
def vms(qemu_system: str) -> Iterator[Vms]:
    require("qemu-img", "qemu-utils")
    tracker = Vms(LocalQemuHost(qemu_system))
    yield tracker
    for handle in tracker.handles:
        tracker.host.kill(handle)
    leaked = {h.vm_id: qemu_pids(h.vm_id) for h in tracker.handles}
    assert not any(leaked.values()), f"QEMU processes left behind: {leaked}"
