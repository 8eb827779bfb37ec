"""Scan-tracker throughput against xxhsum reading the same file, measured in the same run.

    .venv/bin/python bench/capture.py [--size-gib 4] [--changed 0.01] [--workdir DIR] [--keep]

Builds a raw image (random, non-zero content with a few zero holes, every 64 KiB block
distinct), seeds it with a first agent pass into a local store, overwrites a fraction of its
blocks at random with random bytes (``--writes qemu-io``: a fill pattern with qemu-io
instead), reads the image once so it sits in the page cache for every contender, then times,
best of ``--runs``:

- scan: ``hotspare.capture.scan.scan`` over the image against the seed's hash map (no shipping);
- agent cycle: scan + writing the extent logs + upload to the local store + checkpoint;
- ``xxhsum -H3`` (xxh3-64, the hash the scan uses, over the whole file) and ``xxhsum`` (its
  default, xxh64) as the references.

Prints the table and the bytes shipped against the bytes changed. Target: scan >= 0.8 of
``xxhsum -H3``. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import scratch  # noqa: E402
from hotspare import layout  # noqa: E402
from hotspare.capture.agent import Agent  # noqa: E402
from hotspare.capture.scan import scan  # noqa: E402
from hotspare.capture.state import StateDir  # noqa: E402
from hotspare.extentlog.schema import MAX_EXTENT  # noqa: E402
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, save_machine  # noqa: E402
from hotspare.store import open_store  # noqa: E402

BS = DEFAULT_BLOCK_SIZE
PIECE = 64 << 20  # the random pattern repeated through the image
HOLE = 1 << 20  # zero holes are this size
HOLE_FRACTION = 0.03
TARGET = 0.8
MACHINE, DISK = "bench", "root"

console = Console()


def make_image(path: Path, size: int, rng: np.random.Generator) -> int:
    """A sparse raw image: one random 64 MiB pattern repeated, with the first 8 bytes of every
    block replaced by its block number so no two blocks are alike, and ~3% of 1 MiB pieces
    left as holes. Returns the bytes of data (non-hole) written."""
    pattern = np.frombuffer(rng.bytes(PIECE), dtype=np.uint8)
    piece = np.empty(PIECE, dtype=np.uint8)
    stamps = piece.view(np.uint64).reshape(-1, BS // 8)[:, 0]  # first word of each block
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, PIECE):
            n = min(PIECE, size - off)
            piece[:] = pattern
            stamps[:] = np.arange(off // BS, off // BS + PIECE // BS, dtype=np.uint64) + 1
            keep = rng.random(-(-n // HOLE)) >= HOLE_FRACTION
            # one write per run of non-hole 1 MiB pieces
            edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
            for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
                os.pwrite(f.fileno(), memoryview(piece)[a * HOLE:min(b * HOLE, n)], off + a * HOLE)
                data += min(b * HOLE, n) - a * HOLE
    return data


def change_blocks(path: Path, size: int, fraction: float, rng: np.random.Generator,
                  writer: str) -> np.ndarray:
    """Overwrite ``fraction`` of the blocks, chosen at random, from outside hotspare: with
    fresh random bytes (``pwrite``), or with a one-byte fill pattern (``qemu-io``, which can
    write nothing else per block; zstd then squeezes the logs to almost nothing, so the
    upload costs less than it would for real writes). Returns the block numbers."""
    nblocks = size // BS
    k = max(1, round(nblocks * fraction))
    blocks = np.sort(rng.choice(nblocks, size=k, replace=False))
    if writer == "qemu-io":
        qemu_io = shutil.which("qemu-io")
        if qemu_io is None:
            raise SystemExit("qemu-io is missing: apt-get install qemu-utils, or use --writes pwrite")
        cmds = [f"write -P {int(p)} {int(b) * BS} {BS}" for b, p in zip(blocks, rng.integers(1, 256, size=k))]
        for i in range(0, len(cmds), 2000):
            args = [qemu_io, "-f", "raw"]
            for c in cmds[i:i + 2000]:
                args += ["-c", c]
            subprocess.run([*args, str(path)], check=True, capture_output=True)
        return blocks
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in blocks.tolist():
            os.pwrite(fd, rng.bytes(BS), b * BS)
    finally:
        os.close(fd)
    return blocks


def warm(path: Path) -> float:
    """Read the file once so that every contender finds it in the page cache."""
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def cache_ok(size: int) -> bool:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", 0) > size * 2  # rough: it counts the image's own cached pages
    except (OSError, ValueError):
        return True


def _timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="image size (default 4)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of 64 KiB blocks overwritten (default 0.01)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where the image, state and store go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--runs", type=int, default=3, help="runs per contender; the best counts (default 3)")
    ap.add_argument("--writes", choices=["pwrite", "qemu-io"], default="pwrite",
                    help="how blocks are changed: random bytes with pwrite (default), or a fill pattern with qemu-io")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    args = ap.parse_args()

    xxhsum = shutil.which("xxhsum")
    if xxhsum is None:
        console.print("[red]xxhsum is missing: apt-get install xxhash[/red]")
        return 2
    size = int(args.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    if size <= 0 or not 0 < args.changed <= 1:
        console.print("[red]--size-gib must be at least 1 MiB and --changed in (0, 1][/red]")
        return 2

    with scratch(args.workdir, "capture", args.keep, console) as root:
        return run(args, root, size, xxhsum)


def run(args: argparse.Namespace, root: Path, size: int, xxhsum: str) -> int:
    rng = np.random.default_rng(args.seed)
    image = root / "disk.img"
    store_dir, state_dir, snap_dir = root / "store", root / "state", root / "state.snap"

    t = time.perf_counter()
    data = make_image(image, size, rng)
    console.print(f"image: {size / 2**30:.2f} GiB, {data / size:.1%} data, built in {time.perf_counter() - t:.1f} s")

    store = open_store(str(store_dir))
    cfg = MachineConfig(name=MACHINE, disks=[DiskSpec(name=DISK, path=str(image), size=size, block_size=BS)])
    save_machine(store, cfg, create_only=True)
    t = time.perf_counter()
    with Agent(store, cfg, state_dir, tracker="scan") as agent:
        seed = agent.cycle().disks[0]
    console.print(f"seed: shipped {seed.data_bytes / 2**20:.0f} MiB in {len(seed.logs)} logs "
                  f"in {time.perf_counter() - t:.1f} s")

    blocks = change_blocks(image, size, args.changed, rng, args.writes)
    changed = len(blocks) * BS
    console.print(f"changed {len(blocks)} of {size // BS} blocks ({changed / 2**20:.1f} MiB) with {args.writes}")

    shutil.copytree(state_dir, snap_dir)
    seed_hashes = StateDir(snap_dir).load(DISK).hashes
    seed_keys = {o.key for o in store.list(layout.logs_prefix(MACHINE, DISK, 0))}
    if not cache_ok(size):
        console.print("[yellow]warning: too little free memory to keep the image cached: "
                      "the figures will include disk reads[/yellow]")
    t = warm(image)
    console.print(f"page cache warmed: {size / t / 1e9:.2f} GB/s")

    # -- contenders ----------------------------------------------------------------------
    scan_out: dict[str, int] = {}

    def scan_only() -> None:
        hashes = seed_hashes.copy()
        shipped = runs = 0
        for chunk in scan(str(image), hashes, BS, size, max_run=MAX_EXTENT):
            for r in chunk.runs:
                shipped += r.length
                runs += 1
        scan_out.update(bytes=shipped, runs=runs)

    agent_out: dict[str, int] = {}

    def agent_cycle() -> None:
        shutil.rmtree(state_dir)
        shutil.copytree(snap_dir, state_dir)
        for o in list(store.list(layout.logs_prefix(MACHINE, DISK, 0))):
            if o.key not in seed_keys:
                store.delete(o.key)
        t = time.perf_counter()
        with Agent(store, cfg, state_dir, tracker="scan") as agent:
            r = agent.cycle().disks[0]
        agent_out["seconds"] = min(agent_out.get("seconds", float("inf")), time.perf_counter() - t)
        agent_out.update(data=r.data_bytes, zero=r.zero_bytes, extents=r.extents, logs=len(r.logs),
                         log_bytes=sum(store.size(k) for k in r.logs))

    def xxh(*flags: str) -> Callable[[], None]:
        def go() -> None:
            # stderr captured: xxhsum draws a progress line there
            subprocess.run([xxhsum, *flags, str(image)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        return go

    contenders: list[tuple[str, Callable[[], None]]] = [
        ("xxhsum -H3 (xxh3-64)", xxh("-H3")),
        ("hotspare scan", scan_only),
        ("hotspare agent cycle", agent_cycle),
        ("xxhsum (xxh64)", xxh()),
    ]
    times = {name: float("inf") for name, _ in contenders}
    for i in range(args.runs):  # interleaved, so background load hits every contender alike
        for name, fn in contenders[i % len(contenders):] + contenders[:i % len(contenders)]:
            if name == "hotspare agent cycle":
                fn()  # its reset (state restore, log deletion) is not part of the time
                times[name] = agent_out["seconds"]
            else:
                times[name] = min(times[name], _timed(fn))

    ref = times["xxhsum -H3 (xxh3-64)"]
    console.print(f"\n[bold]scan rate[/bold]: {size / 2**30:.2f} GiB image, {args.changed:.2%} of blocks changed, "
                  f"page cache warm, best of {args.runs}")
    table = Table()
    table.add_column("contender")
    table.add_column("seconds", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("ratio to xxhsum -H3", justify="right")
    for name, _ in contenders:
        s = times[name]
        ratio = ref / s
        style = None
        if name == "hotspare scan":
            style = "green" if ratio >= TARGET else "red"
        table.add_row(name, f"{s:.3f}", f"{size / s / 1e9:.2f}", f"{ratio:.2f}", style=style)
    console.print(table)

    console.print("[bold]bytes shipped vs changed[/bold]")
    ship = Table()
    ship.add_column("")
    ship.add_column("bytes", justify="right")
    ship.add_column("MiB", justify="right")
    ship.add_row("changed (written blocks)", f"{changed:,}", f"{changed / 2**20:.1f}")
    ship.add_row("scan: changed runs found", f"{scan_out['bytes']:,}", f"{scan_out['bytes'] / 2**20:.1f}")
    ship.add_row("agent: data shipped", f"{agent_out['data']:,}", f"{agent_out['data'] / 2**20:.1f}")
    ship.add_row("agent: zeros shipped", f"{agent_out['zero']:,}", f"{agent_out['zero'] / 2**20:.1f}")
    ship.add_row(f"agent: {agent_out['logs']} log(s), {agent_out['extents']} extents, in the store",
                 f"{agent_out['log_bytes']:,}", f"{agent_out['log_bytes'] / 2**20:.1f}")
    console.print(ship)

    ratio = ref / times["hotspare scan"]
    verdict = "[green]met[/green]" if ratio >= TARGET else "[red]not met[/red]"
    console.print(f"scan / xxhsum -H3 = {ratio:.2f} (target >= {TARGET}): {verdict}; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if agent_out["data"] + agent_out["zero"] != changed or scan_out["bytes"] != changed:
        console.print("[yellow]warning: bytes shipped differ from bytes changed[/yellow]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
