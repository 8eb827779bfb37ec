"""hotspare.vm without booting a VM: specs and handles, the PNG encoder, the QMP client's
errors, and the capture's reading of qcow2 overlays (real qemu-img and qemu-io, and the
offline capture path that ships a dead VM's overlays)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from hotspare import layout
from hotspare.errors import HotspareError
from hotspare.extentlog import validate_log
from hotspare.replay import apply_log
from hotspare.store import open_store
from hotspare.vm import LocalQemuHost, QmpClient, QmpError, VmCapture, VmHandle, VmSpec, load_handle, save_handle
from hotspare.vm import chain
from hotspare.vm.png import SIGNATURE, encode_png, png_size, ppm_to_png
from tests.helpers import random_image, require, same_file

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


def test_handle_is_json_and_saved_atomically(tmp_path: Path) -> None:
    handle = VmHandle(host="local-qemu", vm_id="web1-0123abcd", machine="web1", workdir=str(tmp_path),
                      boot_disk="/d/boot.img", format="vpc", accel="tcg", pid=4242,
                      qmp_socket=str(tmp_path / "qmp.sock"), serial_log=str(tmp_path / "serial.log"),
                      overlays=["/w/base.qcow2", "/w/ov-000001.qcow2"])
    again = VmHandle.model_validate_json(handle.model_dump_json())
    assert again == handle
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
    code = "import sys, hotspare.vm, hotspare.vm.capture; assert 'prefect' not in sys.modules, 'prefect imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- overlays


@pytest.fixture
def qemu_tools() -> None:
    require("qemu-img", "qemu-utils")
    require("qemu-io", "qemu-utils")


def _qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def _vm_workdir(tmp_path: Path, size: int) -> tuple[Path, Path, list[Path]]:
    """A work directory laid out as LocalQemuHost leaves it, with two overlays over base."""
    boot = tmp_path / "boot.img"
    random_image(boot, size, seed=7, fill=0.5)
    ovdir = chain.overlay_dir(tmp_path / "vm")
    ovdir.mkdir(parents=True)
    base = chain.create_overlay(ovdir / chain.BASE, boot, "raw", size)
    ov1 = chain.create_overlay(ovdir / chain.overlay_name(1), base, "qcow2", size)
    ov2 = chain.create_overlay(ovdir / chain.overlay_name(2), ov1, "qcow2", size)
    return boot, base, [ov1, ov2]


def test_allocations_are_what_the_overlay_itself_holds(tmp_path: Path, qemu_tools: None) -> None:
    size = 8 * MIB
    boot, base, (ov1, ov2) = _vm_workdir(tmp_path, size)
    _qemu_io(base, "write -P 0x77 0 64k")  # in base: not ov1's
    _qemu_io(ov1, "write -P 0xab 1M 512", "write -P 0xcd 2M 192k", "write -z 4M 128k", "write -z 5M 4k",
             "write -P 0x11 70000 1000")
    allocs = chain.allocations(ov1)
    assert [(a.offset, a.length, a.host_offset is None) for a in allocs] == [
        (69632, 2048, False),  # 1000 bytes at 70000: the 2 KiB subcluster around it
        (1 * MIB, 2048, False),
        (2 * MIB, 192 << 10, False),
        (4 * MIB, 128 << 10, True),  # zero clusters: null extents
        (5 * MIB, 4096, True),
    ]
    assert chain.allocations(ov2) == []
    # Replaying the allocations over the layers below gives exactly what qemu reads.
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(tmp_path / "below.img")], check=True)
    fd = os.open(tmp_path / "below.img", os.O_RDWR)
    with open(ov1, "rb") as src:
        for a in allocs:
            if a.host_offset is None:
                os.pwrite(fd, bytes(a.length), a.offset)
            else:
                src.seek(a.host_offset)
                os.pwrite(fd, src.read(a.length), a.offset)
    os.close(fd)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(ov1), str(tmp_path / "ov1.img")], check=True)
    assert same_file(tmp_path / "below.img", tmp_path / "ov1.img")


def test_chain_from_files_skips_a_half_made_rotation(tmp_path: Path, qemu_tools: None) -> None:
    size = 4 * MIB
    boot, base, (ov1, ov2) = _vm_workdir(tmp_path, size)
    assert chain.chain_from_files(tmp_path / "vm", str(boot)) == [str(base), str(ov1), str(ov2)]
    stray = tmp_path / "stray.qcow2"
    chain.create_overlay(stray, boot, "raw", size)
    chain.create_overlay(ov2.with_name(chain.overlay_name(3)), stray, "qcow2", size)
    (ov2.with_name(chain.overlay_name(4))).write_bytes(b"not a qcow2")
    assert chain.chain_from_files(tmp_path / "vm", str(boot)) == [str(base), str(ov1), str(ov2)]
    assert chain.chain_from_files(tmp_path / "vm", str(tmp_path / "other.img")) == []


def test_dead_vm_overlays_ship_offline_with_continuing_seqs(tmp_path: Path, qemu_tools: None) -> None:
    size = 8 * MIB
    boot, base, (ov1, ov2) = _vm_workdir(tmp_path, size)
    _qemu_io(ov1, "write -P 0xab 1M 64k", "write -P 0x01 6M 2k")
    _qemu_io(ov2, "write -P 0xcd 1M 4k", "write -z 6M 64k", "write -P 0x5a 7M 1M")
    workdir = tmp_path / "vm"
    # A VM that ran here and died: its pid no longer exists.
    handle = VmHandle(host="local-qemu", vm_id="web1-00000000", machine="web1", workdir=str(workdir),
                      boot_disk=str(boot), format="raw", accel="tcg", pid=None,
                      qmp_socket=str(workdir / "qmp.sock"), serial_log=str(workdir / "serial.log"))
    store = open_store(str(tmp_path / "store"))
    capture = VmCapture(LocalQemuHost(), handle, store, disk="disk0", epoch=1)
    keys = capture.ship_once()
    assert [layout.parse_log_name(k) for k in keys] == [(0, 1), (2, 4)]
    assert capture.ship_once() == []  # nothing new: the overlays are recorded as shipped
    for key in keys:
        with store.open(key) as f:
            info = validate_log(f, key, machine="web1", disk="disk0", epoch=1, disk_size=size)
        assert info.meta.epoch == 1

    # A capture that crashed after its upload, before saving its state, re-ships under new seqs.
    state = json.loads(capture.state_path.read_text())
    capture.state_path.write_text(json.dumps({**state, "last_seq": -1, "shipped": []}))
    again = VmCapture(LocalQemuHost(), handle, store, disk="disk0", epoch=1).ship_once()
    assert [layout.parse_log_name(k) for k in again] == [(5, 6), (7, 9)]

    replay = tmp_path / "replay.img"
    replay.write_bytes(boot.read_bytes())
    fd = os.open(replay, os.O_WRONLY)
    for info in store.list(layout.logs_prefix("web1", "disk0", 1)):
        apply_log(store, info.key, fd)
    os.close(fd)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(ov2), str(tmp_path / "vm.img")], check=True)
    assert same_file(replay, tmp_path / "vm.img")

    with pytest.raises(HotspareError, match="capture state is for .* epoch 1"):
        VmCapture(LocalQemuHost(), handle, store, disk="disk0", epoch=2)
