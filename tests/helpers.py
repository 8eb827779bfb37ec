"""Small helpers the tests share: running the CLI as a user would, writing to an image
from outside with qemu-io, requiring system tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import stop_group  # noqa: F401 - the tests import it from here

HOTSPARE = str(Path(sys.prefix) / "bin" / "hotspare")
PREFECT = str(Path(sys.prefix) / "bin" / "prefect")


def require(tool: str, package: str) -> str:
    """The path of ``tool``; under CI a missing tool fails the test, elsewhere it skips."""
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is missing: apt-get install {package} (scripts/setup.sh does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def qemu_io(image: Path, *commands: str) -> None:
    """Write to a raw image from outside hotspare, as any program on the machine would."""
    args = [require("qemu-io", "qemu-utils"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``hotspare`` command; ``check`` demands exit 0 and shows its output if not."""
    proc = subprocess.run([HOTSPARE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"hotspare {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def random_image(path: Path, size: int, seed: int = 1, fill: float = 0.25) -> None:
    """A raw image with random data in a fraction of its 1 MiB pieces, zeros elsewhere."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 1 << 20):
            if rng.random() < fill:
                f.seek(off)
                f.write(rng.integers(0, 256, min(1 << 20, size - off), dtype=np.uint8).tobytes())


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def replay_over(store, keys: list[str], base: Path, out: Path) -> Path:
    """A copy of ``base`` with the logs ``keys`` applied in order (how a replica is checked)."""
    from hotspare.replay import apply_logs

    shutil.copyfile(base, out)
    fd = os.open(out, os.O_WRONLY)
    try:
        apply_logs(store, keys, fd)
    finally:
        os.close(fd)
    return out


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def served(env: dict[str, str], machine: str, disk: str = "root") -> str:
    """The NBD URI where the storage daemon serves ``disk`` of ``machine`` (the machine's own
    writes go there, so the qemu tracker sees them)."""
    return f"nbd+unix:///{disk}?socket={Path(env['HOTSPARE_AGENT_STATE']) / machine / 'serve' / f'{disk}.sock'}"


def power_loss(env: dict[str, str], machine: str) -> None:
    """The machine dies: its storage daemon (and the bitmap it had not stored) with it."""
    import signal

    pidfile = Path(env["HOTSPARE_AGENT_STATE"]) / machine / "qsd" / "pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


class NbdServer:
    """A real NBD server: ``qemu-nbd --read-only`` exporting ``image`` (raw) as ``export`` on
    the unix socket ``sock``, as ``hotspare serve`` serves a recovery point. ``stop()`` ends
    it (a VM still reading from it would see I/O errors)."""

    def __init__(self, image: Path, sock: Path, export: str = "point") -> None:
        require("qemu-nbd", "qemu-utils")
        self.image, self.sock, self.export = Path(image), Path(sock), export
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        self.sock.unlink(missing_ok=True)
        # --shared: a VM and a test's reader may connect at once.
        self.proc = subprocess.Popen(["qemu-nbd", "--read-only", "--shared=8", "-f", "raw", "-x", export,
                                      "-k", str(self.sock), "-t", str(self.image)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import time

        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"qemu-nbd did not start serving {image} on {sock}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.unlink(missing_ok=True)

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
