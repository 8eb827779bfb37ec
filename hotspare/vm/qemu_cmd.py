"""What the QEMU hosts share: QEMU's command line, the overlay chain a launch starts on,
and the screendump. Used by :mod:`hotspare.vm.local` (QEMU as a process here) and
:mod:`hotspare.vm.docker` (QEMU in a container that sees the same paths).

QEMU runs in the VM's work directory, so the serial log and the QMP socket are given by
relative names: a unix socket path longer than 107 bytes could not be bound.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable
import shutil
import time
from pathlib import Path

from hotspare.errors import HotspareError
from hotspare.vm import chain
from hotspare.vm.host import VmHandle, VmHost, VmSpec
from hotspare.vm.png import ppm_to_png
from hotspare.vm.qmp import QmpClient, QmpError

QMP_SOCKET = "qmp.sock"
DISK_DEVICE = "disk0"


def serial_name(vm_id: str) -> str:
    return f"serial-{vm_id}.log"


def qemu_args(spec: VmSpec, vm_id: str, accel: str, layers: list[str]) -> list[str]:
    """QEMU's options (without the executable) to boot ``spec``'s disk through ``layers``
    from its own boot loader, headless, without network, with the serial console in
    ``serial-<vm_id>.log`` and QMP on ``qmp.sock`` in the work directory."""
    return ["-name", f"guest={vm_id}", "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else []),
            "-machine", "pc", "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
            "-nodefaults", "-display", "none", "-device", "VGA", "-nic", "none",
            *chain.blockdev_args(str(spec.boot_disk), spec.format, layers),
            "-device", f"virtio-blk-pci,drive={chain.node_name(layers[-1])},id={DISK_DEVICE},bootindex=0",
            "-serial", f"file:{serial_name(vm_id)}",
            "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]


def prepare_chain(spec: VmSpec) -> list[str]:
    """The overlays the VM runs on, bottom to top. A VM that ran here before and died
    left the guest's disk in its chain: continue on it (as a machine reboots onto its
    own disk), under a fresh active overlay so that the dead VM's last writes stay in
    a frozen layer the capture ships. Otherwise start base.qcow2 and ov-000001."""
    ovdir = chain.overlay_dir(spec.workdir)
    size = chain.image_size(spec.boot_disk, spec.format)
    if ovdir.exists():
        layers = chain.chain_from_files(spec.workdir, str(spec.boot_disk))
        if not layers:
            raise HotspareError(f"{ovdir} holds no overlay chain over {spec.boot_disk} (another boot "
                                "disk, or a damaged chain): remove it to start the VM from the boot disk alone")
        index = max(chain.overlay_index(p) or 0 for p in ovdir.glob("ov-*.qcow2")) + 1
        top = ovdir / chain.overlay_name(index)
        chain.create_overlay(top, layers[-1], "qcow2", size)
        return [*layers, str(top)]
    # Built aside and renamed into place, so a crash never leaves half a chain that the
    # next launch would mistake for a VM's disk. Backing names are the final paths.
    fresh = ovdir.with_name(f".{chain.OVERLAY_DIR}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    base, first = ovdir / chain.BASE, ovdir / chain.overlay_name(1)
    chain.create_overlay(fresh / base.name, spec.boot_disk, spec.format, size)
    chain.create_overlay(fresh / first.name, base, "qcow2", size)
    os.rename(fresh, ovdir)
    return [str(base), str(first)]


def screendump(q: QmpClient, file: Path) -> None:
    """Have QEMU write its screen as a PNG at ``file`` (a path QEMU and this process both see)."""
    try:
        q.execute("screendump", filename=str(file), format="png")
    except QmpError as err:
        if err.error_class is None:
            raise
        # A QEMU before 7.1 or built without libpng: take PPM and encode it here.
        ppm = file.with_suffix(".ppm")
        q.execute("screendump", filename=str(ppm))
        try:
            ppm_to_png(ppm, file)
        finally:
            ppm.unlink(missing_ok=True)


class QemuHost(VmHost):
    """What every host running QEMU shares: QMP on a unix socket in the VM's work directory
    and the serial console in a file there."""

    qmp_timeout: float = 10.0
    start_timeout: float = 30.0

    def _wait_ready(self, handle: VmHandle, died: Callable[[], str | None], killed: str) -> None:
        """Wait until the new VM's QMP answers. ``died`` says why QEMU exited at start (it
        cleans up), or None while it runs; past ``start_timeout`` the VM is killed."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            why = died()
            if why is not None:
                raise HotspareError(f"VM {handle.vm_id}: {why}")
            try:
                with self.qmp(handle) as q:
                    q.execute("query-status")
                return
            except QmpError:
                if time.monotonic() > deadline:
                    self.kill(handle)
                    raise HotspareError(f"VM {handle.vm_id}: QEMU's QMP socket did not answer in "
                                        f"{self.start_timeout:.0f} s; {killed}") from None
                time.sleep(0.05)

    def qmp(self, handle: VmHandle) -> QmpClient:
        """A QMP client for the VM (not yet connected: use it in a ``with`` block)."""
        if not handle.qmp_socket:
            raise HotspareError(f"VM {handle.vm_id}: its handle has no QMP socket")
        return QmpClient(handle.qmp_socket, timeout=self.qmp_timeout)

    def status(self, handle: VmHandle) -> str:
        if not self.is_alive(handle):
            return "gone"
        try:
            with self.qmp(handle) as q:
                return str(q.execute("query-status")["status"])
        except QmpError:
            if not self.is_alive(handle):
                return "gone"
            raise

    def serial_log(self, handle: VmHandle) -> str:
        try:
            return Path(handle.serial_log).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None:
        """Pause the vCPUs (from then on the disk does not change), run ``before_quit``,
        quit through QMP; a VM that does not go in time is terminated."""
        if not self.is_alive(handle):
            self._cleanup(handle)  # a VM that died: nothing to stop
            return
        try:
            with self.qmp(handle) as q:
                q.execute("stop")
        except QmpError:
            if not self.is_alive(handle):
                self._cleanup(handle)
                return
            if before_quit is not None:
                raise  # cannot pause it, so cannot capture its last writes: leave it running
            self._terminate(handle, timeout)
            self._cleanup(handle)
            return
        if before_quit is not None:
            before_quit()
        try:
            with self.qmp(handle) as q:
                q.execute("quit")
        except QmpError as err:
            if err.error_class is not None:
                raise
            # The connection dropped: QEMU was already exiting, which is what quit asks for.
        if not self._wait_gone(handle, timeout):
            self._terminate(handle, 10.0)
        self._cleanup(handle)

    def _cleanup(self, handle: VmHandle) -> None:
        """What remains of a stopped VM on the host (a container, say); nothing by default."""

    @abstractmethod
    def _terminate(self, handle: VmHandle, timeout: float) -> None: ...

    def _wait_gone(self, handle: VmHandle, timeout: float) -> bool:
        """Wait until the VM is gone; False when it still lives after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.is_alive(handle):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
