"""A VM of several disks on real QEMU, each disk served by a real NBD server (qemu-nbd, as
``hotspare serve`` will serve a recovery point): it boots at once, without a copy of any
disk, its disks stream local in the background, their servers stop, and the VM keeps
reading and writing while its capture ships every disk's writes as epoch logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from hotspare import layout
from hotspare.demodisk import read_marker
from hotspare.extentlog import validate_log
from hotspare.replay import apply_log
from hotspare.store import open_store
from hotspare.vm import VmCapture, VmDisk, VmSpec, load_handle
from hotspare.vm.qemu.stream import start_streams, stream_status, wait_streams
from tests.helpers import NbdServer, replay_over, same_file
from tests.fixtures_vms import Vms
from tests.test_vm_local import MACHINE

GIB = 1 << 30
DATA_SIZE = 8 * GIB
# Known bytes of the data disk: (offset, pattern byte, length), spread over its 8 GiB.
KNOWN = [(0, 0x11, 1 << 20), (3 * GIB + (5 << 20), 0x22, 256 << 10), (DATA_SIZE - (1 << 20), 0x33, 1 << 20)]
EPOCH = 1


def _data_disk(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(DATA_SIZE)  # sparse: 8 GiB apparent, a few MiB on disk
        for off, byte, n in KNOWN:
            f.seek(off)
            f.write(bytes([byte]) * n)


def _hmp_io(host, handle, disk: str, command: str) -> str:
    """Run qemu-io in the VM's QEMU on the guest device of ``disk``; what it printed (QEMU
    prints qemu-io's output on its stdout, which is QEMU's log file)."""
    dev = f"/machine/peripheral/{handle.disk(disk).device}/virtio-backend"
    qemu_log = Path(handle.workdir) / f"qemu-{handle.vm_id}.log"
    before = qemu_log.stat().st_size
    with host.qmp(handle) as q:
        reply = q.execute("human-monitor-command", {"command-line": f'qemu-io -d {dev} "{command}"'})
    with open(qemu_log, "rb") as f:
        f.seek(before)
        return reply + f.read().decode(errors="replace")


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_nbd_disks_boot_at_once_stream_local_and_outlive_their_servers(vms: Vms, demo_disk: Path,
                                                                      tmp_path: Path) -> None:
    host = vms.host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    data = tmp_path / "data.img"
    _data_disk(data)
    root_srv = NbdServer(demo_disk, tmp_path / "srv" / "root.sock", export="root")
    data_srv = NbdServer(data, tmp_path / "srv" / "data.sock", export="data")
    try:
        spec = VmSpec(machine=MACHINE, memory_mib=256, workdir=tmp_path / "vm",
                      disks=[VmDisk(name="root", backing=root_srv.uri),
                             VmDisk(name="data", backing=data_srv.uri, size=DATA_SIZE)])
        started = time.monotonic()
        handle = vms.launch(spec)
        launched = time.monotonic() - started
        # Nothing of the disks was copied before the launch: each local layer is a few
        # hundred KiB of qcow2 metadata, whatever the disk's size.
        for d in handle.disks:
            assert _allocated(d.local) < (1 << 20) and _allocated(d.overlay) < (1 << 20), d
        assert launched < 10, f"launch took {launched:.1f} s"
        first = host.wait_for_marker(handle, timeout=90)
        with host.qmp(handle) as q:
            blocks = {b["inserted"]["node-name"]: b["inserted"]["image"]["virtual-size"] for b in q.execute("query-block")}
        assert blocks == {"d-root": demo_disk.stat().st_size, "d-data": DATA_SIZE}
        assert handle.servers_needed == [root_srv.uri, data_srv.uri]

        # The streams run in QEMU's background (slowed here so that they are seen running):
        # the guest goes on booting and writing meanwhile.
        assert start_streams(host, handle, speed=16 << 20) == ["root", "data"]
        assert start_streams(host, handle) == []  # idempotent: they run already
        running = stream_status(host, handle)
        assert any(not s.done for s in running), running
        assert host.status(handle) == "running"
        during = host.wait_for_marker(handle, timeout=30, after=first.counter)
        with host.qmp(handle) as q:  # seen: now at full speed
            for job in q.execute("query-block-jobs"):
                q.execute("block-job-set-speed", device=job["device"], speed=0)
        progress: list[float] = []
        status = wait_streams(host, handle, timeout=240, poll=0.5,
                              on_progress=lambda st: progress.append(min(s.fraction for s in st)))
        assert all(s.done for s in status), status
        assert progress[0] < 1.0 and progress[-1] == 1.0
        assert handle.servers_needed == [] and load_handle(spec.workdir).servers_needed == []
        # Local now: the data disk's local layer holds its data, not its 8 GiB of holes.
        assert sum(n for _, _, n in KNOWN) < _allocated(handle.disk("data").local) < (64 << 20)
        for d in handle.disks:
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", d.local], check=True,
                                             capture_output=True, text=True).stdout)
            assert "backing-filename" not in info, info
    finally:
        root_srv.stop()
        data_srv.stop()

    # Without its servers, the VM reads and writes both disks.
    after = host.wait_for_marker(handle, timeout=30, after=during.counter)
    for off, byte, n in KNOWN:
        out = _hmp_io(host, handle, "data", f"read -P {byte} {off} {n}")
        assert f"read {n}/{n} bytes" in out and "failed" not in out, out
    assert "Pattern verification failed" in _hmp_io(host, handle, "data", f"read -P 0x7f {KNOWN[1][0]} 512")
    out = _hmp_io(host, handle, "data", f"write -P 0x44 {5 * GIB} 65536")
    assert "wrote 65536/65536 bytes" in out, out

    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(host, handle, store, epoch=EPOCH)
    capture.ship_once()
    last = host.wait_for_marker(handle, timeout=30, after=after.counter)
    capture.final_capture()
    assert host.status(handle) == "gone"

    root_keys = [o.key for o in store.list(layout.logs_prefix(MACHINE, "root", EPOCH))]
    data_keys = [o.key for o in store.list(layout.logs_prefix(MACHINE, "data", EPOCH))]
    assert root_keys and data_keys
    shipped = 0
    for key in data_keys:
        with store.open(key) as f:
            info = validate_log(f, key, machine=MACHINE, disk="data", epoch=EPOCH, disk_size=DATA_SIZE)
        shipped += info.data_bytes
    assert shipped == 65536  # exactly the VM's write: not the stream, not the disk
    replay = replay_over(store, root_keys, pristine, tmp_path / "root-replay.img")
    marker = read_marker(replay)
    assert marker is not None and marker.counter >= last.counter
    subprocess.run(["qemu-img", "convert", "-O", "raw", handle.disk("root").overlay, str(tmp_path / "root-vm.img")],
                   check=True)
    assert same_file(replay, tmp_path / "root-vm.img")
    # The data disk: its logs over the served bytes are the VM's disk (replayed in place:
    # a copy of 8 GiB would cost what this test shows the failover does not).
    fd = os.open(data, os.O_WRONLY)
    try:
        for key in data_keys:
            apply_log(store, key, fd)
    finally:
        os.close(fd)
    with open(data, "rb") as f:
        for off, byte, n in [*KNOWN, (5 * GIB, 0x44, 65536)]:
            f.seek(off)
            assert f.read(n) == bytes([byte]) * n
    check = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(data),
                            handle.disk("data").overlay], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
