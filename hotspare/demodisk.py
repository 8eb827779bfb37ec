"""The demo "physical machine": a real bootable disk image, and how to read what it did.

``build_demo_disk`` runs ``scripts/build-demo-disk.sh``: a raw disk with a DOS label whose
partition 1 (FAT16, bootable, syslinux) holds Debian's cloud kernel and a busybox initramfs,
and whose partition 2 (MBR type 0xda) is the data partition. Booted in QEMU (SeaBIOS, no
``-kernel``), the guest keeps a counter in the data partition: once a second it writes

- sector 0 of partition 2, the marker: ``HOTSPARE-MARKER counter=<n> boot=<boot id> ...``
  padded with NULs (a copy of the disk booted elsewhere reads it and continues the count);
- sector ``1 + n % 64``, a rotating record ``HOTSPARE-BLOCK counter=<n> boot=<id> slot=<s>``,

syncs, and prints ``hotspare-marker counter=<n> boot=<id>`` on the serial console
(:data:`MARKER_RE`). It writes nothing outside partition 2.

``qemu_accel`` says whether QEMU can use KVM here ("kvm") or must emulate ("tcg").

Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hotspare.errors import HotspareError

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-demo-disk.sh"
DEFAULT_SIZE_MIB = 64
SECTOR = 512
DATA_PARTITION = 2
DATA_PARTITION_TYPE = 0xDA
DISK_ID = 0x48535044  # MBR disk identifier of every demo disk (bytes 440..443)
MARKER_SLOTS = 64  # rotating records live at sectors 1..64 of the data partition

#: One marker line of the guest's serial console (search, don't match: the console may put
#: terminal escapes or a carriage return around it). Only a whole line counts: a console
#: read while the guest writes may end inside the boot id.
MARKER_RE = re.compile(r"hotspare-marker counter=(?P<counter>\d+) boot=(?P<boot>[0-9A-Za-z-]+)(?=[\r\n])")
#: The guest's first line, once its init runs.
BOOT_LINE_RE = re.compile(r"hotspare-guest: booted kernel (?P<kernel>\S+)")
_RECORD_RE = re.compile(
    rb"^HOTSPARE-(?P<kind>MARKER|BLOCK) counter=(?P<counter>\d+) boot=(?P<boot>[0-9A-Za-z-]+)(?P<rest>[^\n\0]*)"
)

# Command (or file) -> the Debian package the build script installs for it.
BUILD_TOOLS = {
    "syslinux": "syslinux",
    "/usr/lib/syslinux/mbr/mbr.bin": "syslinux-common",
    "mcopy": "mtools",
    "mkfs.vfat": "dosfstools",
    "sfdisk": "fdisk",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "depmod": "kmod",
}


@dataclass(frozen=True)
class Marker:
    """A record the guest wrote (or printed): its counter and the id of the boot that wrote it."""

    counter: int
    boot_id: str
    kernel: str | None = None  # kernel release, in the sector-0 marker
    slot: int | None = None  # the rotating sector the same iteration wrote


@dataclass(frozen=True)
class Partition:
    """One primary partition of a DOS (MBR) partition table."""

    number: int  # 1..4
    bootable: bool
    type: int
    start_sector: int
    sectors: int

    @property
    def offset(self) -> int:
        return self.start_sector * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    @property
    def end(self) -> int:
        return self.offset + self.size


# ------------------------------------------------------------------------------- building


def missing_build_tools() -> list[str]:
    """The Debian packages the build script would have to install first (empty: none)."""
    missing = []
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for tool, package in BUILD_TOOLS.items():
        present = os.path.exists(tool) if tool.startswith("/") else shutil.which(tool, path=path) is not None
        if not present and package not in missing:
            missing.append(package)
    return missing


def can_install_build_tools() -> bool:
    """Whether the build script can install missing tools itself (apt-get, as root or via sudo)."""
    if shutil.which("apt-get") is None:
        return False
    return os.geteuid() == 0 or shutil.which("sudo") is not None


def build_demo_disk(path: str | os.PathLike[str], size_mib: int = DEFAULT_SIZE_MIB, *, timeout: float = 1800) -> Path:
    """Build the demo disk at ``path`` (raw, ``size_mib`` MiB) and return its path.

    Runs ``scripts/build-demo-disk.sh``, which installs missing Debian build tools with
    apt-get and caches the kernel and initramfs (a cached build takes about a second).
    Raises :class:`HotspareError` with the script's last lines of stderr when it fails.
    """
    out = Path(path)
    if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib <= 0:
        raise HotspareError(f"demo disk {out}: size must be a positive whole number of MiB, got {size_mib!r}")
    if not SCRIPT.is_file():
        raise HotspareError(f"demo disk {out}: build script {SCRIPT} not found (hotspare must run from its repository)")
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), str(out), str(size_mib)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise HotspareError(f"demo disk {out}: {SCRIPT.name} did not finish in {timeout:.0f} s") from e
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.strip().splitlines()[-8:])
        raise HotspareError(f"demo disk {out}: {SCRIPT.name} failed (exit {proc.returncode}):\n{tail}")
    for line in proc.stderr.splitlines():
        log.debug("%s", line)
    return out


# ------------------------------------------------------------------------------- reading


def partitions(image: str | os.PathLike[str]) -> list[Partition]:
    """The primary partitions of the DOS partition table in ``image``'s first sector."""
    p = Path(image)
    try:
        with open(p, "rb") as f:
            mbr = f.read(SECTOR)
    except OSError as e:
        raise HotspareError(f"{p}: cannot read the partition table: {e.strerror or e}") from e
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise HotspareError(f"{p}: no DOS partition table (no 0x55AA boot signature in the first sector)")
    parts = []
    for i in range(4):
        status, ptype, start, count = struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i)
        if ptype == 0 or count == 0:
            continue
        if status not in (0x00, 0x80):
            raise HotspareError(f"{p}: partition {i + 1} has an invalid status byte 0x{status:02x}")
        parts.append(Partition(i + 1, status == 0x80, ptype, start, count))
    return parts


def data_partition(image: str | os.PathLike[str]) -> Partition:
    """Partition 2 of ``image``, checked to lie inside the image."""
    p = Path(image)
    found = {part.number: part for part in partitions(p)}
    part = found.get(DATA_PARTITION)
    if part is None:
        raise HotspareError(f"{p}: the partition table has no partition {DATA_PARTITION} (the data partition)")
    size = p.stat().st_size
    if part.end > size:
        raise HotspareError(f"{p}: partition {DATA_PARTITION} ends at byte {part.end}, past the image's end ({size})")
    return part


def data_partition_offset(image: str | os.PathLike[str]) -> int:
    """Byte offset of the data partition (partition 2) in ``image``, read from its MBR."""
    return data_partition(image).offset


def slot_sector(counter: int) -> int:
    """The data-partition sector of the rotating record written with ``counter``."""
    return 1 + counter % MARKER_SLOTS


def parse_record(sector: bytes) -> Marker | None:
    """A marker or rotating record from one sector's bytes, or None if it holds none."""
    m = _RECORD_RE.match(sector)
    if m is None:
        return None
    fields = dict(
        kv.split("=", 1) for kv in m.group("rest").decode("ascii", "replace").split() if "=" in kv
    )
    slot = fields.get("slot")
    return Marker(
        counter=int(m.group("counter")),
        boot_id=m.group("boot").decode("ascii"),
        kernel=fields.get("kernel"),
        slot=int(slot) if slot and slot.isdigit() else None,
    )


def read_record(image: str | os.PathLike[str], sector: int) -> Marker | None:
    """The record at ``sector`` of ``image``'s data partition (0: the marker), or None."""
    part = data_partition(image)
    if not 0 <= sector < part.sectors:
        raise HotspareError(f"{image}: sector {sector} is outside the data partition ({part.sectors} sectors)")
    with open(image, "rb") as f:
        f.seek(part.offset + sector * SECTOR)
        return parse_record(f.read(SECTOR))


def read_marker(image: str | os.PathLike[str]) -> Marker | None:
    """The guest's marker record in ``image`` (a raw disk), or None when it never ran."""
    return read_record(image, 0)


def parse_markers(console: str) -> list[Marker]:
    """Every marker line in a serial console log, in order."""
    return [Marker(int(m.group("counter")), m.group("boot")) for m in MARKER_RE.finditer(console)]


# ------------------------------------------------------------------------------- KVM or TCG

_accel_cache: dict[str, str] = {}

# A boot sector that runs what broke KVM here ("KVM internal error. Suberror: 1" on an IRET
# in 32-bit protected mode, in syslinux): enter protected mode, IRET to the next instruction,
# then write 0x21 to the isa-debug-exit port, so QEMU exits with status (0x21 << 1) | 1 = 67.
_PROBE_CODE = bytes.fromhex(
    "fa31c08ed80f0116587c0f20c06683c8010f22c066ea1c7c00000800"  # cli; lgdt; cr0.PE=1; ljmp 8:pm
    "66b810008ed88ec08ed0bc007c00009c6a0868347c0000cf"  # pm: data segs; esp; pushf; push cs/ip; iretd
    "b021e6f4f4ebfd"  # mov al,0x21; out 0xf4,al; hlt; jmp $-1
)
_PROBE_GDT = bytes(8) + bytes.fromhex("ffff0000009acf00" "ffff00000092cf00")
_PROBE_EXIT = (0x21 << 1) | 1


def _probe_disk() -> bytes:
    sector = _PROBE_CODE.ljust(64, b"\0") + _PROBE_GDT + struct.pack("<HI", len(_PROBE_GDT) - 1, 0x7C40)
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _probe_kvm(qemu: str, timeout: float) -> tuple[bool, str]:
    """Boot the probe sector with KVM; (works, why not)."""
    with tempfile.TemporaryDirectory(prefix="hotspare-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        with open(disk, "wb") as f:
            f.write(_probe_disk())
            f.truncate(1 << 20)  # SeaBIOS will not boot a one-sector disk
        cmd = [qemu, "-accel", "kvm", "-machine", "pc", "-m", "16", "-nodefaults", "-display", "none",
               "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
               "-drive", f"file={disk},format=raw,if=virtio,readonly=on"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        err = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, f"no answer in {timeout:.0f} s"
                ready, _, _ = select.select([proc.stderr], [], [], min(left, 0.2))
                if ready:
                    chunk = os.read(proc.stderr.fileno(), 4096)
                    err += chunk
                    if b"KVM internal error" in err:
                        return False, "KVM internal error"
                    if not chunk:  # stderr closed: QEMU is exiting
                        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                if proc.poll() is not None:
                    if proc.returncode == _PROBE_EXIT:
                        return True, ""
                    last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
                    return False, f"exit {proc.returncode} {last[0]}".strip()
        except subprocess.TimeoutExpired:
            return False, f"no answer in {timeout:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hotspare" / "qemu-accel.json"


def _host_key(qemu: str) -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    st = os.stat(qemu)
    return f"{boot}:{qemu}:{st.st_size}:{st.st_mtime_ns}"


def qemu_accel(qemu: str = "qemu-system-x86_64", *, refresh: bool = False, timeout: float = 20.0) -> str:
    """``"kvm"`` when QEMU can really run guests with KVM here, else ``"tcg"``.

    KVM counts only if /dev/kvm opens read-write and a probe guest (a boot sector that enters
    protected mode and IRETs, as boot loaders do) runs to its end under ``-accel kvm``: on
    some hosts /dev/kvm exists but guests stop with "KVM internal error". The answer is cached
    in the process and, per host boot and QEMU binary, in ~/.cache/hotspare/qemu-accel.json;
    ``refresh`` probes again. ``HOTSPARE_QEMU_ACCEL=kvm|tcg`` overrides it all.
    """
    forced = os.environ.get("HOTSPARE_QEMU_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise HotspareError(f"HOTSPARE_QEMU_ACCEL={forced!r}: use kvm or tcg")
        return forced
    exe = shutil.which(qemu)
    if exe is None or not _kvm_usable():
        return "tcg"
    key = _host_key(exe)
    if not refresh and key in _accel_cache:
        return _accel_cache[key]
    cache = _cache_file()
    saved: dict[str, str] = {}
    try:
        saved = json.loads(cache.read_text())
        if not isinstance(saved, dict):
            saved = {}
    except (OSError, ValueError):
        pass
    accel = None if refresh else saved.get(key)
    if accel not in ("kvm", "tcg"):
        ok, why = _probe_kvm(exe, timeout)
        accel = "kvm" if ok else "tcg"
        log.info("qemu accelerator: %s%s", accel, f" (KVM probe failed: {why})" if why else "")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({key: accel}))  # only the current host boot matters
            os.replace(tmp, cache)
        except OSError:
            pass
    _accel_cache[key] = accel
    return accel
