"""VmCapture under faults, on real QEMU booting the demo disk: a capture process killed at
each step of a cycle, and a store outage. The VM keeps running through all of it,
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
from hotspare.vm.qemu.cmd import node_names
from tests.helpers import same_file
from tests.fixtures_vms import Vms
from tests.test_vm_local import EPOCH, MACHINE, _check_logs, _replay


class OutageStore(LocalStore):
    """A real local store whose uploads fail while ``down`` is set, as in a network outage."""

    down = False

    def _reach(self, key: str) -> None:
        if self.down:
            raise TransientStoreError(key, "store unreachable (outage)")

    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        self._reach(key)
        super().put_file(key, path, create_only=create_only)

    def put_staged(self, key: str, path: str, *, create_only: bool = False) -> None:
        self._reach(key)
        super().put_staged(key, path, create_only=create_only)


def _bitmaps(host, handle) -> list[dict]:
    # query-named-block-nodes: safe with no stream job (see hotspare.vm.qemu.cmd.disk_nodes), and it sees
    # the disk's node also under a view's filter.
    with host.qmp(handle) as q:
        node = next(n for n in q.execute("query-named-block-nodes", flat=True)
                    if n["node-name"] == handle.disks[0].node)
    return [b for b in node.get("dirty-bitmaps", []) if b.get("name", "").startswith("hs-")]


def test_capture_survives_crashes_and_a_store_outage(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    host = vms.host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    spec = VmSpec(machine=MACHINE, boot_disk=demo_disk, memory_mib=256, workdir=tmp_path / "vm")
    handle = vms.launch(spec)
    host.wait_for_marker(handle, timeout=90)
    store_dir = tmp_path / "store"

    # The engine's entry point (no CLI), killed as by a power cut at each step of a cycle:
    # after the freeze, after an upload (before its state is saved), before the release.
    # The VM runs on; the next start merges the bitmap a dead cycle left frozen.
    cmd = [sys.executable, "-m", "hotspare.vm.qemu.capture", "--store", str(store_dir), "--workdir", str(spec.workdir),
           "--epoch", str(EPOCH), "--once"]
    for point in ("agent-after-freeze", "agent-after-upload", "agent-before-release"):
        host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOTSPARE_CRASH_AT": point})
        assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}\n{proc.stderr}"
        assert host.status(handle) == "running"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "shipped" in proc.stdout, proc.stderr

    # The store goes away: cycles fail, and the frozen bitmap goes back into the recording
    # one at the next start, so bitmaps never pile up.
    store = OutageStore(str(store_dir))
    store.down = True
    capture = VmCapture(host, handle, store, epoch=EPOCH)
    for _ in range(4):
        host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)  # a new write
        with pytest.raises(TransientStoreError):
            capture.ship_once()
        assert len(_bitmaps(host, handle)) <= 2
    # ... and comes back: what was written meanwhile ships in one cut, and the view is gone.
    store.down = False
    assert capture.ship_once()
    assert [b["name"] for b in _bitmaps(host, handle) if b["recording"]] == [capture.work[0].state.bitmap]
    assert len(_bitmaps(host, handle)) == 1
    with host.qmp(handle) as q:
        assert not q.execute("query-block-exports") and not q.execute("query-block-jobs")
        assert not {n for n in node_names(q) if n.startswith("fl-")}
    last_console = host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)
    capture.final_capture()

    keys = _replay(store, pristine, tmp_path / "replay.img")
    _check_logs(store, keys, pristine.stat().st_size)  # seqs from 0 without a gap, crashes or not
    marker = read_marker(tmp_path / "replay.img")
    assert marker is not None and marker.counter >= last_console.counter
    subprocess.run(["qemu-img", "convert", "-O", "raw", handle.disks[0].overlay, str(tmp_path / "vm.img")], check=True)
    assert same_file(tmp_path / "replay.img", tmp_path / "vm.img")
