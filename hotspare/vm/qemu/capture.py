"""Capture of a VM's writes as extent logs of a new epoch, with QEMU's dirty bitmaps.

The failed-over VM's QEMU is captured exactly as the machine's storage daemon is (DESIGN.md,
"Capture"): each disk's overlay node (``d-<disk>``) carries a persistent dirty bitmap from
the guest's first write (added while QEMU waits in -S, :meth:`QemuHost._start_guest`), and
one cycle, by :class:`hotspare.capture.qemu.QemuTracker` itself, is:

1. one QMP ``transaction`` for all disks: add the next bitmap, disable the current one,
   ``blockdev-backup sync=none`` into a fleece image in ``<workdir>/capture/view`` (the cut,
   the same instant for every disk);
2. the frozen bitmap's dirty extents, read by ``nbdinfo --map`` from an NBD export of the
   view with that bitmap (``nbd-server-start`` on ``<workdir>/nbd.sock``), and their bytes
   from the same export (:class:`~hotspare.capture.nbd.NbdReader`: no FUSE, so that a QEMU
   in a container works the same through the bind-mounted work directory);
3. extent logs whose last one is the cut, uploaded create-only (``ship_cycle``);
4. only then the release of the view and the frozen bitmap.

:class:`VmBlockLayer` gives the tracker the storage daemon's interface over the VM's QMP.

Crash safety, as the agent's: a capture killed at any line leaves the frozen bitmap in
QEMU; the next start merges it into the recording one, so its blocks ship again (never
lost, re-sent at most). A VM whose QEMU was killed left its bitmaps ``inconsistent`` (or
gone): the next cycle is a rescan of a frozen view against the capture's hash map. A VM
that is gone is captured offline: a ``qemu-storage-daemon`` opens its overlays (with their
backings) in place of QEMU, and the same cycle runs against it. The state per disk
(epoch, last seq, the bitmap recording since the last cut, the hash map) lives in
``<workdir>/capture/``; the epoch's last seq is also checked against the store at each
start, so a crash between an upload and the state's save never reuses a seq.

Cost: a cycle costs its dirty extents plus a few QMP round trips and one ``nbdinfo`` run,
never the disk's size. A rescan (after QEMU was killed) reads the whole disk and, since the
hash map knows only what the capture shipped, re-sends every non-zero block once.

Run it without the CLI: ``python -m hotspare.vm.qemu.capture --store URL --workdir DIR --epoch N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from hotspare.capture.daemon import VIEW_READ, DaemonError, Bitmap, bitmap_number
from hotspare.capture.nbd import NbdReader
from hotspare.capture.qemu import DiskWork, QemuTracker
from hotspare.capture.state import DiskState, StateDir
from hotspare.capture.upload import DEFAULT_LOG_TARGET, last_seq_in_store
from hotspare.errors import HotspareError, StoreError
from hotspare.localfile import file_lock
from hotspare.machine import DiskSpec
from hotspare.store.base import Store
from hotspare.vm.host import VmHandle, load_handle
from hotspare.vm.qemu.cmd import BITMAP_FIRST, disk_blockdevs, disk_nodes, node_names
from hotspare.qmp import QmpClient, QmpError, QmpSession

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0
CAPTURE_DIR = "capture"
NBD_SOCKET = "nbd.sock"  # relative to the work directory, where QEMU runs
OFFLINE_QMP = "offline-qmp.sock"
LOG_TARGET = DEFAULT_LOG_TARGET


class QmpHost(Protocol):
    """What capture needs from a host: QEMU hosts whose work directory this process sees."""

    def qmp(self, handle: VmHandle) -> QmpClient: ...
    def is_alive(self, handle: VmHandle) -> bool: ...
    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None: ...


class VmBlockLayer(QmpSession):
    """The storage daemon's interface (what :class:`QemuTracker` drives) over a VM's QEMU,
    or over a ``qemu-storage-daemon`` holding a gone VM's disks: its QMP socket, its disk
    nodes ``d-<disk>``, and views exported on ``<workdir>/nbd.sock`` (socket paths relative
    to the work directory, where QEMU runs, so that no path grows past 107 bytes)."""

    def __init__(self, workdir: str | os.PathLike[str], connect: Callable[[], QmpClient], *, what: str) -> None:
        self.workdir = Path(workdir)
        self.view_dir = self.workdir / CAPTURE_DIR / "view"
        self.view_cwd = str(self.workdir)
        self._connect = connect
        self.what = what

    def ensure(self) -> bool:
        """Start QEMU's NBD server for the views, unless it runs; never a fresh daemon."""
        self.view_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.execute("nbd-server-start", addr={"type": "unix", "data": {"path": NBD_SOCKET}})
        except QmpError as err:
            if "already running" not in err.desc:
                raise
        return False

    def _open_qmp(self) -> QmpClient:
        return self._connect().connect()

    def _node_info(self, disk: str) -> dict[str, Any] | None:
        return disk_nodes(self.qmp()).get(f"d-{disk}")  # query-block: see cmd.disk_nodes

    def bitmaps(self, disk: str) -> list[Bitmap]:
        """hotspare's bitmaps of ``disk``, oldest first."""
        info = self._node_info(disk)
        if info is None:
            raise DaemonError(f"{self.what}: no node for disk {disk}")
        out = [Bitmap(b["name"], bool(b.get("recording")), bool(b.get("inconsistent")), int(b.get("count", 0)))
               for b in info.get("dirty-bitmaps", []) if bitmap_number(b["name"]) is not None]
        return sorted(out, key=lambda b: b.number)

    def node_names(self) -> set[str]:
        return node_names(self.qmp())

    def view_uri(self, disk: str) -> str:
        return f"nbd+unix:///view-{disk}?socket={NBD_SOCKET}"  # relative: nbdinfo runs in view_cwd

    @contextmanager
    def open_view(self, disk: str) -> Iterator[NbdReader]:
        # Reading and uploading need no QMP: let other clients (a flow's status queries, the
        # streams' progress) in meanwhile; the release reconnects.
        self.close()
        with NbdReader(self.workdir / NBD_SOCKET, f"snap-{disk}", max_read=VIEW_READ) as reader:
            yield reader

    def pid(self) -> int | None:
        return None

    def served_at(self, disk: str) -> str:
        return f"d-{disk}"


class VmCapture:
    """Ships every disk of a VM to ``store`` as extent logs of ``epoch``."""

    def __init__(self, host: QmpHost, handle: VmHandle, store: Store, *, epoch: int,
                 disks: list[DiskSpec] | None = None, log_target: int = LOG_TARGET,
                 say: Callable[[str], None] | None = None) -> None:
        if not handle.disks:
            raise HotspareError(f"VM {handle.vm_id}: its handle names no disks (launched by an older hotspare?)")
        self.host, self.handle, self.store, self.epoch = host, handle, store, epoch
        self.workdir = Path(handle.workdir)
        self.state_dir = StateDir(self.workdir / CAPTURE_DIR)
        self.log_target = log_target
        self.say = say or (lambda s: log.info("%s", s))
        specs = disks or [DiskSpec(name=d.name, path=d.overlay, size=d.size, block_size=d.block_size)
                          for d in handle.disks]
        for spec in specs:
            if handle.disk(spec.name).size != spec.size:
                raise HotspareError(f"VM {handle.vm_id}: disk {spec.name} is {handle.disk(spec.name).size} bytes, "
                                    f"the machine's is {spec.size}")
        self.specs = specs
        self._lock = threading.Lock()
        self.work = [DiskWork(spec=s, state=self._load_state(s)) for s in specs]
        self._live: tuple[VmBlockLayer, QemuTracker] | None = None

    def _load_state(self, spec: DiskSpec) -> DiskState:
        state = self.state_dir.load(spec.name, in_place=True)
        if state is None:
            fresh = DiskState.fresh(epoch=self.epoch, block_size=spec.block_size, disk_size=spec.size)
            # The bitmap the launch added before the guest's first write: the tracker trusts
            # it only if QEMU still has it, consistent (else the first cycle is a rescan).
            fresh.bitmap = BITMAP_FIRST
            self.state_dir.save(spec.name, fresh)
            state = self.state_dir.load(spec.name, in_place=True)
            assert state is not None
        if (state.epoch, state.disk_size, state.block_size) != (self.epoch, spec.size, spec.block_size):
            raise HotspareError(f"{self.state_dir.root}: capture state of disk {spec.name} is for epoch {state.epoch} "
                                f"size {state.disk_size} block {state.block_size}, not epoch {self.epoch} size "
                                f"{spec.size} block {spec.block_size}")
        return state

    # -- one cycle -----------------------------------------------------------------------
    def ship_once(self) -> list[str]:
        """One cut of every disk, shipped; returns the keys of the logs uploaded (none when
        the guest wrote nothing since the last cut). A gone VM is shipped offline."""
        with self._lock, file_lock(self.workdir / "capture.lock"):
            if self.host.is_alive(self.handle):
                try:
                    return self._cycle_live()
                except (QmpError, DaemonError):
                    if self.host.is_alive(self.handle):
                        raise
                    self._live = None  # died under us: what it wrote is in its overlays
            return self._cycle_offline()

    def _cycle_live(self) -> list[str]:
        if self._live is None:
            layer = VmBlockLayer(self.workdir, lambda: self.host.qmp(self.handle), what=f"VM {self.handle.vm_id}")
            self._live = (layer, self._tracker(layer))
        layer, tracker = self._live
        try:
            return self._cycle(tracker)
        finally:
            layer.close()  # QEMU's QMP serves one client at a time: never hold it between cycles

    def _cycle_offline(self) -> list[str]:
        with OfflineDisks(self.handle) as layer:
            return self._cycle(self._tracker(layer))

    def _tracker(self, layer: VmBlockLayer) -> QemuTracker:
        return QemuTracker(layer, self.state_dir, self.store, self.handle.machine,  # type: ignore[arg-type]
                           log_target=self.log_target, say=self.say)

    def _cycle(self, tracker: QemuTracker) -> list[str]:
        for w in self.work:
            w.keys = []
            # A crash between an upload and the state's save left a log past last_seq.
            last = last_seq_in_store(self.store, self.handle.machine, w.spec.name, self.epoch, w.state.last_seq)
            if last != w.state.last_seq:
                w.state.last_seq = last
                self.state_dir.save_meta(w.spec.name, w.state)
        tracker.cycle(self.work)
        return [k for w in self.work for k in w.keys]

    # -- loop and end --------------------------------------------------------------------
    def run(self, interval: float = DEFAULT_INTERVAL, stop: threading.Event | None = None,
            on_ship: Callable[[list[str]], object] | None = None) -> None:
        """Ship every ``interval`` seconds until ``stop`` is set or the VM is gone (after
        shipping its last writes). Transient store errors and a busy QMP are logged and
        retried: the frozen bitmap waits in QEMU and ships with the next cut."""
        stop = stop or threading.Event()
        while not stop.is_set():
            started = time.monotonic()
            alive = self.host.is_alive(self.handle)
            try:
                keys = self.ship_once()
            except (StoreError, QmpError) as err:
                transient = err.transient if isinstance(err, StoreError) else err.error_class is None
                if not transient or not self.host.is_alive(self.handle):
                    raise
                log.warning("capture of %s: %s; retrying in %.0f s", self.handle.vm_id, err, interval)
                keys = []
            if keys and on_ship is not None:
                on_ship(keys)
            if not alive:
                return
            stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def final_capture(self, timeout: float = 30.0) -> list[str]:
        """Stop the VM with nothing lost: pause it, ship its last writes, then quit it (QEMU
        then stores the bitmaps). For a VM that is already gone, ship offline."""
        keys: list[str] = []
        paused_capture = False

        def capture_paused() -> None:
            nonlocal paused_capture
            keys.extend(self.ship_once())
            paused_capture = True

        self.host.stop(self.handle, timeout, before_quit=capture_paused)
        if not paused_capture:
            keys.extend(self.ship_once())
        return keys


class OfflineDisks(VmBlockLayer):
    """A gone VM's disks opened by a ``qemu-storage-daemon`` (overlays over their backings,
    the same nodes as in the VM), so that the tracker ships what the VM wrote after its last
    cut. Quit cleanly at the end, so the bitmaps are stored for the VM's next launch."""

    def __init__(self, handle: VmHandle) -> None:
        workdir = Path(handle.workdir)
        super().__init__(workdir, lambda: QmpClient(workdir / OFFLINE_QMP, timeout=30.0),
                         what=f"the disks of gone VM {handle.vm_id}")
        self.handle = handle
        self.proc: subprocess.Popen[bytes] | None = None

    def _node_info(self, disk: str) -> dict[str, Any] | None:
        # No guest device, so query-block lists nothing; and no stream job runs here.
        return next((n for n in self.execute("query-named-block-nodes", flat=True)
                     if n["node-name"] == f"d-{disk}"), None)

    def __enter__(self) -> OfflineDisks:
        args = ["qemu-storage-daemon"]
        for d in self.handle.disks:
            for nd in disk_blockdevs(d):
                args += ["--blockdev", json.dumps(nd)]
        sock = self.workdir / OFFLINE_QMP
        sock.unlink(missing_ok=True)
        args += ["--chardev", f"socket,path={OFFLINE_QMP},server=on,wait=off,id=qmp", "--monitor", "chardev=qmp"]
        logf = open(self.workdir / "capture-offline.log", "ab")
        try:
            self.proc = subprocess.Popen(args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise DaemonError("qemu-storage-daemon is missing: apt-get install qemu-system-common") from None
        finally:
            logf.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                tail = (self.workdir / "capture-offline.log").read_text(errors="replace")[-600:]
                raise DaemonError(f"{self.what}: qemu-storage-daemon exited with {self.proc.returncode}: {tail}")
            try:
                self.qmp()
                return self
            except QmpError:
                if time.monotonic() > deadline:
                    self._end()
                    raise
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._end()

    def _end(self) -> None:
        if self.proc is None:
            return
        try:
            self.execute("quit")
        except QmpError:
            self.proc.terminate()
        self.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        (self.workdir / OFFLINE_QMP).unlink(missing_ok=True)
        self.proc = None


# -- engine entry point: ``python -m hotspare.vm.qemu.capture`` -------------------------------

def host_for(handle: VmHandle, docker_url: str | None = None) -> QmpHost:
    """The host object a handle's kind needs, without Prefect blocks."""
    if handle.host == "local-qemu":
        from hotspare.vm.qemu.local import LocalQemuHost

        return LocalQemuHost()
    if handle.host == "docker-qemu":
        from hotspare.vm.qemu.docker import DockerQemuHost

        return DockerQemuHost(base_url=docker_url)
    raise HotspareError(f"VM {handle.vm_id}: host {handle.host} is not captured through QEMU's bitmaps")


def main(argv: list[str] | None = None) -> int:
    from hotspare.store import open_store

    p = argparse.ArgumentParser(prog="python -m hotspare.vm.qemu.capture",
                                description="Ship a failed-over VM's writes as extent logs until it stops.")
    p.add_argument("--store", required=True, help="store URL")
    p.add_argument("--workdir", required=True, help="the VM's work directory (holds handle.json)")
    p.add_argument("--epoch", type=int, required=True, help="the VM's epoch")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between cuts")
    p.add_argument("--docker-url", default=None, help="docker daemon of a docker-qemu VM (default DOCKER_HOST)")
    p.add_argument("--once", action="store_true", help="ship one cut and exit")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        handle = load_handle(a.workdir)
        if handle is None:
            raise HotspareError(f"no VM handle in {a.workdir}")
        cap = VmCapture(host_for(handle, a.docker_url), handle, open_store(a.store), epoch=a.epoch)
        if a.once:
            print(f"shipped {len(cap.ship_once())} log(s)")
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        cap.run(interval=a.interval, stop=stop, on_ship=lambda keys: print(f"shipped {len(keys)} log(s)", flush=True))
    except HotspareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
