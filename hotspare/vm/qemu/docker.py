"""DockerQemuHost: VMs as qemu-system-x86_64 inside Docker containers, through the docker SDK.

The container runs hotspare's QEMU runner image (``deployments/docker/``: a Dockerfile for
users with a registry, ``build-offline.sh`` for hosts without one), so the host needs
Docker but not QEMU's system emulator; it still needs ``qemu-img`` for the overlays.

Same paths inside and out: the VM's work directory, each local backing's directory
(read-only) and each NBD backing's socket directory are bind-mounted at their host paths, so
the QMP socket, serial log, overlays and the capture's NBD socket the container's QEMU uses
are the files this process sees. QMP calls, the overlays, the streams
(:mod:`hotspare.vm.qemu.stream`) and the capture (:mod:`hotspare.vm.qemu.capture`) work as for
:class:`~hotspare.vm.qemu.local.LocalQemuHost`; the command line and the chain a launch
starts on come from :mod:`hotspare.vm.qemu.cmd`, shared with it.

The container: no network (QEMU has ``-nic none`` too); restart policy "no", since what
happens to a VM that died is the flow's decision; QEMU as its first process, under the
caller's uid:gid so the files it creates belong to the caller; /dev/kvm only where
:func:`hotspare.demodisk.qemu_accel` says KVM really works. Labels name the machine, the VM
id and the work directory, and carry the handle itself: a launch that crashed between
starting the container and writing ``handle.json`` is adopted by the next launch instead of
booting the machine a second time.

Files in the work directory: ``handle.json``, ``qmp.sock``, ``serial-<vm_id>.log``,
``qemu-<vm_id>.log`` (QEMU's own messages, kept after the container is removed),
``disks/``.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container

from hotspare.demodisk import qemu_accel
from hotspare.errors import HotspareError
from hotspare.localfile import file_lock
from hotspare.vm.host import VmHandle, VmSpec, load_handle, nbd_socket_of, save_handle
from hotspare.vm.qemu.cmd import (DISK_DEVICE, QMP_SOCKET, QemuHost, check_same_disks, prepare_disks, qemu_args,
                                  screendump, serial_name)

DEFAULT_IMAGE = "hotspare/qemu-runner:bookworm"
QEMU = "qemu-system-x86_64"
LABEL_MACHINE = "org.hotspare.machine"
LABEL_VM = "org.hotspare.vm-id"
LABEL_WORKDIR = "org.hotspare.workdir"
LABEL_HANDLE = "org.hotspare.handle"
_ALIVE = ("running", "paused")  # a paused container still holds the VM and its disk chain


@contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Docker SDK and transport faults as one HotspareError: ``what``, then the daemon's reason."""
    try:
        yield
    except docker.errors.APIError as err:
        raise HotspareError(f"{what}: {err.explanation or err}") from err
    except docker.errors.DockerException as err:
        raise HotspareError(f"{what}: {err}") from err
    except requests.exceptions.RequestException as err:
        raise HotspareError(f"{what}: the docker daemon did not answer ({err})") from err


class DockerQemuHost(QemuHost):
    kind = "docker-qemu"

    def __init__(self, base_url: str | None = None, image: str = DEFAULT_IMAGE, *,
                 start_timeout: float = 30.0, qmp_timeout: float = 10.0, api_timeout: float = 60.0) -> None:
        """``base_url``: the docker daemon (``unix:///path/docker.sock``, ``tcp://...``);
        default DOCKER_HOST, else Docker's default socket."""
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or None
        self.image = image
        self.start_timeout = start_timeout
        self.qmp_timeout = qmp_timeout
        self.api_timeout = api_timeout
        self._client: docker.DockerClient | None = None

    @property
    def daemon(self) -> str:
        return self.base_url or "the default docker socket"

    @property
    def client(self) -> docker.DockerClient:
        # Connected on first use: making a host object never needs the daemon.
        if self._client is None:
            with docker_errors(f"docker daemon at {self.daemon}"):
                if self.base_url:
                    self._client = docker.DockerClient(base_url=self.base_url, timeout=int(self.api_timeout))
                else:
                    self._client = docker.from_env(timeout=int(self.api_timeout))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- launch --------------------------------------------------------------------------
    def launch(self, spec: VmSpec) -> VmHandle:
        workdir = spec.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with file_lock(workdir / "launch.lock"):
            running = self._running_in(workdir)
            if running is not None:
                check_same_disks(running, spec)
                self._start_guest(running)  # a launch that died between start and cont
                save_handle(running)  # a no-op rewrite, or the handle a crashed launch did not write
                return running  # adopt it: a re-run must not boot a second copy of the machine
            disks = prepare_disks(spec)
            self._check_image()
            self._remove_dead(workdir)
            accel = qemu_accel()  # KVM only where a probe guest really runs with it
            vm_id = f"{spec.machine}-{uuid.uuid4().hex[:8]}"
            (workdir / QMP_SOCKET).unlink(missing_ok=True)  # left by a VM that was killed
            handle = VmHandle(host=self.kind, vm_id=vm_id, machine=spec.machine, workdir=str(workdir),
                              boot_disk=str(spec.boot_disk), format=spec.format, accel=accel,
                              qmp_socket=str(workdir / QMP_SOCKET), serial_log=str(workdir / serial_name(vm_id)),
                              disks=disks, disk_device=DISK_DEVICE)
            container = self._run(spec, handle)
            handle = handle.model_copy(update={"container_id": container.id})
            self._wait_ready(handle, lambda: self._start_failure(handle),
                             f"container {handle.container_id} removed")
            save_handle(handle)
            self._start_guest(handle)
            return handle

    def _check_image(self) -> None:
        with docker_errors(f"docker image {self.image} at {self.daemon}"):
            try:
                self.client.images.get(self.image)
            except docker.errors.ImageNotFound:
                # Checked here because containers.run would try to pull it from a registry.
                raise HotspareError(
                    f"docker image {self.image} not found at {self.daemon}: build it with "
                    f"deployments/docker/build-offline.sh {self.image} {self.base_url or ''}".rstrip()
                    + " (or docker build -t IMAGE deployments/docker where a registry is reachable)") from None

    def _run(self, spec: VmSpec, handle: VmHandle) -> Container:
        workdir = str(spec.workdir)
        volumes: dict[str, dict[str, str]] = {workdir: {"bind": workdir, "mode": "rw"}}
        # Each local backing's directory read-only, unless the work directory holds it; also
        # the directory a symlinked image points into, which QEMU resolves in the container.
        # An NBD backing's socket directory read-write: QEMU connects to the socket there.
        for d in handle.disks:
            sock = nbd_socket_of(d.backing)
            paths = [sock] if sock else [d.backing, os.path.realpath(d.backing)]
            for path in paths:
                parent = os.path.dirname(path)
                if parent != workdir and not parent.startswith(workdir + os.sep):
                    volumes.setdefault(parent, {"bind": parent, "mode": "rw" if sock else "ro"})
        log = f"qemu-{handle.vm_id}.log"
        # Through sh only for the redirection: QEMU's messages go to a file in the work
        # directory, which outlives the container; exec keeps QEMU the container's process.
        command = f"exec {QEMU} {shlex.join(qemu_args(spec, handle.vm_id, handle.accel, handle.disks))} >>{log} 2>&1"
        extra: dict[str, Any] = {}
        if handle.accel == "kvm":
            extra["devices"] = ["/dev/kvm:/dev/kvm:rwm"]
            if os.getuid() != 0:
                extra["group_add"] = [str(os.stat("/dev/kvm").st_gid)]
        labels = {LABEL_MACHINE: spec.machine, LABEL_VM: handle.vm_id, LABEL_WORKDIR: workdir,
                  LABEL_HANDLE: handle.model_dump_json()}
        name = f"hotspare-{handle.vm_id}"
        with docker_errors(f"VM {handle.vm_id}: container {name} from image {self.image} at {self.daemon}"):
            return self.client.containers.run(
                self.image, ["/bin/sh", "-c", command], detach=True, name=name, labels=labels,
                network_mode="none", restart_policy={"Name": "no"}, working_dir=workdir,
                user=f"{os.getuid()}:{os.getgid()}", volumes=volumes, stdin_open=False, tty=False, **extra)

    def _start_failure(self, handle: VmHandle) -> str | None:
        if self.is_alive(handle):
            return None
        log = Path(handle.workdir) / f"qemu-{handle.vm_id}.log"
        tail = log.read_text(errors="replace").strip()[-1500:] if log.exists() else ""
        self._remove(handle)
        return (f"QEMU in container {handle.container_id} of image {self.image} exited at start: "
                f"{tail or '(no output)'}")

    # -- finding and watching ------------------------------------------------------------
    def _containers_of(self, workdir: str | os.PathLike[str], *, everything: bool) -> list[Container]:
        path = os.path.abspath(workdir)
        with docker_errors(f"docker containers of {path} at {self.daemon}"):
            return self.client.containers.list(all=everything, filters={"label": f"{LABEL_WORKDIR}={path}"})

    def _running_in(self, workdir: str | os.PathLike[str]) -> VmHandle | None:
        """The live VM of ``workdir``, found by label: the one handle.json names, or one
        whose launch crashed before it wrote handle.json."""
        live = [c for c in self._containers_of(workdir, everything=False) if c.status in _ALIVE]
        if len(live) > 1:
            raise HotspareError(f"{workdir}: {len(live)} VM containers run from it "
                                f"({', '.join(c.name for c in live)}); kill all but one")
        if not live:
            return None
        saved = load_handle(workdir)
        if saved is not None and saved.container_id == live[0].id:
            return saved
        try:
            return VmHandle.model_validate_json(live[0].labels[LABEL_HANDLE]).model_copy(
                update={"container_id": live[0].id})
        except (KeyError, ValueError) as err:
            raise HotspareError(f"container {live[0].name} runs a VM from {workdir} but its "
                                f"{LABEL_HANDLE} label is unreadable ({err}); kill it") from err

    def _remove_dead(self, workdir: Path) -> None:
        """Remove the exited containers of earlier VMs here: their files (chain, logs) stay."""
        for c in self._containers_of(workdir, everything=True):
            if c.status not in _ALIVE:
                with docker_errors(f"removing dead container {c.name}"):
                    try:
                        c.remove(force=True)
                    except docker.errors.NotFound:
                        pass

    def find_running(self, workdir: str | os.PathLike[str]) -> VmHandle | None:
        return self._running_in(workdir)

    def _container(self, handle: VmHandle) -> Container | None:
        if not handle.container_id:
            return None
        with docker_errors(f"VM {handle.vm_id}: container {handle.container_id[:12]} at {self.daemon}"):
            try:
                c = self.client.containers.get(handle.container_id)
            except docker.errors.NotFound:
                return None
        return c if c.labels.get(LABEL_VM) == handle.vm_id else None

    def is_alive(self, handle: VmHandle) -> bool:
        c = self._container(handle)
        return c is not None and c.status in _ALIVE

    def screendump(self, handle: VmHandle, path: str | os.PathLike[str]) -> Path:
        target = Path(os.path.abspath(path))
        # QEMU writes in the container: into the work directory, which both sides see.
        shot = Path(handle.workdir) / f".screendump-{uuid.uuid4().hex[:8]}.png"
        try:
            with self.qmp(handle) as q:
                screendump(q, shot)
            try:
                os.replace(shot, target)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.copyfile(shot, staged)
                os.replace(staged, target)
        finally:
            shot.unlink(missing_ok=True)
        return target

    # -- ending --------------------------------------------------------------------------
    def _cleanup(self, handle: VmHandle) -> None:
        self._remove(handle)  # an exited container keeps nothing worth keeping

    def kill(self, handle: VmHandle) -> None:
        self._remove(handle)  # a forced removal SIGKILLs the container's process first

    def _terminate(self, handle: VmHandle, timeout: float) -> None:
        # SIGTERM makes QEMU flush its images and exit; Docker sends SIGKILL after timeout.
        c = self._container(handle)
        if c is not None:
            with docker_errors(f"VM {handle.vm_id}: stopping container {c.name}"):
                try:
                    c.stop(timeout=max(1, int(timeout)))
                except docker.errors.NotFound:
                    pass
        self._remove(handle)

    def _remove(self, handle: VmHandle) -> None:
        c = self._container(handle)
        if c is None:
            return
        with docker_errors(f"VM {handle.vm_id}: removing container {c.name}"):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass

