"""hotspare.vm without booting a VM: specs and handles, the PNG encoder, the QMP client's
errors, the NBD reader against a real NBD server (qemu-nbd), and the offline capture of a
gone VM's disks through a real qemu-storage-daemon (real qemu-img and qemu-io)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from hotspare import layout
from hotspare.errors import HotspareError
from hotspare.extentlog import validate_log
from hotspare.replay import apply_log
from hotspare.store import open_store
from hotspare.capture.nbd import NbdError, NbdReader
from hotspare.vm import LocalQemuHost, QmpClient, QmpError, VmCapture, VmHandle, VmSpec, load_handle, save_handle
from hotspare.vm.host import HandleDisk, VmDisk, nbd_export_of, nbd_socket_of
from hotspare.vm.qemu.cmd import prepare_disks
from hotspare.vm.qemu.png import SIGNATURE, encode_png, png_size, ppm_to_png
from tests.helpers import NbdServer, random_image, require, same_file

MIB = 1 << 20


# ---------------------------------------------------------------------------- spec and handle


def test_spec_validates_and_makes_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = VmSpec(machine="web1", boot_disk=Path("boot.img"), workdir=Path("vm"))
    assert spec.boot_disk == tmp_path / "boot.img" and spec.workdir == tmp_path / "vm"
    assert (spec.format, spec.cpus, spec.memory_mib) == ("raw", 1, 512)
    with pytest.raises(ValidationError, match="format"):
        VmSpec(machine="web1", boot_disk=Path("b"), workdir=Path("w"), format="qcow2")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="cpus"):
        VmSpec(machine="web1", boot_disk=Path("b"), workdir=Path("w"), cpus=0)
    with pytest.raises(HotspareError, match="machine name"):
        VmSpec(machine="web 1", boot_disk=Path("b"), workdir=Path("w"))
    # boot_disk is a one-disk spec; a machine's disks are given in its order.
    assert [(d.name, d.backing) for d in spec.disks] == [("disk0", str(tmp_path / "boot.img"))]
    two = VmSpec(machine="web1", workdir=Path("vm"), disks=[
        VmDisk(name="root", backing="root.raw"),
        VmDisk(name="data", backing="nbd+unix:///data?socket=/run/hs/data.sock", size=8 << 30)])
    assert two.boot_disk == tmp_path / "root.raw" and two.disks[1].is_nbd
    assert nbd_socket_of(two.disks[1].backing) == "/run/hs/data.sock" and nbd_export_of(two.disks[1].backing) == "data"
    with pytest.raises(ValidationError, match="absolute"):
        VmDisk(name="data", backing="nbd+unix:///data?socket=rel.sock")
    with pytest.raises(ValidationError, match="names no socket"):
        VmDisk(name="data", backing="nbd+unix:///data")
    with pytest.raises(ValidationError, match="local image path"):
        VmDisk(name="data", backing="http://host/disk")
    with pytest.raises(ValidationError, match="repeat"):
        VmSpec(machine="web1", workdir=Path("vm"), disks=[VmDisk(name="a", backing="x"), VmDisk(name="a", backing="y")])
    with pytest.raises(ValidationError):
        VmSpec(machine="web1", workdir=Path("vm"), disks=[])


def test_handle_is_json_and_saved_atomically(tmp_path: Path) -> None:
    handle = VmHandle(host="local-qemu", vm_id="web1-0123abcd", machine="web1", workdir=str(tmp_path),
                      boot_disk="/d/boot.img", format="vpc", accel="tcg", pid=4242,
                      qmp_socket=str(tmp_path / "qmp.sock"), serial_log=str(tmp_path / "serial.log"),
                      disks=[HandleDisk(name="root", backing="/d/boot.img", size=1 << 20, overlay="/w/root.qcow2",
                                        local="/w/root.local.qcow2", node="d-root", device="disk0"),
                             HandleDisk(name="data", backing="nbd+unix:///?socket=/s", size=1 << 20,
                                        overlay="/w/data.qcow2", local="/w/data.local.qcow2", node="d-data",
                                        device="disk1")])
    again = VmHandle.model_validate_json(handle.model_dump_json())
    assert again == handle
    assert handle.servers_needed == ["nbd+unix:///?socket=/s"] and handle.disk("data").device == "disk1"
    with pytest.raises(HotspareError, match="no disk 'nope'"):
        handle.disk("nope")
    assert load_handle(tmp_path) is None
    save_handle(handle)
    assert load_handle(tmp_path) == handle
    assert json.loads((tmp_path / "handle.json").read_text())["vm_id"] == "web1-0123abcd"
    (tmp_path / "handle.json").write_text("{not json")
    with pytest.raises(HotspareError, match="unreadable VM handle"):
        load_handle(tmp_path)


def test_a_handle_without_a_process_is_gone(tmp_path: Path) -> None:
    host = LocalQemuHost()
    handle = VmHandle(host="local-qemu", vm_id="web1-deadbeef", machine="web1", workdir=str(tmp_path),
                      boot_disk="/nonexistent", format="raw", accel="tcg", pid=os.getpid(),
                      qmp_socket=str(tmp_path / "qmp.sock"), serial_log=str(tmp_path / "serial.log"))
    # Our own pid is alive, but it is not this VM: the cmdline check tells them apart.
    assert not host.is_alive(handle)
    assert host.status(handle) == "gone"
    host.stop(handle)
    host.kill(handle)
    assert host.serial_log(handle) == ""
    save_handle(handle)
    assert host.find_running(tmp_path) is None


# ---------------------------------------------------------------------------- PNG


def _idat_pixels(png: bytes) -> bytes:
    pos, idat = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind = png[pos + 4:pos + 8]
        body = png[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    return zlib.decompress(idat)


def test_png_encoder_and_ppm_conversion(tmp_path: Path) -> None:
    rgb = bytes(range(3 * 2 * 3))  # 3 wide, 2 high
    png = encode_png(3, 2, rgb)
    assert png.startswith(SIGNATURE)
    assert _idat_pixels(png) == b"\0" + rgb[:9] + b"\0" + rgb[9:]
    (tmp_path / "a.png").write_bytes(png)
    assert png_size(tmp_path / "a.png") == (3, 2)

    (tmp_path / "s.ppm").write_bytes(b"P6\n# made by a test\n3 2\n255\n" + rgb)
    assert ppm_to_png(tmp_path / "s.ppm", tmp_path / "s.png") == (3, 2)
    assert (tmp_path / "s.png").read_bytes() == png

    (tmp_path / "bad.png").write_bytes(b"GIF89a" + bytes(40))
    with pytest.raises(HotspareError, match="not a PNG"):
        png_size(tmp_path / "bad.png")
    (tmp_path / "short.ppm").write_bytes(b"P6 3 2 255\n" + rgb[:5])
    with pytest.raises(HotspareError, match="pixel bytes"):
        ppm_to_png(tmp_path / "short.ppm", tmp_path / "x.png")
    with pytest.raises(ValueError):
        encode_png(3, 2, rgb[:-1])


# ---------------------------------------------------------------------------- QMP


def test_qmp_errors_name_the_socket_and_command(tmp_path: Path) -> None:
    path = tmp_path / ("long-" * 30) / "qmp.sock"  # past sun_path's 107 bytes
    path.parent.mkdir()
    with pytest.raises(QmpError, match=r"QMP connect on .*qmp\.sock: cannot connect") as err:
        QmpClient(path, timeout=1).connect()
    assert err.value.command == "connect" and err.value.error_class is None
    with pytest.raises(QmpError, match="not connected"):
        QmpClient(path).execute("query-status")


def test_engine_vm_package_does_not_import_prefect() -> None:
    code = "import sys, hotspare.vm, hotspare.vm.qemu.capture; assert 'prefect' not in sys.modules, 'prefect imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vm_package_loads_neither_docker_nor_boto3() -> None:
    # The Docker and EC2 hosts are imported on demand (hotspare.vm's docstring).
    code = ("import sys, hotspare.vm; "
            "print(sorted(m for m in ('boto3', 'botocore', 'docker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------- disks, NBD, offline capture


@pytest.fixture
def qemu_tools() -> None:
    require("qemu-img", "qemu-utils")
    require("qemu-io", "qemu-utils")
    require("qemu-nbd", "qemu-utils")
    require("qemu-storage-daemon", "qemu-system-common")
    require("nbdinfo", "libnbd-bin")


def _qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


@pytest.fixture
def nbd_server(tmp_path: Path, qemu_tools: None) -> Iterator[tuple[str, Path]]:
    """A real NBD server (qemu-nbd, read-only) on a unix socket over a random 8 MiB raw image."""
    image = tmp_path / "served.img"
    random_image(image, 8 * MIB, seed=11, fill=0.5)
    with NbdServer(image, tmp_path / "served.sock") as server:
        yield server.uri, image


def test_nbd_reader_reads_what_the_server_serves(nbd_server: tuple[str, Path]) -> None:
    uri, image = nbd_server
    sock = nbd_socket_of(uri)
    assert sock is not None and nbd_export_of(uri) == "point"
    with NbdReader(sock, "point") as r:
        assert r.size == image.stat().st_size
        buf = bytearray(3 * MIB + 512)
        assert r.readinto(memoryview(buf), 1 * MIB - 512) == len(buf)
    with open(image, "rb") as f:
        f.seek(1 * MIB - 512)
        assert bytes(buf) == f.read(len(buf))
    with pytest.raises(NbdError, match="refused the export"):
        NbdReader(sock, "nope").connect()
    with pytest.raises(NbdError, match="cannot connect"):
        NbdReader(str(sock) + ".missing").connect()


def _dead_vm(tmp_path: Path, disks: list[VmDisk]) -> VmHandle:
    """A work directory as a VM leaves it when it died: disks prepared, no process."""
    spec = VmSpec(machine="web1", disks=disks, workdir=tmp_path / "vm")
    return VmHandle(host="local-qemu", vm_id="web1-00000000", machine="web1", workdir=str(spec.workdir),
                    boot_disk=str(spec.boot_disk), format="raw", accel="tcg", pid=None,
                    qmp_socket=str(spec.workdir / "qmp.sock"), serial_log=str(spec.workdir / "serial.log"),
                    disks=prepare_disks(spec))


def _replay(store, disk: str, base: Path, out: Path) -> None:
    out.write_bytes(base.read_bytes())
    fd = os.open(out, os.O_WRONLY)
    try:
        for info in store.list(layout.logs_prefix("web1", disk, 1)):
            apply_log(store, info.key, fd)
    finally:
        os.close(fd)


def test_dead_vm_disks_ship_offline_through_a_storage_daemon(tmp_path: Path, nbd_server: tuple[str, Path]) -> None:
    """A gone VM: a qemu-storage-daemon opens its disks (one over a local image, one over an
    NBD server) and the bitmap tracker ships them; its bitmaps then live in the overlays."""
    uri, served = nbd_server
    boot = tmp_path / "boot.img"
    random_image(boot, 4 * MIB, seed=7, fill=0.3)
    handle = _dead_vm(tmp_path, [VmDisk(name="root", backing=str(boot)), VmDisk(name="data", backing=uri)])
    assert [(d.name, d.size, d.backing_needed) for d in handle.disks] == [("root", 4 * MIB, True),
                                                                          ("data", 8 * MIB, True)]
    root, data = handle.disks
    _qemu_io(Path(root.overlay), "write -P 0xab 1M 64k")
    _qemu_io(Path(data.overlay), "write -P 0xcd 2M 4k", "write -z 6M 64k")
    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(LocalQemuHost(), handle, store, epoch=1)
    # No bitmap recorded these writes (no VM added one): a rescan of each disk against the
    # capture's hash map, which knows nothing yet, ships every non-zero block once.
    keys = capture.ship_once()
    assert {k.split("/")[3] for k in keys} == {"root", "data"}
    for key in keys:
        disk = key.split("/")[3]
        with store.open(key) as f:
            info = validate_log(f, key, machine="web1", disk=disk, epoch=1, disk_size=handle.disk(disk).size)
        assert info.meta.cut and info.meta.consistent
    for d in handle.disks:
        _replay(store, d.name, _zeros(tmp_path, d.size), tmp_path / f"{d.name}.img")
        subprocess.run(["qemu-img", "convert", "-O", "raw", d.overlay, str(tmp_path / f"{d.name}.vm.img")], check=True)
        assert same_file(tmp_path / f"{d.name}.img", tmp_path / f"{d.name}.vm.img")
    assert capture.ship_once() == []  # the daemon quit cleanly: its new bitmaps are stored

    # More writes while the VM is still gone (qemu-io keeps the stored bitmaps recording):
    # only those ship, with seqs after the last.
    _qemu_io(Path(data.overlay), "write -P 0x5a 7M 128k")
    last = layout.parse_log_name(sorted(k for k in keys if "/data/" in k)[-1])[1]
    again = VmCapture(LocalQemuHost(), handle, store, epoch=1).ship_once()
    assert [k.split("/")[3] for k in again] == ["data"]
    with store.open(again[0]) as f:
        info = validate_log(f, again[0], machine="web1", disk="data", epoch=1, disk_size=data.size)
    assert info.meta.first_seq == last + 1 and info.data_bytes == 128 << 10
    _replay(store, "data", _zeros(tmp_path, data.size), tmp_path / "data2.img")
    subprocess.run(["qemu-img", "convert", "-O", "raw", data.overlay, str(tmp_path / "data2.vm.img")], check=True)
    assert same_file(tmp_path / "data2.img", tmp_path / "data2.vm.img")

    with pytest.raises(HotspareError, match="capture state of disk root is for epoch 1"):
        VmCapture(LocalQemuHost(), handle, store, epoch=2)


def _zeros(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"zeros-{size}.img"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(size)
    return path
