"""A writer that keeps a journal's ordering rule, as filesystems and databases do: write a
data block, make it durable, then write a commit record naming it, and make that durable.

Run as ``python -m tests.journal_writer fuse PATH SECONDS`` (pwrite and fdatasync on a file)
or ``... nbd URI SECONDS`` (qemu-io through NBD, ``flush`` for durability). It prints the
number of commits. :func:`check_state` tells whether a disk image is a state a crash could
have left: every commit record in the ring names a data block that holds its data.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import xxhash

BLOCK = 64 << 10
DATA_SLOTS = 64  # data block i goes to slot i % DATA_SLOTS, from offset 0
RING = 16  # commit record i goes to ring slot i % RING, in the disk's last RING sectors
MAGIC = b"JRNL"
_REC = struct.Struct("<4sQQ")  # magic, commit number, xxh3 of the data block


def data_block(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def record(i: int, data: bytes) -> bytes:
    return _REC.pack(MAGIC, i, xxhash.xxh3_64_intdigest(data)).ljust(512, b"\0")


def ring_offset(disk_size: int, i: int) -> int:
    return disk_size - RING * 512 + (i % RING) * 512


def check_state(fd: int, disk_size: int) -> list[str]:
    """The violations of the ordering rule in the image open as ``fd`` (empty: a state a
    crash could have left)."""
    bad = []
    ring = os.pread(fd, RING * 512, disk_size - RING * 512)
    for slot in range(RING):
        magic, i, digest = _REC.unpack_from(ring, slot * 512)
        if magic != MAGIC:
            continue
        if xxhash.xxh3_64_intdigest(os.pread(fd, BLOCK, (i % DATA_SLOTS) * BLOCK)) != digest:
            bad.append(f"commit {i} names data slot {i % DATA_SLOTS}, which holds other data")
    return bad


def run_fuse(path: str, seconds: float) -> int:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    i, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            data = data_block(i)
            os.pwrite(fd, data, (i % DATA_SLOTS) * BLOCK)
            os.fdatasync(fd)
            os.pwrite(fd, record(i, data), ring_offset(size, i))
            os.fdatasync(fd)
            i += 1
    finally:
        os.close(fd)
    return i


def run_nbd(uri: str, seconds: float, size: int) -> int:
    i, end = 0, time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        while time.monotonic() < end:
            data = data_block(i)
            dpath, rpath = os.path.join(tmp, "d"), os.path.join(tmp, "r")
            with open(dpath, "wb") as f:
                f.write(data)
            with open(rpath, "wb") as f:
                f.write(record(i, data))
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {dpath} {(i % DATA_SLOTS) * BLOCK} {BLOCK}",
                            "-c", "flush", "-c", f"write -s {rpath} {ring_offset(size, i)} 512", "-c", "flush", uri],
                           check=True, capture_output=True)
            i += 1
    return i


if __name__ == "__main__":
    kind, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    n = run_fuse(target, seconds) if kind == "fuse" else run_nbd(target, seconds, int(sys.argv[4]))
    print(n)
