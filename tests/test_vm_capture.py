"""VmCapture under faults, on real QEMU booting the demo disk: a capture process killed at
each step of a capture step, and a store outage. The VM keeps running through all of it,
and in the end the logs replay to exactly the VM's disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hotspare.demodisk import read_marker
from hotspare.errors import TransientStoreError
from hotspare.store.local import LocalStore
from hotspare.vm import VmCapture, VmSpec
from hotspare.vm.capture import MAX_FROZEN
from hotspare.vm.chain import live_chain, node_name
from tests.helpers import same_file
from tests.test_vm_local import DISK, EPOCH, MACHINE, Vms, _check_logs, _replay, vms  # noqa: F401 - vms: fixture


class OutageStore(LocalStore):
    """A real local store whose uploads fail while ``down`` is set, as in a network outage."""

    down = False

    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        if self.down:
            raise TransientStoreError(key, "store unreachable (outage)")
        super().put_file(key, path, create_only=create_only)


def test_capture_survives_crashes_and_a_store_outage(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    host = vms.host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    spec = VmSpec(machine=MACHINE, boot_disk=demo_disk, memory_mib=256, workdir=tmp_path / "vm")
    handle = vms.launch(spec)
    host.wait_for_marker(handle, timeout=90)
    store_dir = tmp_path / "store"

    # A capture process killed (as by a power cut) at each step of a capture; the VM runs on.
    code = ("import sys; from hotspare.store import open_store; from hotspare.vm import LocalQemuHost, VmCapture, "
            "load_handle; VmCapture(LocalQemuHost(), load_handle(sys.argv[1]), open_store(sys.argv[2]), "
            "disk='disk0', epoch=1).ship_once()")
    for point in ("vm-capture-after-rotate", "vm-capture-after-upload", "vm-capture-commit-started"):
        host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)
        proc = subprocess.run([sys.executable, "-c", code, str(spec.workdir), str(store_dir)], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "HOTSPARE_CRASH_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}\n{proc.stderr}"
        assert host.status(handle) == "running"

    # The store goes away: steps fail, frozen overlays pile up to MAX_FROZEN, no further.
    store = OutageStore(str(store_dir))
    store.down = True
    capture = VmCapture(host, handle, store, disk=DISK, epoch=EPOCH)
    for _ in range(MAX_FROZEN + 3):
        host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)  # a new write
        with pytest.raises(TransientStoreError):
            capture.ship_once()
    with host.qmp(handle) as q:
        assert len(live_chain(q, handle.disk_device)) == MAX_FROZEN + 2  # base, frozen ones, active
    # ... and comes back: the backlog ships in write order and is committed.
    store.down = False
    assert capture.ship_once()
    with host.qmp(handle) as q:
        layers = live_chain(q, handle.disk_device)
        assert len(layers) == 2
        open_overlays = {n["node-name"] for n in q.execute("query-named-block-nodes", flat=True)
                         if n.get("node-name", "").startswith("hs-ov-")}
        assert open_overlays == {node_name(layers[-1])}  # the crashed commit's node was closed too
    last_console = host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)
    capture.final_capture()

    keys = _replay(store, pristine, tmp_path / "replay.img")
    _check_logs(store, keys, pristine.stat().st_size)
    marker = read_marker(tmp_path / "replay.img")
    assert marker is not None and marker.counter >= last_console.counter
    top = sorted((spec.workdir / "overlays").glob("ov-*.qcow2"))[-1]
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(tmp_path / "vm.img")], check=True)
    assert same_file(tmp_path / "replay.img", tmp_path / "vm.img")
    assert sorted(p.name for p in (spec.workdir / "overlays").iterdir()) == ["base.qcow2", top.name]
