"""Fixtures for Docker-hosted QEMU: a private docker daemon and the QEMU runner image in it.

Import them from conftest.py: ``from tests.fixtures_docker import dockerd, qemu_runner_image  # noqa: F401``.

- ``dockerd``: one dockerd per test session, installed from Debian's docker.io with
  apt-get when missing, on a socket, data root, exec root and pid file of its own in a
  temporary directory, so it never meets another daemon on the machine (nor its
  /etc/docker/daemon.json: an empty config file is given). No bridge, no iptables rules,
  no IP forwarding: the VMs run with network "none". The base URL, ``unix:///.../docker.sock``.
- ``qemu_runner_image``: hotspare's QEMU runner image, built in that daemon by
  ``deployments/docker/build-offline.sh`` (debootstrap, no registry); its name.

Both need root. A missing tool or a failed start skips the tests, or fails them under
CI=true, saying what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.fixtures_demo import require

__all__ = ["dockerd", "qemu_runner_image"]

REPO = Path(__file__).resolve().parent.parent
BUILD_OFFLINE = REPO / "deployments" / "docker" / "build-offline.sh"
RUNNER_IMAGE = "hotspare/qemu-runner:bookworm"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0  # dockerd gives containers 15 s to stop at shutdown, then exits
build_seconds: float | None = None  # how long the session's image build took (for reports)


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
        require(f"dockerd (Debian package docker.io): apt-get install failed: {proc.stderr.strip()[-500:]}")


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever a killed daemon left mounted below ``root`` (overlay2 layers,
    shm), so that removing ``root`` never walks into a mounted filesystem."""
    prefix = str(root) + os.sep
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _wait_for_daemon(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            require(f"a working dockerd: it exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            client = docker.DockerClient(base_url=base_url, timeout=5)
            try:
                client.ping()
                return
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not up yet; the deadline decides
            if time.monotonic() > deadline:
                require(f"a working dockerd: no answer on {base_url} in {START_TIMEOUT:.0f} s:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[str]:
    if os.geteuid() != 0:
        require("root, to run a private dockerd")
    if shutil.which("dockerd") is None:
        if shutil.which("apt-get") is None:
            require("dockerd (Debian package docker.io), and no apt-get to install it")
        _install_docker()
        if shutil.which("dockerd") is None:
            require("dockerd (Debian package docker.io): still missing after apt-get install")
    # A short root of its own in /tmp: the daemon and its containerd bind unix sockets below
    # it, whose paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="hs-dockerd-", dir="/tmp"))
    (root / "daemon.json").write_text("{}\n")
    base_url = f"unix://{root}/docker.sock"
    log = root / "dockerd.log"
    cmd = ["dockerd", "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
           "--config-file", str(root / "daemon.json"), "--data-root", str(root / "data"),
           "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"), "-H", base_url]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_daemon(base_url, proc, log)
        yield base_url
    finally:
        _stop(proc)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


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
