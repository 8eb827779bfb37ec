"""DockerQemuHost on a private dockerd: the demo disk boots in QEMU inside a container built
offline from deployments/docker/build-offline.sh (TCG where KVM does not work), is adopted,
captured, stopped and killed. Every container a test leaves is removed by the ``docker_vms``
fixture's finalizer, which then fails the test that left it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from hotspare import layout
from hotspare.demodisk import qemu_accel, read_marker
from hotspare.errors import HotspareError
from hotspare.extentlog import validate_log
from hotspare.store import open_store
from hotspare.vm import VmCapture, VmDisk, VmHandle, VmSpec, load_handle
from hotspare.vm.qemu.stream import start_streams, wait_streams
from hotspare.vm.qemu.docker import LABEL_MACHINE, LABEL_VM, DockerQemuHost
from hotspare.vm.qemu.png import SIGNATURE, png_size
from tests.helpers import NbdServer, random_image, replay_over, require, same_file, sha256_file

MACHINE, DISK, EPOCH = "web1", "disk0", 1


@pytest.fixture
def docker_host(dockerd: str, qemu_runner_image: str) -> Iterator[DockerQemuHost]:
    require("qemu-img", "qemu-utils")  # the overlays are made on this side
    host = DockerQemuHost(dockerd, image=qemu_runner_image)
    yield host
    client = docker.DockerClient(base_url=dockerd)
    try:
        left = client.containers.list(all=True, filters={"label": LABEL_VM})
        for c in left:
            c.remove(force=True)
        assert not left, f"VM containers left behind: {[c.name for c in left]}"
    finally:
        client.close()
        host.close()


def _spec(disk: Path, workdir: Path) -> VmSpec:
    return VmSpec(machine=MACHINE, boot_disk=disk, format="raw", cpus=1, memory_mib=256, workdir=workdir)


def test_docker_vm_boots_is_adopted_and_stops(docker_host: DockerQemuHost, demo_disk: Path, tmp_path: Path) -> None:
    host = docker_host
    digest = sha256_file(demo_disk)
    spec = _spec(demo_disk, tmp_path / "vm")

    started = time.monotonic()
    handle = host.launch(spec)
    launched = time.monotonic() - started
    first = host.wait_for_marker(handle, timeout=90)
    boot_seconds = time.monotonic() - started
    assert handle.host == "docker-qemu" and handle.container_id and handle.pid is None
    assert handle.accel == qemu_accel()
    assert host.status(handle) == "running"
    assert host.find_running(spec.workdir) == handle
    assert VmHandle.model_validate_json(handle.model_dump_json()) == handle

    container = host.client.containers.get(handle.container_id)
    cfg = container.attrs["HostConfig"]
    assert cfg["NetworkMode"] == "none" and cfg["RestartPolicy"]["Name"] in ("", "no")
    assert container.labels[LABEL_MACHINE] == MACHINE and container.labels[LABEL_VM] == handle.vm_id
    binds = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert binds[str(spec.workdir)]["Source"] == str(spec.workdir) and binds[str(spec.workdir)]["RW"]
    assert not binds[str(demo_disk.parent)]["RW"], "the boot disk's directory must be read-only"

    # Outside the work directory: QEMU writes it in the container, the host moves it here.
    (tmp_path / "shots").mkdir()
    png = host.screendump(handle, tmp_path / "shots" / "screen.png")
    assert png.read_bytes()[:8] == SIGNATURE
    width, height = png_size(png)
    assert width >= 320 and height >= 200
    assert not list(spec.workdir.glob(".screendump-*"))

    again = host.launch(spec)  # a re-run adopts the VM instead of booting a second one
    assert again == handle and again.container_id == handle.container_id
    assert len(host.client.containers.list(filters={"label": LABEL_VM})) == 1
    # A launch that crashed before writing handle.json: the container's labels still find it.
    (spec.workdir / "handle.json").unlink()
    assert host.find_running(spec.workdir) == handle
    assert host.launch(spec) == handle and load_handle(spec.workdir) == handle

    host.stop(handle, timeout=30)
    assert host.status(handle) == "gone" and not host.is_alive(handle)
    assert host.client.containers.list(all=True, filters={"label": LABEL_VM}) == []  # removed
    host.stop(handle)  # idempotent
    host.kill(handle)
    assert host.find_running(spec.workdir) is None
    assert sha256_file(demo_disk) == digest, "the boot disk (the replica image) was modified"
    print(f"\nQEMU in container: launch() {launched:.1f} s, launch to first marker {boot_seconds:.1f} s "
          f"(accel {handle.accel}, marker {first.counter})")


def test_killed_container_is_gone_and_relaunch_continues(docker_host: DockerQemuHost, demo_disk: Path,
                                                          tmp_path: Path) -> None:
    host = docker_host
    spec = _spec(demo_disk, tmp_path / "vm")
    handle = host.launch(spec)
    first = host.wait_for_marker(handle, timeout=90)

    host.client.containers.get(handle.container_id).kill()  # a crash, from outside hotspare
    assert host.status(handle) == "gone" and not host.is_alive(handle)
    assert host.find_running(spec.workdir) is None

    # A new launch removes the dead container and boots on the dead VM's chain.
    resumed = host.launch(spec)
    assert resumed.vm_id != handle.vm_id and resumed.container_id != handle.container_id
    assert [d.overlay for d in resumed.disks] == [d.overlay for d in handle.disks]
    with pytest.raises(docker.errors.NotFound):
        host.client.containers.get(handle.container_id)
    later = host.wait_for_marker(resumed, timeout=90)
    assert later.boot_id != first.boot_id
    host.kill(resumed)
    assert host.status(resumed) == "gone"
    host.kill(resumed)  # idempotent
    host.stop(resumed)


def test_capture_ships_epoch_logs_from_a_docker_vm(docker_host: DockerQemuHost, demo_disk: Path,
                                                    tmp_path: Path) -> None:
    """Two disks in a container: the demo root disk (a local image) and a data disk served
    over NBD from this side (the socket's directory mounted into the container); the data
    disk streams local, its server stops, and the VM's writes to both are captured through
    the capture's NBD socket in the bind-mounted work directory."""
    host = docker_host
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(demo_disk, pristine)
    data = tmp_path / "data.img"
    random_image(data, 16 << 20, seed=5, fill=0.25)
    server = NbdServer(data, tmp_path / "srv" / "data.sock")
    try:
        spec = VmSpec(machine=MACHINE, cpus=1, memory_mib=256, workdir=tmp_path / "vm",
                      disks=[VmDisk(name=DISK, backing=str(demo_disk)), VmDisk(name="data", backing=server.uri)])
        handle = host.launch(spec)
        host.wait_for_marker(handle, timeout=90)
        assert start_streams(host, handle) == [DISK, "data"]
        assert all(s.done for s in wait_streams(host, handle, timeout=60, poll=0.2))
        assert handle.servers_needed == [] and load_handle(spec.workdir).servers_needed == []
    finally:
        server.stop()
    with host.qmp(handle) as q:  # a write by the VM to its data disk, after its server is gone
        q.execute("human-monitor-command",
                  {"command-line": f"qemu-io -d /machine/peripheral/{handle.disk('data').device}/virtio-backend "
                                   f"\"write -P 0x5c 3145728 131072\""})

    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(host, handle, store, epoch=EPOCH)
    shipped = capture.ship_once()
    assert any(f"/{DISK}/" in k for k in shipped), "the guest wrote its marker sector, but nothing was shipped"
    assert [k for k in shipped if "/data/" in k]
    last_console = host.wait_for_marker(handle, timeout=30)
    final = capture.final_capture(timeout=30)
    assert host.status(handle) == "gone"
    assert host.client.containers.list(all=True, filters={"label": LABEL_VM}) == []

    keys = [o.key for o in store.list(layout.logs_prefix(MACHINE, DISK, EPOCH))]
    assert keys and set(final) <= set(keys)
    expect = 0
    for key in keys:
        with store.open(key) as f:
            info = validate_log(f, key, machine=MACHINE, disk=DISK, epoch=EPOCH, disk_size=pristine.stat().st_size)
        assert info.meta.first_seq == expect, key
        expect = info.meta.last_seq + 1
    replay = replay_over(store, keys, pristine, tmp_path / "replay.img")
    marker = read_marker(replay)
    assert marker is not None and marker.boot_id == last_console.boot_id
    assert marker.counter >= last_console.counter
    # Exactly the VM's disks: the replays equal what QEMU reads through their layers.
    subprocess.run(["qemu-img", "convert", "-O", "raw", handle.disks[0].overlay, str(tmp_path / "vm.img")], check=True)
    assert same_file(replay, tmp_path / "vm.img")
    data_keys = [o.key for o in store.list(layout.logs_prefix(MACHINE, "data", EPOCH))]
    replay_over(store, data_keys, data, tmp_path / "data-replay.img")
    subprocess.run(["qemu-img", "convert", "-O", "raw", handle.disk("data").overlay, str(tmp_path / "data-vm.img")],
                   check=True)
    assert same_file(tmp_path / "data-replay.img", tmp_path / "data-vm.img")
    with open(tmp_path / "data-vm.img", "rb") as f:
        f.seek(3 << 20)
        assert f.read(128 << 10) == b"\x5c" * (128 << 10)
    store.close()


def test_missing_image_says_how_to_build_it(dockerd: str, demo_disk: Path, tmp_path: Path) -> None:
    host = DockerQemuHost(dockerd, image="hotspare/no-such-runner:none")
    with pytest.raises(HotspareError, match=r"hotspare/no-such-runner:none not found.*build-offline\.sh"):
        host.launch(_spec(demo_disk, tmp_path / "vm"))
    host.close()


def test_unreachable_daemon_is_named(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    host = DockerQemuHost(f"unix://{sock}")
    with pytest.raises(HotspareError, match=f"docker daemon at unix://{sock}"):
        host.find_running(tmp_path / "vm")


def test_build_offline_skips_an_existing_image(dockerd: str, qemu_runner_image: str) -> None:
    script = Path(__file__).resolve().parent.parent / "deployments" / "docker" / "build-offline.sh"
    started = time.monotonic()
    proc = subprocess.run(["sh", str(script), qemu_runner_image, dockerd], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exists already" in proc.stdout and time.monotonic() - started < 10


def test_qemu_failing_at_start_is_reported_and_removed(docker_host: DockerQemuHost, demo_disk: Path,
                                                       tmp_path: Path) -> None:
    # More guest memory than the machine can map: QEMU exits before its QMP socket answers.
    spec = VmSpec(machine=MACHINE, boot_disk=demo_disk, memory_mib=64 << 20, workdir=tmp_path / "vm")
    with pytest.raises(HotspareError, match=r"exited at start: .*memory"):
        docker_host.launch(spec)
    assert docker_host.client.containers.list(all=True, filters={"label": LABEL_VM}) == []
    assert docker_host.find_running(spec.workdir) is None


def test_a_drill_on_the_docker_host_verifies_the_point_and_leaves_nothing(
        docker_host: DockerQemuHost, dockerd: str, prefect_api: str, demo_disk: Path, tmp_path: Path) -> None:
    """``hotspare drill`` of a machine whose policy names the docker host: the point boots in
    QEMU in a container over the served replica, the verdict is verified, and no container,
    overlay, socket or server is left (the fixture fails the test on a container left)."""
    from tests.helpers import cli
    from tests.test_drill import assert_nothing_left, catalogs

    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_VM_DIR": str(tmp_path / "vms"), "DOCKER_HOST": dockerd, "COLUMNS": "400"}
    cli("protect", "demo", "--disk", f"root={demo_disk}", "--host", "docker", env=env)
    cli("agent", "demo", "--once", "--quiet", env=env)
    cli("consolidate", "demo", env=env)
    r = cli("drill", "demo", env=env, timeout=600)
    assert "verified" in r.stdout, r.stdout
    verdict = catalogs(env)["root"].points[0].drill
    assert verdict.verdict == "verified" and verdict.seconds > 0, verdict
    assert_nothing_left(tmp_path)
