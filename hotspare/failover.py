"""The engine side of failover: the checks and the pieces the failover flow strings together.

Split brain is worse than downtime: a machine whose heartbeat is fresh is never failed
over, and the check is made again after the approval, just before the fence.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hotspare.catalog import RecoveryPoint, load_catalog
from hotspare.consolidate.export import find_point
from hotspare.errors import HotspareError, MachineLive, UsageError
from hotspare.heartbeat import load_heartbeat
from hotspare.machine import DiskSpec, MachineConfig
from hotspare.replica.serve import read_pid, server_alive, start_detached_server, stop_server
from hotspare.state import MachineState, commit_state, load_state
from hotspare.store.base import Store
from hotspare.vm.qemu.capture import VmCapture
from hotspare.vm.host import VmDisk, VmHandle, VmHost

RESOURCE_PREFIX = "hotspare.machine."


def machine_name(value: str) -> str:
    """A machine name, also when an automation passes the event's resource id."""
    return value.removeprefix(RESOURCE_PREFIX)


def check_silent(store: Store, cfg: MachineConfig, state: MachineState) -> str:
    """Raise MachineLive if the machine's heartbeat is fresh; else say how silent it is."""
    hb = load_heartbeat(store, cfg.name)
    window = cfg.policy.heartbeat_window
    if hb is None:
        return "no heartbeat ever received"
    if hb.mode == "normal" and hb.epoch == state.epoch and hb.age <= window:
        raise MachineLive(f"machine {cfg.name} sent a heartbeat {hb.age:.0f}s ago (window {window}s): "
                           "refusing to fail over a live machine")
    return f"last heartbeat {hb.age:.0f}s ago (window {window}s)"


def stop_failed_vm(host: VmHost, handle: VmHandle, workdir: Path) -> str:
    """Stop a VM whose failover failed after its launch (it never became the machine's
    truth); its capture, if it started, is stopped first. Returns what was done, for the
    message."""
    stop_capture(workdir)
    try:
        host.stop(handle, timeout=30.0)
    except Exception:  # noqa: BLE001 - QMP gone, a host fault: it must end all the same
        host.kill(handle)
        stop_servers(workdir)
        return "the VM was killed (it did not stop within 30 s)"
    stop_servers(workdir)
    return "the VM was stopped"


def vm_dir(machine: str, root: str | None = None) -> Path:
    base = root or os.environ.get("HOTSPARE_VM_DIR") or "./.hotspare/vms"
    return Path(base).absolute() / machine


def discard_vm_files(workdir: Path) -> None:
    """Remove a stopped VM's disks, handle and sockets; keep its logs and screen image for
    the post-mortem."""
    if not workdir.is_dir():
        return
    stop_servers(workdir)
    for p in workdir.iterdir():
        if p.suffix in (".log", ".png"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# -- the VM's disks -------------------------------------------------------------------------

def serve_dir(workdir: Path) -> Path:
    return workdir / "serve"


def disk_backing(store: Store, machine: str, disk: DiskSpec, workdir: Path, *, host: VmHost | None = None,
                 point: RecoveryPoint | None = None) -> tuple[str, VmDisk]:
    """The recovery point the VM's ``disk`` starts from, served read-only over NBD (nbdkit
    over the point's chunks, :mod:`hotspare.replica.serve`), as the backing of the VM's
    overlay: the VM boots at once, whatever the disk's size, and :mod:`hotspare.vm.qemu.stream`
    pulls the disk local in the background. A re-run adopts a server that still runs.
    A ``host`` that cannot read NBD makes the disk itself (:meth:`VmHost.point_disk`: EC2
    makes the point's EBS snapshot from its chunks). ``point``: that point instead of the
    newest (crash-consistent) one."""
    cat = load_catalog(store, machine, disk.name, disk.size)
    if point is None:
        point = find_point(cat, prefer_consistent=True)
    if host is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        own = host.point_disk(store, cat, disk, point, workdir)
        if own is not None:
            return point.id, own
    if not point.root:
        raise UsageError(f"{machine}/{disk.name} point {point.id} is in the layout before chunks: run "
                         f"`hotspare consolidate {machine}` once to convert the disk")
    d = serve_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    sock, pidfile = d / f"{disk.name}.sock", d / f"{disk.name}.pid"
    pid = read_pid(pidfile)
    if pid is None or not server_alive(pid) or not sock.exists():
        start_detached_server(store.url, point.root, sock, pidfile, log=workdir / f"serve-{disk.name}.log",
                              env=store.process_env())
    return point.id, VmDisk(name=disk.name, backing=f"nbd+unix:///{disk.name}?socket={sock}", size=disk.size,
                            block_size=disk.block_size)


def stop_servers(workdir: Path, handle: VmHandle | None = None) -> list[str]:
    """Stop the point servers of a VM's work directory; with ``handle``, only those whose
    disk the VM no longer reads (streamed local). Returns the disks stopped."""
    stopped = []
    d = serve_dir(workdir)
    needed = handle.servers_needed if handle is not None else []
    for pidfile in sorted(d.glob("*.pid")) if d.is_dir() else []:
        disk = pidfile.stem
        if any(str(d / f"{disk}.sock") in b for b in needed):
            continue
        pid = read_pid(pidfile)
        if pid is not None:
            stop_server(pid)
        pidfile.unlink(missing_ok=True)
        (d / f"{disk}.sock").unlink(missing_ok=True)
        stopped.append(disk)
    return stopped


BUILTIN_HOSTS = ("local", "docker", "ec2")


def vm_host(kind: str) -> VmHost:
    """The VM host a policy names: local, docker, ec2 (configured from the environment)."""
    if kind == "local":
        from hotspare.vm.qemu.local import LocalQemuHost

        return LocalQemuHost()
    if kind == "docker":
        from hotspare.vm.qemu.docker import DockerQemuHost

        return DockerQemuHost()
    if kind == "ec2":
        from hotspare.vm.ec2.config import Ec2HostConfig
        from hotspare.vm.ec2.host import Ec2Host

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise UsageError("VM host ec2 needs a region: set AWS_REGION")
        return Ec2Host(Ec2HostConfig(region=region))
    raise UsageError(f"VM host {kind!r} is unknown: use local, docker or ec2")


# -- the VM a failover launched --------------------------------------------------------

def vm_epoch(state: MachineState) -> int:
    """The epoch a machine's VM writes: the state's once failed over; while a failover has
    fenced the machine and not yet committed (failing-over), the one after the fenced epoch."""
    return state.epoch + (1 if state.state == "failing-over" else 0)


def launched_vm(store: Store, machine: str, workdir: Path,
                host_for: Callable[[str], VmHost]) -> tuple[MachineState, VmHandle, VmHost]:
    """The machine's state, its launched VM's handle and that VM's host (``host_for`` turns
    the policy's host name into one). A failover that died between the launch and recording
    it left the VM's handle in ``workdir`` only: that VM is found there."""
    state = load_state(store, machine)
    host = host_for(state.host or "local") if state.state in ("failed-over", "failing-over") else None
    vm = state.vm
    if vm is None and host is not None and state.state == "failing-over":
        running = host.find_running(workdir)
        vm = running.model_dump(mode="json") if running is not None else None
    if host is None or not vm:
        raise HotspareError(f"{machine} has no launched VM (state {state.state}"
                            f"{', step ' + state.step if state.step else ''})")
    return state, VmHandle.model_validate(vm), host


def ship_last_writes(store: Store, cfg: MachineConfig, handle: VmHandle, host: VmHost, workdir: Path,
                     epoch: int) -> list[str]:
    """Stop the VM with its last writes shipped: its capture process first (it must not cut
    while the VM stops), then one final capture of every disk, which stops the VM. Returns
    the keys of the logs it shipped."""
    stop_capture(workdir)
    return VmCapture(host, handle, store, epoch=epoch, disks=cfg.disks).final_capture()


def stop_vm(store: Store, cfg: MachineConfig, workdir: Path,
            host_for: Callable[[str], VmHost]) -> tuple[MachineState, VmHandle, list[str]]:
    """``hotspare vm stop``: stop the machine's VM with its last writes shipped, without
    failing back, and record that no VM serves. Returns the state it found, the VM's handle
    and the shipped logs' keys."""
    state, handle, host = launched_vm(store, cfg.name, workdir, host_for)
    keys = ship_last_writes(store, cfg, handle, host, workdir, vm_epoch(state))
    commit_state(store, state.next(step="vm-stopped", vm=None))
    return state, handle, keys


# -- the capture process of a VM's writes ------------------------------------------------

def capture_pidfile(workdir: Path) -> Path:
    return workdir / "capture.pid"


def start_capture(store_url: str, workdir: Path, *, epoch: int, interval: float = 2.0,
                  docker_url: str | None = None) -> int:
    """Start the VM's capture (``python -m hotspare.vm.qemu.capture``, the engine's entry point,
    not the CLI) detached from this process (it must outlive the flow), unless one already
    runs for ``workdir``; returns its pid. ``docker_url``: the docker daemon of a
    docker-qemu VM."""
    pid = capture_pid(workdir)
    if pid is not None:
        return pid
    cmd = [sys.executable, "-m", "hotspare.vm.qemu.capture", "--store", store_url, "--workdir", str(workdir),
           "--epoch", str(epoch), "--interval", str(interval)]
    if docker_url:
        cmd += ["--docker-url", docker_url]
    log = open(workdir / "capture.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    capture_pidfile(workdir).write_text(str(proc.pid))
    return proc.pid


def capture_pid(workdir: Path) -> int | None:
    try:
        pid = int(capture_pidfile(workdir).read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":
                return None
    except OSError:
        return None
    return pid


def stop_capture(workdir: Path, timeout: float = 30.0) -> None:
    pid = capture_pid(workdir)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while capture_pid(workdir) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    capture_pidfile(workdir).unlink(missing_ok=True)
