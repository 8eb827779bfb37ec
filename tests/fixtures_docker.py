"""Fixtures for Docker-hosted QEMU: a private docker daemon and the QEMU runner image in it.

Import them from conftest.py: ``from tests.fixtures_docker import dockerd, qemu_runner_image  # noqa: F401``.

- ``dockerd``: one private dockerd per test session (tests/servers.py's running_dockerd),
  installed from Debian's docker.io with apt-get when missing. The base URL,
  ``unix:///.../docker.sock``.
- ``qemu_runner_image``: hotspare's QEMU runner image, built in that daemon by
  ``deployments/docker/build-offline.sh`` (debootstrap, no registry); its name.

Both need root. A missing tool or a failed start skips the tests, or fails them under
CI=true, saying what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fixtures_demo import require
from tests.servers import Missing, running_dockerd

__all__ = ["dockerd", "qemu_runner_image"]

REPO = Path(__file__).resolve().parent.parent
BUILD_OFFLINE = REPO / "deployments" / "docker" / "build-offline.sh"
RUNNER_IMAGE = "hotspare/qemu-runner:bookworm"
STOP_TIMEOUT = 20.0  # dockerd gives containers 15 s to stop at shutdown, then exits
build_seconds: float | None = None  # how long the session's image build took (for reports)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    with ExitStack() as stack:
        try:
            base_url = stack.enter_context(running_dockerd(install=True, stop_timeout=STOP_TIMEOUT))
        except (Missing, RuntimeError) as err:  # missing, or did not start: skip, or fail under CI
            require(str(err))
        yield base_url


@pytest.fixture(scope="session")
def qemu_runner_image(dockerd: str) -> str:
    """The runner image in the session's daemon, built offline (about 35-80 s, no registry)."""
    global build_seconds
    if shutil.which("docker") is None:
        require("the docker client (Debian package docker.io)")
    started = time.monotonic()
    proc = subprocess.run(["sh", str(BUILD_OFFLINE), RUNNER_IMAGE, dockerd], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        require(f"the QEMU runner image: {BUILD_OFFLINE.relative_to(REPO)} exited with {proc.returncode}:\n"
                f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    build_seconds = time.monotonic() - started
    print(f"\n{proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else RUNNER_IMAGE}"
          f" ({build_seconds:.0f} s with the script's checks)")
    return RUNNER_IMAGE
