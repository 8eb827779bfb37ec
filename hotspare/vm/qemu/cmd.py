"""What the QEMU hosts share: QEMU's command line, the disks' overlays a launch starts on,
the guest's start and the screendump. Used by :mod:`hotspare.vm.qemu.local` (QEMU as a process here) and
:mod:`hotspare.vm.qemu.docker` (QEMU in a container that sees the same paths).

QEMU runs in the VM's work directory, so the serial log and the QMP socket are given by
relative names: a unix socket path longer than 107 bytes could not be bound.
"""

from __future__ import annotations

import json
import os
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotspare.errors import HotspareError
from hotspare.qemuimg import qemu_img
from hotspare.vm.host import NBD_PREFIX, HandleDisk, VmDisk, VmHandle, VmHost, VmSpec, nbd_export_of, nbd_socket_of
from hotspare.vm.qemu.png import ppm_to_png
from hotspare.qmp import QmpClient, QmpError

QMP_SOCKET = "qmp.sock"
DISK_DEVICE = "disk0"
DISK_DIR = "disks"
BITMAP_FIRST = "hs-1"  # the bitmap that records from the guest's first write (the capture rotates it)
# 64 KiB clusters, the machine's block size. Not extended_l2 (subclusters): with it QEMU 7.2's
# copy-on-read, which block-stream uses, failed an assertion (bdrv_co_do_copy_on_readv,
# skip_bytes < pnum) and aborted the VM, seen here.
OVERLAY_OPTIONS = "cluster_size=64k"


def serial_name(vm_id: str) -> str:
    return f"serial-{vm_id}.log"


def disk_node(name: str) -> str:
    """The overlay's node name; the same as the storage daemon's disk nodes, so the capture
    (:class:`hotspare.capture.qemu.QemuTracker`) drives a VM's disks as it drives a machine's
    (spelled here, not imported: hotspare.capture.daemon imports this package's QMP client)."""
    return f"d-{name}"


NBD_RECONNECT_DELAY = 300  # seconds a guest's read waits for its disk server to come back


def backing_blockdev(disk: VmDisk | HandleDisk) -> dict[str, Any]:
    """The read-only node at the bottom of a disk (``b-<disk>``): a local image, or an NBD
    export on a unix socket. Its own -blockdev, referenced by name, so that QEMU never
    parses the backing name in the qcow2 header; :func:`hotspare.vm.qemu.stream.stream_status`
    deletes it once block-stream has copied it all, which closes the NBD connection."""
    if disk.backing.startswith(NBD_PREFIX):
        # A server that dies is restarted on the same socket (a failover's re-run does it);
        # meanwhile the guest's reads wait instead of failing with EIO.
        proto: dict[str, Any] = {"driver": "nbd", "server": {"type": "unix", "path": nbd_socket_of(disk.backing)},
                                 "export": nbd_export_of(disk.backing), "read-only": True,
                                 "reconnect-delay": NBD_RECONNECT_DELAY}
    else:
        proto = {"driver": "file", "filename": disk.backing, "read-only": True}
    return {"driver": disk.backing_format, "node-name": backing_node(disk.name), "read-only": True, "file": proto}


def backing_node(name: str) -> str:
    return f"b-{name}"


def local_node(name: str) -> str:
    return f"l-{name}"


def disk_blockdevs(disk: HandleDisk) -> list[dict[str, Any]]:
    """The nodes of one disk, bottom first (JSON for -blockdev, so that no path needs QEMU's
    comma escaping)::

        b-<disk> (backing, read-only) <- l-<disk> (<disk>.local.qcow2) <- d-<disk> (<disk>.qcow2)

    The guest writes into ``d-``, which carries the capture's bitmaps and views; block-stream
    fills ``l-`` from the backing. Two layers because QEMU blocks every other job on the node
    a stream runs into (the capture's blockdev-backup included), but not on the nodes above
    it: so the capture cuts ``d-`` while ``l-`` streams."""
    local_backed = overlay_has_backing(disk.local)
    nodes = [backing_blockdev(disk)] if local_backed else []
    # discard=unmap: a guest trim of whole clusters becomes zero clusters in the overlay.
    nodes.append({"driver": "qcow2", "node-name": local_node(disk.name),
                  "file": {"driver": "file", "filename": disk.local},
                  "backing": backing_node(disk.name) if local_backed else None})
    nodes.append({"driver": "qcow2", "node-name": disk.node, "discard": "unmap",
                  "file": {"driver": "file", "filename": disk.overlay}, "backing": local_node(disk.name)})
    return nodes


def qemu_args(spec: VmSpec, vm_id: str, accel: str, disks: list[HandleDisk]) -> list[str]:
    """QEMU's options (without the executable) to boot ``spec``'s first disk from its own
    boot loader, every disk a virtio disk over its overlay, headless, without network, with
    the serial console in ``serial-<vm_id>.log`` and QMP on ``qmp.sock`` in the work
    directory. The vCPUs start stopped (-S): :meth:`QemuHost._start_guest` adds the
    capture's first bitmaps before the guest's first write, then lets it run."""
    args = ["-name", f"guest={vm_id}", "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else []),
            "-machine", "pc", "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
            "-nodefaults", "-display", "none", "-device", "VGA", "-nic", "none", "-S"]
    for i, d in enumerate(disks):
        # JSON, so that no path needs QEMU's comma escaping.
        for nd in disk_blockdevs(d):
            args += ["-blockdev", json.dumps(nd)]
        args += ["-device", f"virtio-blk-pci,drive={d.node},id={d.device}" + (",bootindex=0" if i == 0 else "")]
    return [*args, "-serial", f"file:{serial_name(vm_id)}", "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]


def overlay_has_backing(overlay: str) -> bool:
    """Whether the overlay still reads through to its backing (not once block-stream ended)."""
    info = json.loads(qemu_img("info", "-U", "--output=json", overlay, what=overlay))
    return bool(info.get("backing-filename"))


def prepare_disks(spec: VmSpec) -> list[HandleDisk]:
    """Each disk's two qcow2 layers in ``<workdir>/disks/`` (see :func:`disk_blockdevs`). A
    VM that ran here before left the guest's disks there: continue on them (as a machine
    reboots onto its own disks). New files are made aside and renamed into place, so a
    crash never leaves half a disk that the next launch would mistake for a VM's."""
    ddir = spec.workdir / DISK_DIR
    ddir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, d in enumerate(spec.disks):
        sock = nbd_socket_of(d.backing)
        overlay, local = ddir / f"{d.name}.qcow2", ddir / f"{d.name}.local.qcow2"
        if not overlay.exists():
            if sock is not None and not os.path.exists(sock):
                raise HotspareError(f"cannot launch VM of {spec.machine}: disk {d.name}'s NBD socket {sock} is "
                                    "missing (is its server running?)")
            if sock is None and not os.path.isfile(d.backing):
                raise HotspareError(f"cannot launch VM of {spec.machine}: disk {d.name}'s image {d.backing} not found")
            size = d.size if d.size is not None else image_size(d.backing, d.backing_format)
            _create(local, d.backing, d.backing_format, size)
            _create(overlay, str(local), "qcow2", size)
        else:
            size = image_size(overlay, "qcow2")
            if d.size is not None and d.size != size:
                raise HotspareError(f"{overlay}: the VM's disk {d.name} is {size} bytes, not {d.size}")
        needed = overlay_has_backing(str(local))
        if needed and sock is not None and not os.path.exists(sock):
            raise HotspareError(f"cannot launch VM of {spec.machine}: disk {d.name} is not local yet and its NBD "
                                f"socket {sock} is missing (is its server running?)")
        out.append(HandleDisk(name=d.name, backing=d.backing, backing_format=d.backing_format, size=size,
                              block_size=d.block_size, overlay=str(overlay), local=str(local),
                              node=disk_node(d.name), device=DISK_DEVICE if i == 0 else f"disk{i}",
                              backing_needed=needed))
    return out


def _create(path: Path, backing: str, backing_fmt: str, size: int) -> None:
    """A new, empty qcow2 over ``backing``, without opening it (-u: a running QEMU may hold
    its lock, and an NBD server need not answer yet)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-o", OVERLAY_OPTIONS, "-b", backing, "-F", backing_fmt,
             str(tmp), str(size), what=str(path))
    os.rename(tmp, path)


def check_same_disks(running: VmHandle, spec: VmSpec) -> None:
    """A VM found running in ``spec``'s work directory must be ``spec``'s, disk for disk."""
    # Names only: a re-run may name another server socket for the same disk.
    have = [d.name for d in running.disks]
    want = [d.name for d in spec.disks]
    if have != want:
        raise HotspareError(f"{spec.workdir}: VM {running.vm_id} already runs there with disks {have}, not {want}")


# QEMU 7.2's query-named-block-nodes crashed the VM (a segfault) while a block-stream job
# existed, seen here; query-block and x-debug-query-block-graph did not. So the VM's block
# nodes are only ever queried through these two.

def disk_nodes(q: QmpClient) -> dict[str, dict[str, Any]]:
    """Each guest disk's node (``d-<disk>``) and its ``query-block`` ``inserted`` info
    (``image`` with its backing chain, ``dirty-bitmaps``)."""
    out = {}
    for blk in q.execute("query-block"):
        ins = blk.get("inserted")
        if ins and ins.get("node-name"):
            out[ins["node-name"]] = ins
    return out


def node_names(q: QmpClient) -> set[str]:
    """Every named node of the VM's block graph."""
    return {n["name"] for n in q.execute("x-debug-query-block-graph")["nodes"] if n.get("type") == "block-driver"}


def image_size(path: str | os.PathLike[str], fmt: str) -> int:
    """The virtual size QEMU sees for an image (for vpc, after any CHS rounding); also of
    an NBD export, given its URI."""
    # -U: the image may be open in a running VM; reading its header is still safe.
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", fmt, os.fspath(path), what=str(path)))
    return int(info["virtual-size"])


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

    def _start_guest(self, handle: VmHandle) -> None:
        """Let a VM started with -S run, once every disk has a bitmap recording (added
        before the guest's first write, so the capture never needs a first full scan). A VM
        found running, or paused by :meth:`stop`, is left as it is."""
        with self.qmp(handle) as q:
            if q.execute("query-status")["status"] != "prelaunch":
                return
            nodes = disk_nodes(q)
            for d in handle.disks:
                if not [b for b in nodes.get(d.node, {}).get("dirty-bitmaps", []) if b["name"].startswith("hs-")]:
                    q.execute("block-dirty-bitmap-add", node=d.node, name=BITMAP_FIRST, granularity=d.block_size,
                              persistent=True)
            q.execute("cont")

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
