"""The demo physical machine: a disk that boots in QEMU from its own boot loader and keeps a
counter in its data partition (hotspare.demodisk, scripts/build-demo-disk.sh).

Fixtures come from tests/fixtures_demo.py (imported by conftest.py).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from tests.fixtures_demo import boot_demo_disk
from hotspare.demodisk import (
    DATA_PARTITION_TYPE,
    DISK_ID,
    MARKER_RE,
    MARKER_SLOTS,
    SECTOR,
    build_demo_disk,
    data_partition,
    data_partition_offset,
    parse_markers,
    parse_record,
    partitions,
    qemu_accel,
    read_marker,
    read_record,
    slot_sector,
)
from hotspare.errors import HotspareError

MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
BOOT_ID = "60a45788-f6ff-440c-b71a-c868b6958db0"


def _digest(path: Path, end: int) -> str:
    """sha256 of ``path``'s first ``end`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = end
        while left:
            chunk = f.read(min(left, 1 << 20))
            assert chunk, f"{path} is shorter than {end} bytes"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- no QEMU needed


def test_marker_line_parsing() -> None:
    console = (
        "\x1bc\x1b[?7l\x1b[2Jhotspare-guest: booted kernel 6.1.0-56-cloud-amd64\r\n"
        f"hotspare-marker counter=7 boot={BOOT_ID}\r\n"
        "noise\r\n"
        f"hotspare-marker counter=8 boot={BOOT_ID}\r\n"
    )
    markers = parse_markers(console)
    assert [m.counter for m in markers] == [7, 8]
    assert {m.boot_id for m in markers} == {BOOT_ID}
    m = MARKER_RE.search(f"\x1b[0mhotspare-marker counter=12 boot={BOOT_ID}\r")
    assert m and m.group("counter") == "12" and m.group("boot") == BOOT_ID
    # A console read while the guest writes its line: the marker counts once the line is whole.
    assert parse_markers(f"hotspare-marker counter=9 boot={BOOT_ID[:17]}") == []


def test_record_parsing() -> None:
    rec = f"HOTSPARE-MARKER counter=42 boot={BOOT_ID} uptime=3.1 slot=43 kernel=6.1.0-x\n".encode()
    m = parse_record(rec.ljust(SECTOR, b"\0"))
    assert m is not None and (m.counter, m.boot_id, m.slot, m.kernel) == (42, BOOT_ID, 43, "6.1.0-x")
    blk = parse_record(f"HOTSPARE-BLOCK counter=42 boot={BOOT_ID} slot=43\n".encode().ljust(SECTOR, b"\0"))
    assert blk is not None and blk.slot == 43 == slot_sector(42)
    assert parse_record(bytes(SECTOR)) is None
    assert parse_record(b"HOTSPARE-MARKER counter=x boot=y".ljust(SECTOR, b"\0")) is None
    assert [slot_sector(n) for n in (0, 1, 63, 64, 65)] == [1, 2, 64, 1, 2]


def test_partition_table_errors(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    with pytest.raises(HotspareError, match="no DOS partition table"):
        data_partition_offset(blank)
    # A valid label with only partition 1.
    mbr = bytearray(SECTOR)
    mbr[446:462] = bytes([0x80, 0, 0, 0, 0x06, 0, 0, 0]) + (2048).to_bytes(4, "little") + (2048).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    one = tmp_path / "one.img"
    one.write_bytes(bytes(mbr) + bytes(4096 * 1024 - SECTOR))
    assert [p.number for p in partitions(one)] == [1]
    with pytest.raises(HotspareError, match="no partition 2"):
        read_marker(one)
    # Partition 2 running past the end of the file.
    mbr[462:478] = bytes([0, 0, 0, 0, DATA_PARTITION_TYPE, 0, 0, 0]) + (4096).to_bytes(4, "little") + (8192).to_bytes(4, "little")
    two = tmp_path / "two.img"
    two.write_bytes(bytes(mbr) + bytes(4096 * 1024 - SECTOR))
    with pytest.raises(HotspareError, match="past the image's end"):
        data_partition(two)


def test_qemu_accel_answers_and_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qemu_accel() in ("kvm", "tcg")
    assert qemu_accel() == qemu_accel()  # cached
    monkeypatch.setenv("HOTSPARE_QEMU_ACCEL", "tcg")
    assert qemu_accel() == "tcg"
    monkeypatch.setenv("HOTSPARE_QEMU_ACCEL", "hvf")
    with pytest.raises(HotspareError, match="kvm or tcg"):
        qemu_accel()


# ---------------------------------------------------------------------------- the built image


def test_image_layout(demo_disk_image: Path) -> None:
    size = demo_disk_image.stat().st_size
    assert size == 64 << 20
    with open(demo_disk_image, "rb") as f:
        mbr = f.read(SECTOR)
    assert mbr[510:512] == b"\x55\xaa"
    assert int.from_bytes(mbr[440:444], "little") == DISK_ID
    if MBR_BIN.exists():
        assert mbr[:440] == MBR_BIN.read_bytes()[:440], "the first 440 bytes are not syslinux's mbr.bin"
    p1, p2 = partitions(demo_disk_image)
    assert (p1.number, p1.bootable, p1.type, p1.start_sector) == (1, True, 0x06, 2048)
    assert (p2.number, p2.bootable, p2.type) == (2, False, DATA_PARTITION_TYPE)
    assert p2.start_sector == p1.start_sector + p1.sectors
    assert p2.end == size  # the data partition runs to the end of the disk
    assert p2.sectors > MARKER_SLOTS
    assert data_partition_offset(demo_disk_image) == p2.offset
    # Partition 1 is FAT16 with syslinux's boot sector, and holds the kernel.
    with open(demo_disk_image, "rb") as f:
        f.seek(p1.offset)
        boot = f.read(SECTOR)
        f.seek(p1.offset)
        fat = f.read(p1.size)
    assert boot[510:512] == b"\x55\xaa" and boot[54:62] == b"FAT16   "
    assert b"SYSLINUX" in boot
    for name in (b"VMLINUZ    ", b"INITRD  IMG", b"SYSLINUXCFG", b"LDLINUX SYS"):
        assert name in fat, f"{name!r} missing from partition 1's root directory"
    assert read_marker(demo_disk_image) is None  # never booted


def test_build_is_reproducible_and_sized(demo_disk_image: Path, tmp_path: Path) -> None:
    """A second build hits the cache (seconds), gives the same bytes, and honours SIZE_MIB."""
    started = time.monotonic()
    again = build_demo_disk(tmp_path / "again.img")
    cached_seconds = time.monotonic() - started
    assert _digest(again, again.stat().st_size) == _digest(demo_disk_image, demo_disk_image.stat().st_size)
    assert cached_seconds < 30, f"a cached build took {cached_seconds:.1f} s"
    small = build_demo_disk(tmp_path / "small.img", 24)
    assert small.stat().st_size == 24 << 20
    assert data_partition(small).end == 24 << 20
    with pytest.raises(HotspareError, match="too small"):
        build_demo_disk(tmp_path / "tiny.img", 4)
    assert not (tmp_path / "tiny.img").exists()


# ---------------------------------------------------------------------------- booting


def test_boot_counts_and_a_second_boot_continues(demo_disk: Path, qemu_system: str, tmp_path: Path,
                                                 record_property: pytest.RecordProperty) -> None:
    p2 = data_partition(demo_disk)
    before = _digest(demo_disk, p2.offset)  # boot code, partition table, gap and partition 1

    # First boot: two marker lines with increasing counters, then stop QEMU.
    with boot_demo_disk(demo_disk, tmp_path / "boot1.log", qemu=qemu_system) as vm:
        accel = vm.accel
        first = vm.wait_markers(2, timeout=60 if accel == "kvm" else 90)
        first_seconds = time.monotonic() - vm.started
        assert vm.kernel(), "no 'hotspare-guest: booted kernel' line"
        assert "data partition /dev/vda2" in vm.console()
    record_property("accel", accel)
    record_property("seconds_to_second_marker", round(first_seconds, 1))
    assert first[0].counter == 1, "a fresh disk starts counting at 1"
    assert first[1].counter == first[0].counter + 1
    assert first[0].boot_id == first[1].boot_id
    last = parse_markers((tmp_path / "boot1.log").read_text(errors="replace"))[-1]

    on_disk = read_marker(demo_disk)
    assert on_disk is not None, "no marker record in the data partition after the first boot"
    assert last.counter - 1 <= on_disk.counter <= last.counter + 1
    assert on_disk.boot_id == first[0].boot_id
    assert on_disk.kernel == vm.kernel()
    # The rotating records: one per counter, each in its slot, so several blocks changed.
    for n in range(max(1, on_disk.counter - MARKER_SLOTS + 1), on_disk.counter + 1):
        rec = read_record(demo_disk, slot_sector(n))
        assert rec is not None and (rec.counter, rec.boot_id, rec.slot) == (n, on_disk.boot_id, slot_sector(n))
    assert _digest(demo_disk, p2.offset) == before, "the guest wrote outside its data partition"

    # Second boot of the same disk continues from what the disk holds.
    with boot_demo_disk(demo_disk, tmp_path / "boot2.log", qemu=qemu_system, accel=accel) as vm2:
        second = vm2.wait_markers(2, timeout=90)
        assert f"previous counter {on_disk.counter}" in vm2.console()
    assert second[0].counter == on_disk.counter + 1
    assert second[1].counter == second[0].counter + 1
    assert second[0].boot_id != on_disk.boot_id, "the second boot reused the first boot's id"
    after = read_marker(demo_disk)
    assert after is not None and after.counter >= second[-1].counter - 1 and after.boot_id == second[0].boot_id
    assert _digest(demo_disk, p2.offset) == before, "the guest wrote outside its data partition"


def test_boots_from_ide(demo_disk: Path, qemu_system: str, tmp_path: Path) -> None:
    """Under IDE (ata_piix, sd_mod) the guest finds its data partition as /dev/sda2."""
    with boot_demo_disk(demo_disk, tmp_path / "ide.log", qemu=qemu_system, interface="ide") as vm:
        (first,) = vm.wait_markers(1, timeout=90)
        assert "data partition /dev/sda2" in vm.console()
    on_disk = read_marker(demo_disk)
    assert on_disk is not None and on_disk.boot_id == first.boot_id and on_disk.counter >= first.counter


def test_guest_leaves_other_disks_alone(demo_disk: Path, qemu_system: str, tmp_path: Path) -> None:
    """Another disk with a partition 2 of its own (not a demo disk) is never written, even
    when it comes first (vda): the guest checks the disk id and partition type first."""
    other = tmp_path / "other.img"
    mbr = bytearray(SECTOR)
    mbr[446:462] = bytes([0x80, 0, 0, 0, 0x06, 0, 0, 0]) + (2048).to_bytes(4, "little") + (2048).to_bytes(4, "little")
    mbr[462:478] = bytes([0, 0, 0, 0, DATA_PARTITION_TYPE, 0, 0, 0]) + (4096).to_bytes(4, "little") + (12288).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    other.write_bytes(bytes(mbr) + bytes((8 << 20) - SECTOR))
    digest = _digest(other, other.stat().st_size)
    with boot_demo_disk(demo_disk, tmp_path / "two-disks.log", qemu=qemu_system, others=[other]) as vm:
        (first,) = vm.wait_markers(1, timeout=90)
        assert "data partition /dev/vdb2" in vm.console()
    assert _digest(other, other.stat().st_size) == digest, "the guest wrote to a disk that is not its own"
    on_disk = read_marker(demo_disk)
    assert on_disk is not None and on_disk.boot_id == first.boot_id
