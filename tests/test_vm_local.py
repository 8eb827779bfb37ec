"""LocalQemuHost and VmCapture on real QEMU booting the demo disk from its own boot loader
(TCG where KVM does not work). Every QEMU process a test starts is killed by the ``vms``
fixture's finalizer, which also checks that none is left."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.demodisk import data_partition, parse_markers, parse_record, qemu_accel, read_marker
from hotspare.errors import HotspareError
from hotspare.extentlog import iter_extents, validate_log
from hotspare.store import Store, open_store
from hotspare.vm import QmpError, VmCapture, VmHandle, VmSpec
from hotspare.vm.host import VmDisk
from hotspare.vm.qemu.png import SIGNATURE, png_size, ppm_to_png
from tests.fixtures_vms import Vms, qemu_pids
from tests.helpers import replay_over, same_file, sha256_file

MACHINE, DISK, EPOCH = "web1", "disk0", 1


def _replay(store: Store, base_image: Path, out: Path) -> list[str]:
    """Apply every log of the VM epoch, in seq order, over a copy of ``base_image``."""
    keys = [o.key for o in store.list(layout.logs_prefix(MACHINE, DISK, EPOCH))]
    replay_over(store, keys, base_image, out)
    return keys


def _check_logs(store: Store, keys: list[str], disk_size: int) -> None:
    """Valid logs whose seqs run from 0 without a gap."""
    expect = 0
    for key in keys:
        with store.open(key) as f:
            info = validate_log(f, key, machine=MACHINE, disk=DISK, epoch=EPOCH, disk_size=disk_size)
        assert info.meta.first_seq == expect, key
        expect = info.meta.last_seq + 1


def _marker_counter_in_log(store: Store, key: str, marker_offset: int) -> int | None:
    """The counter of the guest's marker sector if this log carries it."""
    with store.open(key) as f:
        for offsets, lengths, data in iter_extents(f, key):
            for off, length, d in zip(offsets.tolist(), lengths.tolist(), data, strict=True):
                buf = d.as_buffer()
                if buf is not None and off <= marker_offset < off + length:
                    rec = parse_record(bytes(buf)[marker_offset - off:marker_offset - off + 512])
                    if rec is not None:
                        return rec.counter
    return None


def test_vm_boots_is_captured_and_stops(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    host = vms.host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    digest = sha256_file(demo_disk)
    spec = VmSpec(machine=MACHINE, boot_disk=demo_disk, format="raw", cpus=1, memory_mib=256,
                  workdir=tmp_path / "vm")

    started = time.monotonic()
    handle = vms.launch(spec)
    first = host.wait_for_marker(handle, timeout=90)
    boot_seconds = time.monotonic() - started
    assert handle.accel == qemu_accel()
    assert host.status(handle) == "running"
    assert host.find_running(spec.workdir) == handle
    assert VmHandle.model_validate_json(handle.model_dump_json()) == handle

    png = host.screendump(handle, tmp_path / "screen.png")
    assert png.read_bytes()[:8] == SIGNATURE
    width, height = png_size(png)
    assert width >= 320 and height >= 200
    # The fallback for QEMUs without PNG screendumps: QEMU's PPM, encoded here.
    with host.qmp(handle) as q:
        q.execute("screendump", filename=str(tmp_path / "screen.ppm"))
    assert ppm_to_png(tmp_path / "screen.ppm", tmp_path / "from-ppm.png") == (width, height)
    assert png_size(tmp_path / "from-ppm.png") == (width, height)
    with host.qmp(handle) as q, pytest.raises(QmpError, match="no-such-command.*CommandNotFound"):
        q.execute("no-such-command")

    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(host, handle, store, epoch=EPOCH)
    shipped: list[tuple[float, str]] = []
    seen: dict[int, float] = {}  # counter -> when its console line appeared
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            capture.run(interval=1.0, stop=stop, on_ship=lambda keys: shipped.extend((time.monotonic(), k) for k in keys))
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    capture_started = time.monotonic()
    worker = threading.Thread(target=loop, name="capture")
    worker.start()
    try:
        polls = 0
        while len(shipped) < 5 and time.monotonic() - capture_started < 60 and not errors:
            for m in parse_markers(host.serial_log(handle)):
                seen.setdefault(m.counter, time.monotonic())
            polls += 1
            if polls % 10 == 0:  # QMP queries from here while the capture uses QMP too
                assert host.status(handle) == "running"
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors, errors
    assert len(shipped) >= 5, f"only {len(shipped)} logs shipped in 60 s"
    first_log_seconds = shipped[0][0] - capture_started
    assert first_log_seconds < 5

    # Capture latency: from the guest's console line (printed right after it wrote and
    # synced the marker sector) to the upload of the log carrying that sector.
    marker_offset = data_partition(pristine).offset
    latencies = []
    for uploaded, key in shipped:
        counter = _marker_counter_in_log(store, key, marker_offset)
        if counter is not None and counter in seen:
            latencies.append(uploaded - seen[counter])
    assert latencies and max(latencies) < 5, latencies

    last_console = parse_markers(host.serial_log(handle))[-1]
    final_keys = capture.final_capture(timeout=30)
    assert host.status(handle) == "gone" and not host.is_alive(handle)
    host.stop(handle)  # idempotent
    host.kill(handle)
    assert host.find_running(spec.workdir) is None

    keys = _replay(store, pristine, tmp_path / "replay.img")
    assert keys == sorted([k for _, k in shipped] + final_keys)
    _check_logs(store, keys, pristine.stat().st_size)
    marker = read_marker(tmp_path / "replay.img")
    assert marker is not None and marker.boot_id == last_console.boot_id
    assert marker.counter >= last_console.counter
    # Exactly the VM's disk: the replay equals what QEMU reads through the disk's layers.
    subprocess.run(["qemu-img", "convert", "-O", "raw", handle.disks[0].overlay, str(tmp_path / "vm.img")], check=True)
    assert same_file(tmp_path / "replay.img", tmp_path / "vm.img")
    assert sha256_file(demo_disk) == digest, "the boot disk (the replica image) was modified"
    print(f"\nQEMU start to first marker: {boot_seconds:.1f} s (accel {handle.accel}, marker {first.counter}); "
          f"first log {first_log_seconds:.2f} s after capture start; write-to-upload latency over "
          f"{len(latencies)} logs: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")


def test_second_launch_adopts_a_killed_vm_is_gone_and_resumes(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    host = vms.host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    spec = VmSpec(machine=MACHINE, boot_disk=demo_disk, memory_mib=256, workdir=tmp_path / "vm")
    handle = vms.launch(spec)
    host.wait_for_marker(handle, timeout=90)

    again = vms.launch(spec)
    assert (again.vm_id, again.pid) == (handle.vm_id, handle.pid)
    assert qemu_pids(handle.vm_id) == [handle.pid]
    other = VmSpec(machine=MACHINE, disks=[VmDisk(name="other", backing=str(pristine))], workdir=spec.workdir)
    with pytest.raises(HotspareError, match="already runs there"):
        vms.launch(other)

    before_kill = host.wait_for_marker(handle, timeout=30, after=host.wait_for_marker(handle).counter)
    assert handle.pid is not None
    os.kill(handle.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while host.status(handle) != "gone" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.status(handle) == "gone" and not host.is_alive(handle)
    host.stop(handle)
    host.kill(handle)
    assert host.find_running(spec.workdir) is None

    # The dead VM's writes up to the kill are in its overlay: ship them offline (its bitmap
    # died with QEMU, so the whole disk is compared with what the capture shipped).
    store = open_store(str(tmp_path / "store"))
    assert VmCapture(host, handle, store, epoch=EPOCH).ship_once()
    _replay(store, pristine, tmp_path / "replay.img")
    marker = read_marker(tmp_path / "replay.img")
    assert marker is not None and marker.counter >= before_kill.counter

    # Launching again continues on the dead VM's disk: the guest counts on from its marker.
    resumed = vms.launch(spec)
    assert resumed.vm_id != handle.vm_id
    assert [d.overlay for d in resumed.disks] == [d.overlay for d in handle.disks]
    first = host.wait_for_marker(resumed, timeout=90)
    assert first.boot_id != before_kill.boot_id and first.counter > before_kill.counter
    capture = VmCapture(host, resumed, store, epoch=EPOCH)
    capture.ship_once()
    last_console = host.wait_for_marker(resumed, timeout=30, after=first.counter)
    capture.final_capture()
    keys = _replay(store, pristine, tmp_path / "replay2.img")
    _check_logs(store, keys, pristine.stat().st_size)
    marker = read_marker(tmp_path / "replay2.img")
    assert marker is not None and marker.boot_id == first.boot_id and marker.counter >= last_console.counter


def test_vm_outlives_the_process_that_launched_it(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    code = ("import sys; from pathlib import Path; from hotspare.vm import LocalQemuHost, VmSpec; "
            "h = LocalQemuHost(sys.argv[1]).launch(VmSpec(machine='web1', boot_disk=Path(sys.argv[2]), "
            "memory_mib=256, workdir=Path(sys.argv[3]))); print(h.model_dump_json())")
    try:
        out = subprocess.run([sys.executable, "-c", code, vms.host.qemu, str(demo_disk), str(workdir)],
                             check=True, capture_output=True, text=True, timeout=120).stdout
    finally:
        found = vms.host.find_running(workdir)
        if found is not None:
            vms.track(found)
    launched = VmHandle.model_validate_json(out)
    handle = vms.host.find_running(workdir)
    assert handle == launched
    assert vms.host.wait_for_marker(handle, timeout=90).counter >= 0
    assert vms.host.status(handle) == "running"
    vms.host.stop(handle, timeout=30)
    assert vms.host.status(handle) == "gone"


def test_vhd_boot_disk(vms: Vms, demo_disk: Path, tmp_path: Path) -> None:
    vhd = tmp_path / "boot.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
                    str(demo_disk), str(vhd)], check=True)
    digest = sha256_file(vhd)
    spec = VmSpec(machine=MACHINE, boot_disk=vhd, format="vpc", memory_mib=256, workdir=tmp_path / "vm")
    handle = vms.launch(spec)
    first = vms.host.wait_for_marker(handle, timeout=90)
    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(vms.host, handle, store, epoch=EPOCH)
    assert capture.work[0].state.disk_size == demo_disk.stat().st_size
    last = vms.host.wait_for_marker(handle, timeout=30, after=first.counter)
    assert capture.final_capture()
    _replay(store, demo_disk, tmp_path / "replay.img")
    marker = read_marker(tmp_path / "replay.img")
    assert marker is not None and marker.counter >= last.counter
    assert sha256_file(vhd) == digest
