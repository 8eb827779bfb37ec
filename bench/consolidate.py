"""Consolidation of the chunk replica on SeaweedFS, against a plain upload of the written
bytes and a full rewrite of the disk image, measured in the same run.

    .venv/bin/python bench/consolidate.py [--size-gib 16] [--changed 0.01] [--fill 0.25] [--workers 4]
                                          [--samples 200] [--workdir DIR] [--keep] [--profile]

Set-up (not measured): starts SeaweedFS (``weed mini`` on free ports) in the work directory,
makes a sparse raw image with ``--fill`` of its 1 MiB pieces random, protects it, runs one
agent cycle, ingests and makes the first point (the engine, in-process). Meanwhile the
image is uploaded whole (boto3 ``upload_file``) as the object reference (b) rewrites. Then
overwrites ``--changed`` of the disk with random writes of 4 KiB to 1 MiB (log-uniform
sizes, random 4 KiB-aligned offsets, random bytes), runs an agent cycle and ingests.

Measured:

- hotspare: :func:`hotspare.replica.consolidate.consolidate_disk`, in-process, whole (plan,
  part jobs, root, commit, retention, garbage collection). Its part jobs run on
  ``--workers`` threads (``run_jobs``, as the flow maps them to tasks). The store it gets
  is a counting delegate (tests/servers.py's CountingStore): bytes uploaded (packs, index
  pages, root, the rest) and read (logs, previous chunks, index) are counted at the store
  interface.
- (a) boto3 multipart upload (``upload_fileobj``, 8 MiB parts, 4 in flight: the store's
  ``max_concurrency``) of as many random bytes as the writes wrote, to a scratch key.
- (b) full rewrite: ``download_file`` of the whole raw image object, patch it locally with
  the written ranges (read from the local image, so a lower bound), ``upload_file`` of it
  (boto3 defaults).

Targets (issue 12): bytes uploaded <= 1.5x the bytes written, wall time <= 1.5x (a),
(b) >= 10x ours. Afterwards ``--samples`` random ranges of the new point (read through
:func:`hotspare.consolidate.export.point_reader`) are checked against the image. Nothing is
asserted: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import scratch  # noqa: E402
from hotspare.capture.agent import Agent  # noqa: E402
from hotspare.catalog import load_catalog  # noqa: E402
from hotspare.consolidate.export import find_point, point_reader  # noqa: E402
from hotspare.ingest import ingest_disk  # noqa: E402
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, save_machine  # noqa: E402
from hotspare.replica.build import PartJob, PartResult, run_part  # noqa: E402
from hotspare.replica.consolidate import DiskConsolidation, consolidate_disk  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from hotspare.store.base import Store  # noqa: E402
from tests.servers import CountingStore, SeaweedFS, running_seaweedfs  # noqa: E402

MiB = 1 << 20
MACHINE, DISK = "bench", "root"
BUCKET = "hotspare-bench"
REF_THREADS = 4  # S3Store's default max_concurrency
REF_PART = 8 * MiB  # boto3's default multipart_chunksize
TARGET_BYTES, TARGET_A, TARGET_B = 1.5, 1.5, 10.0

console = Console(width=150)


# ------------------------------------------------------------------------- SeaweedFS


def seaweedfs(root: Path, bucket: str = BUCKET) -> AbstractContextManager[SeaweedFS]:
    """SeaweedFS for the benchmarks, under ``root``, with ``bucket`` created. Volumes of
    1 GiB: mini's default is 128 MB volumes, and a 16 GiB disk would need hundreds of them."""
    return running_seaweedfs(root, bucket=bucket, volume_size_limit_mb=1024, access_key_id="hotspare-bench")


# ---------------------------------------------------------------------- the disk


def make_image(path: Path, size: int, fill: float, rng: np.random.Generator) -> int:
    """A sparse raw image with random bytes in ``fill`` of its 1 MiB pieces; returns the data bytes."""
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


def touched_blocks(writes: list[tuple[int, int]], block: int) -> int:
    """Blocks (chunks) that the writes touch: what a chunk store must rewrite at least."""
    return len({b for off, n in writes for b in range((off // block), (off + n - 1) // block + 1)})


# ------------------------------------------------------------------------- engine


def threaded_jobs(store: Store, workers: int, profiles: list[cProfile.Profile] | None = None):
    """``run_jobs`` for consolidate_disk: part jobs on ``workers`` threads (what the flow's
    mapped tasks do on a thread pool task runner). With ``profiles``, each job runs under
    its own profiler (cProfile sees only the thread that enables it), added to the list."""
    def one(job: PartJob) -> PartResult:
        if profiles is None:
            return run_part(store, job)
        p = cProfile.Profile()
        p.enable()
        try:
            return run_part(store, job)
        finally:
            p.disable()
            profiles.append(p)

    def run_jobs(jobs: list[PartJob]) -> list[PartResult]:
        with ThreadPoolExecutor(max(1, workers)) as ex:
            return list(ex.map(one, jobs))
    return run_jobs


def protect(store: Store, cfg: MachineConfig, state: Path) -> tuple[int, int]:
    """One agent cycle and an ingest; returns (bytes shipped, logs)."""
    with Agent(store, cfg, state, tracker="scan") as agent:
        r = agent.cycle().disks[0]
    ingest_disk(store, cfg.name, cfg.disks[0])
    return r.data_bytes + r.zero_bytes, len(r.logs)


def consolidate(store: Store, cfg: MachineConfig, workers: int,
                profile: cProfile.Profile | None = None) -> tuple[DiskConsolidation, float, list[cProfile.Profile]]:
    """consolidate_disk, timed; with ``profile``, also the profiles of its part jobs."""
    jobs: list[cProfile.Profile] | None = [] if profile else None
    if profile:
        profile.enable()
    t = time.perf_counter()
    out = consolidate_disk(store, cfg.name, cfg.disks[0], cfg.policy, run_jobs=threaded_jobs(store, workers, jobs))
    seconds = time.perf_counter() - t
    if profile:
        profile.disable()
    return out, seconds, jobs or []


# ---------------------------------------------------------------------- references


def ref_upload(client, total: int, rng: np.random.Generator) -> float:
    """(a): boto3 multipart upload of ``total`` random bytes, REF_THREADS parts in flight."""
    from boto3.s3.transfer import TransferConfig

    body = io.BytesIO(rng.bytes(total))
    cfg = TransferConfig(multipart_threshold=REF_PART, multipart_chunksize=REF_PART, max_concurrency=REF_THREADS)
    key = "scratch/written-bytes"
    t = time.perf_counter()
    client.upload_fileobj(body, BUCKET, key, Config=cfg)
    seconds = time.perf_counter() - t
    client.delete_object(Bucket=BUCKET, Key=key)
    return seconds


def ref_rewrite(client, key: str, image: Path, writes: list[tuple[int, int]], work: Path) -> tuple[float, float, float]:
    """(b): download the whole image object, patch it, upload it whole. Returns the three times."""
    local = work / "rewrite.img"
    t0 = time.perf_counter()
    client.download_file(BUCKET, key, str(local))
    t1 = time.perf_counter()
    with open(local, "r+b") as f, open(image, "rb") as src:
        for off, n in writes:
            os.pwrite(f.fileno(), os.pread(src.fileno(), n, off), off)
        f.flush()
    t2 = time.perf_counter()
    client.upload_file(str(local), BUCKET, key + ".new")
    t3 = time.perf_counter()
    client.delete_object(Bucket=BUCKET, Key=key + ".new")
    local.unlink()
    return t1 - t0, t2 - t1, t3 - t2


# ------------------------------------------------------------------------ checking


def check_sample(store: Store, cfg: MachineConfig, image: Path, writes: list[tuple[int, int]], samples: int,
                 rng: np.random.Generator) -> tuple[int, int, int]:
    """``samples`` random ranges (4 KiB..1 MiB, any alignment) of the newest point against the
    image: half overlapping a write, half anywhere. Returns (checked, mismatched, bytes)."""
    disk = cfg.disks[0]
    cat = load_catalog(store, cfg.name, disk.name, disk.size)
    reader = point_reader(store, cat, find_point(cat))
    bad = checked = 0
    with open(image, "rb") as img:
        for i in range(samples):
            n = int(min(MiB, 4096 * 2 ** rng.uniform(0, 8)))
            if i % 2 == 0:
                off, wn = writes[int(rng.integers(len(writes)))]
                at = max(0, min(disk.size - n, off + int(rng.integers(-n + 1, wn))))
            else:
                at = int(rng.integers(0, disk.size - n + 1))
            if reader.read(at, n) != os.pread(img.fileno(), n, at):
                bad += 1
            checked += n
    return samples, bad, checked


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=16.0, help="disk size (default 16)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the disk overwritten (default 0.01)")
    ap.add_argument("--fill", type=float, default=0.25, help="fraction of the disk holding data (default 0.25)")
    ap.add_argument("--workers", type=int, default=REF_THREADS, help="threads running part jobs (default 4)")
    ap.add_argument("--samples", type=int, default=200, help="ranges of the new point checked (default 200)")
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
        with seaweedfs(root / "seaweedfs") as server:
            return run(args, root, size, server)


def run(args: argparse.Namespace, root: Path, size: int, server: SeaweedFS) -> int:
    rng = np.random.default_rng(args.seed)
    os.environ.update(server.env())
    client = server.client(max_pool_connections=16)
    store = CountingStore(open_store(f"s3://{BUCKET}/bench"))
    image = root / "disk.img"
    state = root / "state"
    image_key = "reference/disk.img"

    # -- set-up: the disk, its first point, the image as one object ------------------------
    t = time.perf_counter()
    data = make_image(image, size, args.fill, rng)
    console.print(f"image: {size / 2**30:.2f} GiB, {data / 2**20:,.0f} MiB of data, made in {time.perf_counter() - t:.1f} s")
    cfg = MachineConfig(name=MACHINE, disks=[DiskSpec(name=DISK, path=str(image), size=size,
                                                       block_size=DEFAULT_BLOCK_SIZE)])
    save_machine(store, cfg, create_only=True)
    uploading = ThreadPoolExecutor(1).submit(client.upload_file, str(image), BUCKET, image_key)
    t = time.perf_counter()
    shipped, logs = protect(store, cfg, state)
    t_ship = time.perf_counter() - t
    first, first_s, _ = consolidate(store, cfg, args.workers)
    console.print(f"first point {first.point}: agent shipped {shipped / 2**20:,.0f} MiB in {logs} log(s) in "
                  f"{t_ship:.1f} s; {first.chunks_written} chunks in {first.packs_written} packs in {first_s:.1f} s")
    t = time.perf_counter()
    uploading.result()
    console.print(f"image uploaded whole for (b) ({time.perf_counter() - t:.1f} s more after the first point)")

    # -- the change ---------------------------------------------------------------------
    writes = random_writes(image, size, args.changed, rng)
    written = sum(n for _, n in writes)
    distinct = distinct_bytes(writes, size)
    blocks = touched_blocks(writes, cfg.disks[0].block_size)
    t = time.perf_counter()
    shipped, logs = protect(store, cfg, state)
    console.print(f"changed: {len(writes)} writes, {written / 2**20:.1f} MiB ({distinct / 2**20:.1f} MiB distinct, "
                  f"{blocks} chunks touched); agent shipped {shipped / 2**20:.1f} MiB in {logs} log(s), ingested, "
                  f"in {time.perf_counter() - t:.1f} s")

    # -- ours ---------------------------------------------------------------------------
    profile = cProfile.Profile() if args.profile else None
    store.reset()
    ours, wall, job_profiles = consolidate(store, cfg, args.workers, profile)
    up, down, puts = Counter(store.uploaded), Counter(store.read), Counter(store.puts)
    uploaded = up["packs"] + up["pages"] + up["root"]
    console.print(f"hotspare: {wall:.2f} s, point {ours.point}, {ours.parts} part job(s) on {args.workers} thread(s)")
    if profile:
        s = io.StringIO()
        s.write("== consolidate_disk, main thread (waits for the part jobs in run_jobs)\n")
        pstats.Stats(profile, stream=s).sort_stats("cumulative").print_stats(30)
        if job_profiles:
            s.write(f"== the {len(job_profiles)} part job(s), added (each on its own thread)\n")
            pstats.Stats(*job_profiles, stream=s).sort_stats("cumulative").print_stats(30)
            pstats.Stats(*job_profiles, stream=s).sort_stats("tottime").print_stats(20)
        console.print(s.getvalue(), markup=False, highlight=False)

    # -- references ---------------------------------------------------------------------
    a = ref_upload(client, written, rng)
    console.print(f"(a) boto3 multipart upload of {written / 2**20:.1f} MiB: {a:.2f} s")
    b_down, b_patch, b_up = ref_rewrite(client, image_key, image, writes, root)
    b = b_down + b_patch + b_up
    console.print(f"(b) full rewrite: {b:.2f} s (download {b_down:.2f}, patch {b_patch:.2f}, upload {b_up:.2f})")

    checked, bad, checked_bytes = check_sample(store, cfg, image, writes, args.samples, rng)

    # -- report -------------------------------------------------------------------------
    def mark(ok: bool) -> str:
        return "[green]met[/green]" if ok else "[red]not met[/red]"

    console.print(f"\n[bold]consolidation[/bold]: {size / 2**30:.2f} GiB disk, {args.fill:.0%} data, "
                  f"{args.changed:.2%} overwritten by {len(writes)} writes of 4 KiB..1 MiB "
                  f"({written / 2**20:.1f} MiB), SeaweedFS on loopback")
    t1 = Table()
    for col, just in [("measure", "left"), ("hotspare", "right"), ("reference", "right"), ("ratio", "right"),
                      ("target", "right"), ("", "left")]:
        t1.add_column(col, justify=just)  # type: ignore[arg-type]
    rbytes, ra, rb = uploaded / written, wall / a, b / wall
    t1.add_row("bytes uploaded (packs + pages + root) vs bytes written", f"{uploaded / 2**20:,.1f} MiB",
               f"{written / 2**20:,.1f} MiB", f"{rbytes:.2f}", f"<= {TARGET_BYTES}", mark(rbytes <= TARGET_BYTES))
    t1.add_row("wall time vs (a) boto3 upload of the written bytes", f"{wall:.2f} s", f"{a:.2f} s",
               f"ours/(a) = {ra:.2f}", f"<= {TARGET_A}", mark(ra <= TARGET_A))
    t1.add_row("wall time vs (b) download + patch + upload of the image", f"{wall:.2f} s", f"{b:.2f} s",
               f"(b)/ours = {rb:.1f}", f">= {TARGET_B:g}", mark(rb >= TARGET_B))
    console.print(t1)

    t2 = Table(title="details")
    t2.add_column("")
    t2.add_column("value", justify="right")
    t2.add_row("bytes written (distinct); chunks the writes touch",
               f"{written / 2**20:,.1f} MiB ({distinct / 2**20:,.1f} MiB); {blocks} x 64 KiB = {blocks / 16:,.1f} MiB")
    t2.add_row("uploaded: packs / pages / root (objects)",
               f"{up['packs'] / 2**20:,.1f} MiB ({puts['packs']}) / {up['pages'] / 2**20:,.1f} MiB ({puts['pages']}) / "
               f"{up['root'] / 1024:,.1f} KiB ({puts['root']})")
    t2.add_row("uploaded besides (catalog)", f"{up['other'] / 1024:,.1f} KiB ({puts['other']})")
    t2.add_row("engine's own count of bytes uploaded", f"{ours.bytes_uploaded / 2**20:,.1f} MiB")
    t2.add_row("read: logs / previous chunks (packs) / index / other",
               f"{down['logs'] / 2**20:,.1f} / {down['packs'] / 2**20:,.1f} / {down['pages'] / 2**20 + down['root'] / 2**20:,.1f}"
               f" / {down['other'] / 2**20:,.1f} MiB")
    t2.add_row("engine's own count of bytes read", f"{ours.bytes_read / 2**20:,.1f} MiB")
    t2.add_row("chunks written / deduplicated / zero", f"{ours.chunks_written} / {ours.chunks_deduplicated} / {ours.chunks_zero}")
    t2.add_row("packs written / pages written", f"{ours.packs_written} / {ours.pages_written}")
    t2.add_row("part jobs / threads", f"{ours.parts} / {args.workers}")
    t2.add_row("(a) parts in flight / part size", f"{REF_THREADS} / {REF_PART // MiB} MiB")
    t2.add_row("(b) download / patch / upload", f"{b_down:.2f} / {b_patch:.2f} / {b_up:.2f} s")
    t2.add_row(f"check: {checked} random ranges of the new point ({checked_bytes / 2**20:.1f} MiB) vs the image",
               "[green]all equal[/green]" if bad == 0 else f"[red]{bad} differ[/red]")
    console.print(t2)
    console.print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    store.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
