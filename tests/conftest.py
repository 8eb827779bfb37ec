"""Shared fixtures.

- ``seaweedfs``: one SeaweedFS server (``weed mini``) per test session, the S3 backend of
  the tests (no mocks of S3). Skipped when ``weed`` is missing, a failure under CI=true.
- ``own_seaweedfs``: a server of one test's own, which it may stop and start again.
- ``s3_env``: the AWS environment variables pointing at it.
- ``store_url`` / ``store``: a fresh, empty store per test, once per backend (local, s3).
- ``aws`` / ``ec2_host``: moto's EC2 and EBS, and an EC2 host on it (tests/fixtures_aws.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotspare.store import Store, open_store
from tests.fixtures_aws import aws, ec2_host  # noqa: F401
from tests.fixtures_demo import demo_disk, demo_disk_image, qemu_system  # noqa: F401
from tests.fixtures_docker import dockerd, qemu_runner_image  # noqa: F401
from tests.fixtures_prefect import prefect_api  # noqa: F401
from tests.fixtures_vms import vms  # noqa: F401
from tests.servers import Missing, SeaweedFS, WeedServer, find_weed


def find_weed_or_skip() -> str:
    try:
        return find_weed()
    except Missing as err:
        msg = f"{err}: S3 tests cannot run"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = WeedServer(tmp_path_factory.mktemp("seaweedfs"), weed=find_weed_or_skip())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[WeedServer]:
    """A SeaweedFS of the test's own, started, which the test may stop and start again."""
    server = WeedServer(tmp_path / "seaweedfs", weed=find_weed_or_skip())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """Point the standard AWS environment variables at the test server."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
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
    for pattern in ("qemu-system", "nbdkit", "hotspare.vm.qemu.capture"):
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
