"""Fixtures around the demo physical machine (a bootable disk image, see hotspare.demodisk).

Import them from conftest.py: ``from tests.fixtures_demo import *  # noqa: F403`` (or name
them: demo_disk_image, demo_disk, qemu_system).

- ``demo_disk_image``: one demo disk built per test session, pristine. Do not boot it or
  write to it: copy it (or use ``demo_disk``).
- ``demo_disk``: a private, writable copy of it for one test.
- ``qemu_system``: the qemu-system-x86_64 path.
- ``DemoVM`` / ``boot_demo_disk``: boot a disk image in QEMU (own boot loader, no -kernel)
  and wait for the guest's marker lines on its serial console.

A missing tool skips these tests, or fails them under CI=true, naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from hotspare.demodisk import (
    BOOT_LINE_RE,
    build_demo_disk,
    can_install_build_tools,
    missing_build_tools,
    Marker,
    parse_markers,
    qemu_accel,
)

__all__ = ["DemoVM", "boot_demo_disk", "demo_disk", "demo_disk_image", "qemu_system", "require"]

QEMU = "qemu-system-x86_64"


def require(what: str) -> None:
    """Skip the test because ``what`` is missing; under CI=true, fail instead."""
    msg = f"missing: {what}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def qemu_system() -> str:
    path = shutil.which(QEMU)
    if path is None:
        require(f"{QEMU} (Debian package qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def demo_disk_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo disk (64 MiB raw), built once per session. Read-only by convention."""
    missing = missing_build_tools()
    if missing and not can_install_build_tools():
        require(f"demo disk build tools (Debian packages {', '.join(missing)}) and no apt-get to install them")
    path = tmp_path_factory.mktemp("demo-disk") / "demo.img"
    build_demo_disk(path)
    return path


@pytest.fixture
def demo_disk(demo_disk_image: Path, tmp_path: Path) -> Path:
    """A private copy of the demo disk that the test may boot and change."""
    copy = tmp_path / "demo.img"
    shutil.copyfile(demo_disk_image, copy)
    return copy


class DemoVM:
    """One QEMU process booting a disk image from its own boot loader."""

    def __init__(self, image: Path, log: Path, *, qemu: str = QEMU, accel: str | None = None,
                 interface: str = "virtio", memory_mib: int = 256, others: Sequence[Path] = (),
                 fmt: str = "raw") -> None:
        """``others``: more disks, attached (virtio) before ``image``, which still boots.
        ``fmt``: QEMU's format of ``image`` (``vpc`` for a VHD); ``others`` are raw."""
        self.image = Path(image)
        self.log = Path(log)
        self.accel = accel or qemu_accel(qemu)
        self.stderr_path = self.log.with_suffix(".stderr")
        if others:
            drives = []
            for i, other in enumerate(others):
                drives += ["-drive", f"file={other},if=none,id=other{i},format=raw",
                           "-device", f"virtio-blk-pci,drive=other{i}"]
            drives += ["-drive", f"file={self.image},if=none,id=boot,format={fmt}",
                       "-device", f"{'virtio-blk-pci' if interface == 'virtio' else 'ide-hd'},drive=boot,bootindex=0"]
        else:
            drives = ["-drive", f"file={self.image},if={interface},format={fmt}"]
        self.cmd = [
            qemu, "-accel", self.accel, "-m", str(memory_mib), "-nographic", "-nodefaults", "-no-reboot",
            *drives, "-serial", f"file:{self.log}",
        ]
        self.log.unlink(missing_ok=True)
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=subprocess.STDOUT)

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kernel(self) -> str | None:
        m = BOOT_LINE_RE.search(self.console())
        return m.group("kernel") if m else None

    def markers(self) -> list[Marker]:
        return parse_markers(self.console())

    def wait_markers(self, count: int, timeout: float = 60) -> list[Marker]:
        """Wait until the console shows ``count`` marker lines; all of them so far."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.markers()
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited with {self.proc.returncode} after {len(found)} marker line(s)\n"
                            f"{self.diagnostics()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"{len(found)} of {count} marker lines after {timeout:.0f} s "
                            f"(accel {self.accel})\n{self.diagnostics()}", pytrace=False)
            time.sleep(0.1)

    def diagnostics(self) -> str:
        self._stderr.flush()
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return (f"command: {' '.join(self.cmd)}\n--- serial console (tail) ---\n{self.console()[-3000:]}\n"
                f"--- qemu output (tail) ---\n{err[-2000:]}")

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL); the guest's written sectors are in the image."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@contextmanager
def boot_demo_disk(image: Path, log: Path, **kwargs: object) -> Iterator[DemoVM]:
    """Boot ``image`` in QEMU for the duration of the block; QEMU is stopped on exit."""
    vm = DemoVM(image, log, **kwargs)  # type: ignore[arg-type]
    try:
        yield vm
    finally:
        vm.stop()
