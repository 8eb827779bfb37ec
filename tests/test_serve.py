"""`hotspare serve`: a point read-only over NBD through nbdkit, read by qemu-img, qemu-io and
a qcow2 overlay, from the local store and from S3; and on a disk of several GiB, where only
the stored chunks cross (zeros are holes)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hotspare.catalog import load_catalog
from hotspare.replica.serve import nbd_uri
from tests.helpers import HOTSPARE, cli, qemu_io, random_image, require

pytestmark = pytest.mark.usefixtures("prefect_api")


def _protect(tmp_path: Path, store_url: str, size: int, fill: float) -> tuple[Path, dict[str, str]]:
    image = tmp_path / "disk.img"
    random_image(image, size, seed=5, fill=fill)
    env = {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"), "HOTSPARE_TRACKER": "scan"}
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    return image, env


def _serve(env: dict[str, str], sock: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([HOTSPARE, "serve", "m1", "--disk", "root", "--socket", str(sock), *args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "hotspare serve did not open its socket in 60 s"
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen, sock: Path) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert not sock.exists(), "serve removes its socket when it stops"


def _compare(uri: str, image: Path) -> None:
    r = subprocess.run([require("qemu-img", "qemu-utils"), "compare", "-f", "raw", "-F", "raw", uri, str(image)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_a_point_to_qemu_img_qemu_io_and_an_overlay(tmp_path: Path, store_url: str) -> None:
    image, env = _protect(tmp_path, store_url, 24 << 20, 0.4)
    first = image.read_bytes()
    qemu_io(image, "write -P 0x5a 1048576 65536", "write -P 0x33 7000064 4096")
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    from hotspare.store import open_store

    cat = load_catalog(open_store(store_url), "m1", "root", 24 << 20)
    assert len(cat.points) == 2
    sock = tmp_path / "s" / "root.sock"
    proc = _serve(env, sock)
    try:
        uri = nbd_uri(sock)
        _compare(uri, image)
        r = subprocess.run([require("qemu-io", "qemu-utils"), "-r", "-f", "raw", uri, "-c", "read -P 0x5a 1048576 65536"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        # A VM's disk: a qcow2 overlay over the served point takes writes; the point does not change.
        overlay = tmp_path / "vm.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", str(overlay)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", str(overlay), "-c", "write -P 0x77 0 65536"], check=True,
                       capture_output=True)
        r = subprocess.run(["qemu-io", "-f", "qcow2", str(overlay), "-c", "read -P 0x77 0 65536",
                            "-c", "read -P 0x5a 1048576 65536"], capture_output=True, text=True)
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr
        _compare(uri, image)
    finally:
        _stop(proc, sock)
    # --point serves an older point: the disk as it was at the first consolidation.
    older = tmp_path / "older.raw"
    older.write_bytes(first)
    proc = _serve(env, sock, "--point", cat.points[0].id)
    try:
        _compare(nbd_uri(sock), older)
    finally:
        _stop(proc, sock)


def test_serve_errors_are_one_line(tmp_path: Path) -> None:
    image, env = _protect(tmp_path, str(tmp_path / "store"), 8 << 20, 0.6)
    r = cli("serve", "m1", "--disk", "root", "--point", "9-9", env=env, check=False)
    assert r.returncode == 1 and "has no point '9-9'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the S3 side is covered by the tests above
def test_serve_a_disk_of_several_gib_reads_only_its_chunks(tmp_path: Path, store_url: str) -> None:
    size = 6 << 30
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(size)
    qemu_io(image, "write -P 0x11 0 1048576", "write -P 0x22 3221225472 65536", f"write -P 0x33 {size - 65536} 65536")
    env = {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"), "HOTSPARE_TRACKER": "scan"}
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    sock = tmp_path / "big.sock"
    proc = _serve(env, sock)
    try:
        _compare(nbd_uri(sock), image)
        # Zeros are holes in the export: a copy writes only the stored chunks.
        out = tmp_path / "copy.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out)], check=True)
        assert os.stat(out).st_blocks * 512 < 64 << 20, "the copy is sparse: only the stored chunks were written"
    finally:
        _stop(proc, sock)
