"""LocalQemuHost: VMs as qemu-system-x86_64 processes on this machine.

QEMU runs in its own session (``start_new_session``), so it outlives the Python process
that launched it and ignores that process's terminal signals; it writes its pid file, and
the handle records the pid. A pid alone can be reused after the VM dies, so liveness also
checks ``/proc/<pid>/cmdline`` for the VM's unique ``-name guest=<vm_id>``.

The VM boots from its first disk's own boot loader (SeaBIOS, never ``-kernel``); every disk
is a qcow2 overlay over its backing (a local image or an NBD export), which the VM never
writes (:func:`hotspare.vm.qemu.cmd.prepare_disks`); :mod:`hotspare.vm.qemu.capture` ships the
guest's writes, :mod:`hotspare.vm.qemu.stream` pulls the backings local.
Files in the work directory: ``handle.json``, ``qmp.sock``, ``qemu.pid``,
``serial-<vm_id>.log``, ``qemu-<vm_id>.log`` (QEMU's own messages), ``disks/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from hotspare.demodisk import qemu_accel
from hotspare.errors import HotspareError
from hotspare.localfile import file_lock
from hotspare.vm.host import VmHandle, VmSpec, load_handle, save_handle
from hotspare.vm.qemu.cmd import (DISK_DEVICE, QMP_SOCKET, QemuHost, check_same_disks, prepare_disks, qemu_args,
                                  screendump, serial_name)

QEMU = "qemu-system-x86_64"
PID_FILE = "qemu.pid"

# QEMU processes this Python process started, kept so that their exit is reaped (a dead
# child that nobody waits for stays a zombie, and would look alive to kill(pid, 0)).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _live_args(pid: int) -> list[bytes] | None:
    """The command line of process ``pid``, or None when it is gone or a zombie (dead, not
    yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if stat.rsplit(")", 1)[-1].split()[:1] in (["Z"], ["X"]) else args


def _reap_unrecorded(workdir: Path, machine: str) -> None:
    """Stop a QEMU that a launch started but never recorded (it died between the start and
    the handle's save): it still holds the work directory's pid file, and its guest never
    ran, because a guest starts only after its handle is saved."""
    try:
        pid = int((workdir / PID_FILE).read_text())
    except (OSError, ValueError):
        return
    args = _live_args(pid)
    if args is None or not any(a.startswith(f"guest={machine}-".encode()) for a in args):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while _live_args(pid) is not None and time.monotonic() < deadline:  # a zombie holds no lock
        time.sleep(0.05)


class LocalQemuHost(QemuHost):
    kind = "local-qemu"

    def __init__(self, qemu: str = QEMU, *, start_timeout: float = 30.0, qmp_timeout: float = 10.0) -> None:
        self.qemu = qemu
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout

    # -- launch --------------------------------------------------------------------------
    def launch(self, spec: VmSpec) -> VmHandle:
        workdir = spec.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with file_lock(workdir / "launch.lock"):
            previous = load_handle(workdir)
            if previous is not None and self.is_alive(previous):
                check_same_disks(previous, spec)
                self._start_guest(previous)  # a launch that died between start and cont
                return previous  # adopt it: a re-run must not boot a second copy of the machine
            exe = shutil.which(self.qemu)
            if exe is None:
                raise HotspareError(f"cannot launch VM of {spec.machine}: {self.qemu} is missing "
                                    "(Debian package qemu-system-x86)")
            _reap_unrecorded(workdir, spec.machine)
            disks = prepare_disks(spec)
            accel = qemu_accel(self.qemu)  # KVM only where a probe guest really runs with it
            vm_id = f"{spec.machine}-{uuid.uuid4().hex[:8]}"
            serial = workdir / serial_name(vm_id)
            (workdir / QMP_SOCKET).unlink(missing_ok=True)  # left by a VM that was killed
            # QEMU runs in the work directory: the pid file name is relative, as are the
            # serial log's and QMP socket's in qemu_args.
            cmd = [exe, *qemu_args(spec, vm_id, accel, disks), "-pidfile", PID_FILE]
            qemu_log = workdir / f"qemu-{vm_id}.log"
            with open(qemu_log, "ab") as out:
                proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            _children[proc.pid] = proc
            handle = VmHandle(host=self.kind, vm_id=vm_id, machine=spec.machine, workdir=str(workdir),
                              boot_disk=str(spec.boot_disk), format=spec.format, accel=accel, pid=proc.pid,
                              qmp_socket=str(workdir / QMP_SOCKET), serial_log=str(serial),
                              disks=disks, disk_device=DISK_DEVICE)
            self._wait_ready(handle, lambda: self._start_failure(proc, qemu_log, cmd), "QEMU killed")
            save_handle(handle)
            self._start_guest(handle)
            return handle

    @staticmethod
    def _start_failure(proc: subprocess.Popen[bytes], qemu_log: Path, cmd: list[str]) -> str | None:
        if proc.poll() is None:
            return None
        _children.pop(proc.pid, None)
        tail = qemu_log.read_text(errors="replace").strip()[-1500:]
        return f"QEMU exited with {proc.returncode} at start: {tail}\ncommand: {' '.join(cmd)}"

    # -- finding and watching ------------------------------------------------------------
    def find_running(self, workdir: str | os.PathLike[str]) -> VmHandle | None:
        handle = load_handle(workdir)
        if handle is None or handle.host != self.kind or not self.is_alive(handle):
            return None
        return handle

    def is_alive(self, handle: VmHandle) -> bool:
        pid = handle.pid
        if pid is None:
            return False
        proc = _children.get(pid)
        if proc is not None and proc.poll() is not None:
            del _children[pid]
            return False
        args = _live_args(pid)
        return args is not None and f"guest={handle.vm_id}".encode() in args

    def screendump(self, handle: VmHandle, path: str | os.PathLike[str]) -> Path:
        target = Path(os.path.abspath(path))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with self.qmp(handle) as q:
            screendump(q, tmp)
        os.replace(tmp, target)
        return target

    # -- ending --------------------------------------------------------------------------
    def kill(self, handle: VmHandle) -> None:
        if self.is_alive(handle):
            self._signal(handle, signal.SIGKILL)
            if not self._wait_gone(handle, 10.0):
                raise HotspareError(f"VM {handle.vm_id} (pid {handle.pid}) survived SIGKILL for 10 s")

    def _terminate(self, handle: VmHandle, timeout: float) -> None:
        # SIGTERM makes QEMU flush its images and exit; SIGKILL if it does not.
        self._signal(handle, signal.SIGTERM)
        if not self._wait_gone(handle, timeout):
            self.kill(handle)

    def _signal(self, handle: VmHandle, sig: signal.Signals) -> None:
        assert handle.pid is not None
        try:
            os.kill(handle.pid, sig)
        except ProcessLookupError:
            pass

