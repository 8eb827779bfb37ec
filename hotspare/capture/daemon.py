"""The machine's storage daemon: one ``qemu-storage-daemon`` per protected machine.

It opens each disk as raw (the disk's bytes are never rewritten: the qcow2 *sidecar* in the
agent's state directory holds only metadata and the persistent dirty bitmaps, with the disk
as its raw external data file), and serves each disk for the machine's own I/O in the serve
directory:

- ``<serve>/<disk>.sock``: NBD on a unix socket (a symlink to the daemon's one NBD server
  socket, ``<serve>/.nbd.sock``; the export name is the disk's name), for QEMU
  (``file=nbd+unix:///<disk>?socket=<serve>/<disk>.sock``) or the kernel's ``nbd-client``;
- ``<serve>/<disk>.img`` with ``fuse``: a regular file any program can open, pwrite and
  fdatasync (QEMU cannot put a FUSE and an NBD export on one writable node: one or the other).

The daemon is a separate, long-lived process (``--daemonize``) that outlives the agent: an
agent restart adopts it through its QMP socket (``<state>/qsd/qmp.sock``), so the machine's
I/O never stops for an agent crash. Terms used by the tracker:

- *bitmap*: a persistent dirty bitmap ``hs-<n>`` of a disk node, at the machine's block
  size; the one recording is the cycle's, a disabled one is *frozen* (a cut's writes);
- *view*: a point-in-time view of a disk (fleecing: ``blockdev-backup sync=none`` into a
  temporary qcow2 whose backing is the disk, read through a ``snapshot-access`` node on the
  backup's copy-before-write filter), exported on the daemon's NBD socket twice: read-only
  with the frozen bitmap (``view-<disk>``, for its extents) and writable (``snap-<disk>``,
  for its bytes, and for trims that tell the filter which blocks it no longer needs to copy).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hotspare.capture.nbd import NbdReader
from hotspare.errors import HotspareError
from hotspare.machine import DiskSpec, MachineConfig
from hotspare.qemuimg import qemu_img
from hotspare.qmp import QmpClient, QmpError, QmpSession
from hotspare.unixsocket import SUN_PATH_MAX

BITMAP_PREFIX = "hs-"
# The view is read one copy-before-write cluster per NBD request (the fleece's qcow2
# cluster, and block-copy's). QEMU 7.2's snapshot-access serves a read that spans a cluster
# the filter has copied and one it has not from the live disk, so the copied cluster's
# bytes would be the write's, not the cut's (measured: the cut then held a write made after
# it). A read within one cluster is served from one side, the right one.
VIEW_READ = 64 << 10


class DaemonError(HotspareError):
    """The storage daemon could not be started, adopted or driven."""


def node(disk: str) -> str:
    """The QEMU node name of a disk (what the machine's I/O and the bitmaps live on)."""
    return f"d-{disk}"


def bitmap_number(name: str) -> int | None:
    if name.startswith(BITMAP_PREFIX) and name[len(BITMAP_PREFIX):].isdigit():
        return int(name[len(BITMAP_PREFIX):])
    return None


@dataclass
class Bitmap:
    name: str
    recording: bool
    inconsistent: bool
    count: int  # dirty bytes

    @property
    def number(self) -> int:
        return bitmap_number(self.name) or 0


class StorageDaemon(QmpSession):
    """The daemon of one machine, its files under ``state_root`` and ``serve_dir``."""

    view_cwd: str | None = None  # view_uri's socket path is absolute

    def __init__(self, state_root: str | os.PathLike, config: MachineConfig, *,
                 serve_dir: str | os.PathLike | None = None, fuse: bool = False) -> None:
        self.root = Path(state_root).absolute()
        self.config = config
        self.serve_dir = Path(serve_dir).absolute() if serve_dir else self.root / "serve"
        self.fuse = fuse
        self.run_dir = self.root / "qsd"
        self.view_dir = self.root / "view"

    # -- paths -----------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "pid"

    @property
    def nbd_socket(self) -> Path:
        return self.serve_dir / ".nbd.sock"

    def sidecar(self, disk: str) -> Path:
        return self.root / f"{disk}.qcow2"

    def served_at(self, disk: str) -> str:
        """Where the machine reaches ``disk``: an NBD URI, or the FUSE file's path."""
        if self.fuse:
            return str(self.serve_dir / f"{disk}.img")
        return f"nbd+unix:///{disk}?socket={self.serve_dir / f'{disk}.sock'}"

    def view_uri(self, disk: str) -> str:
        return f"nbd+unix:///view-{disk}?socket={self.nbd_socket}"

    @contextmanager
    def open_view(self, disk: str) -> Iterator[NbdReader]:
        """Where the tracker reads the view's bytes, and trims what it is done with."""
        with NbdReader(self.nbd_socket, f"snap-{disk}", max_read=VIEW_READ) as reader:
            yield reader

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.execute("query-named-block-nodes", flat=True)}

    # -- lifecycle ---------------------------------------------------------------------------
    def pid(self) -> int | None:
        return running_pid(self.pid_path)

    def running(self) -> bool:
        return self.pid() is not None

    def ensure(self) -> bool:
        """Adopt the machine's running daemon, or start one; True when started here (its
        bitmaps are then whatever the last clean quit stored, if anything)."""
        if self.running():
            try:
                self._check_adopted()
                return False
            except (DaemonError, QmpError) as err:
                raise DaemonError(f"{self.config.name}: the storage daemon (pid {self.pid()}) does not serve this "
                                  f"machine's disks as registered ({err}); stop it with `hotspare daemon stop "
                                  f"{self.config.name}` and restart the agent") from None
        self._start()
        return True

    def _check_adopted(self) -> None:
        nodes = {n["node-name"]: n for n in self.qmp().execute("query-named-block-nodes", flat=True)}
        for d in self.config.disks:
            raw = nodes.get(f"r-{d.name}")
            if node(d.name) not in nodes or raw is None:
                raise DaemonError(f"disk {d.name} is not open")
            if os.path.realpath(raw["file"]) != os.path.realpath(d.path):
                raise DaemonError(f"disk {d.name} is {raw['file']}, registered as {d.path}")

    def _start(self) -> None:
        for p in (self.run_dir, self.view_dir, self.serve_dir):
            p.mkdir(parents=True, exist_ok=True)
        if len(os.fsencode(str(self.nbd_socket))) > SUN_PATH_MAX:
            raise DaemonError(f"{self.nbd_socket}: socket path longer than {SUN_PATH_MAX} bytes; "
                              "choose a shorter --serve-dir")
        for d in self.config.disks:
            self._ensure_sidecar(d)
        for p in [self.nbd_socket, self.qmp_path, self.pid_path]:
            p.unlink(missing_ok=True)
        args = ["qemu-storage-daemon"]
        aio = io_engine()
        for d in self.config.disks:
            driver = "host_device" if stat.S_ISBLK(os.stat(d.path).st_mode) else "file"
            args += ["--blockdev", json.dumps({"driver": driver, "node-name": f"r-{d.name}", "filename": d.path,
                                               "aio": aio}),
                     "--blockdev", json.dumps({"driver": "file", "node-name": f"m-{d.name}",
                                               "filename": str(self.sidecar(d.name))}),
                     "--blockdev", json.dumps({"driver": "qcow2", "node-name": node(d.name), "file": f"m-{d.name}",
                                               "data-file": f"r-{d.name}", "discard": "unmap"})]
        args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for d in self.config.disks:
            if self.fuse:
                mnt = self.serve_dir / f"{d.name}.img"
                _unmount_stale(mnt)
                mnt.touch()
                args += ["--export", f"type=fuse,id=serve-{d.name},node-name={node(d.name)},"
                                     f"mountpoint={mnt},writable=on"]
            else:
                args += ["--export", f"type=nbd,id=serve-{d.name},node-name={node(d.name)},name={d.name},writable=on"]
        qmp = self.qmp_path.relative_to(self.root)  # relative: the state dir may be deep
        args += ["--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp", "--monitor", "chardev=qmp",
                 "--pidfile", str(self.pid_path), "--daemonize"]
        try:
            proc = subprocess.run(args, cwd=self.root, capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DaemonError("qemu-storage-daemon is missing: apt-get install qemu-system-common "
                              "(scripts/setup.sh does)") from None
        if proc.returncode != 0:
            raise DaemonError(f"{self.config.name}: qemu-storage-daemon failed: "
                              f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}")
        if not self.fuse:
            for d in self.config.disks:
                link = self.serve_dir / f"{d.name}.sock"
                link.unlink(missing_ok=True)
                link.symlink_to(self.nbd_socket.name)

    def _ensure_sidecar(self, d: DiskSpec) -> None:
        """The qcow2 metadata file whose raw data file is the disk. Created with a stand-in
        data file and only then pointed at the disk (``amend``), because creating a qcow2 on
        an existing data file may zero it (seen here): the disk is never opened for writing."""
        side = self.sidecar(d.name)
        if side.exists():
            return
        tmp = side.with_suffix(".new")
        dummy = side.with_suffix(".standin")
        try:
            what = f"{self.config.name} disk {d.name}: the bitmap sidecar {side}"
            qemu_img("create", "-q", "-f", "qcow2", "-o",
                     f"data_file={dummy},data_file_raw=on,cluster_size=65536", str(tmp), str(d.size), what=what)
            qemu_img("amend", "-q", "-f", "qcow2", "-o", f"data_file={os.path.abspath(d.path)}", str(tmp), what=what)
            os.replace(tmp, side)
        finally:
            dummy.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> bool:
        """Quit the daemon cleanly, so its bitmaps are stored; False when none ran."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            self.qmp().execute("quit")
        except QmpError:
            os.kill(pid, signal.SIGTERM)
        self.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            raise DaemonError(f"{self.config.name}: the storage daemon (pid {pid}) did not quit in {timeout:.0f}s")
        return True

    # -- QMP (a QmpSession: connected on first use, again after a transport fault) ---------
    def _open_qmp(self) -> QmpClient:
        q = QmpClient(self.qmp_path, timeout=30.0)
        deadline = time.monotonic() + 10
        while True:  # a daemon just started may not listen yet
            try:
                return q.connect()
            except QmpError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def bitmaps(self, disk: str) -> list[Bitmap]:
        """hotspare's bitmaps of ``disk``, oldest first."""
        for n in self.execute("query-named-block-nodes", flat=True):
            if n["node-name"] == node(disk):
                out = [Bitmap(b["name"], bool(b.get("recording")), bool(b.get("inconsistent")), int(b.get("count", 0)))
                       for b in n.get("dirty-bitmaps", []) if bitmap_number(b["name"]) is not None]
                return sorted(out, key=lambda b: b.number)
        raise DaemonError(f"{self.config.name}: the storage daemon has no node for disk {disk}")


def running_pid(pid_path: Path) -> int | None:
    """The pid in ``pid_path`` if it is a live qemu-storage-daemon, else None."""
    try:
        pid = int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    # A killed daemon whose parent does not reap it stays a zombie; a reused pid is another
    # program: neither serves this machine.
    if fields[0] in ("Z", "X") or b"qemu-storage-daemon" not in cmd:
        return None
    return pid


@functools.cache
def io_engine() -> str:
    """``io_uring`` where this QEMU and kernel have it, else ``threads`` (QEMU's default).
    The daemon's one event loop serves the machine's I/O, the views' reads and their
    copy-before-write; io_uring spares it a thread-pool hand-off per request, which on a
    busy machine is the difference between keeping up with the workload and not. Probed
    once per process with qemu-io on a scratch file: QEMU may be built without liburing,
    and a kernel or a container's seccomp filter may refuse io_uring."""
    try:
        with tempfile.TemporaryDirectory(prefix="hotspare-aio-") as d:
            probe = Path(d) / "probe"
            probe.write_bytes(bytes(4096))
            proc = subprocess.run(["qemu-io", "-r", "-f", "raw", "-i", "io_uring", "-c", "read 0 4096", str(probe)],
                                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "threads"
    return "io_uring" if proc.returncode == 0 and "read 4096/4096" in proc.stdout else "threads"


def _unmount_stale(path: Path) -> None:
    """A FUSE export of a daemon that was killed leaves a dead mount ("transport endpoint is
    not connected"): unmount it so the next daemon can mount there."""
    try:
        os.stat(path)
        mounted = os.path.ismount(path)
    except OSError as err:
        mounted = err.errno == errno.ENOTCONN
    if mounted:
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, timeout=30)
