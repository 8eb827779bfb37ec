"""Export and serve throughput of a point, against qemu on a local raw file holding the same
bytes, measured in the same run.

    .venv/bin/python bench/export.py [--size-gib 4] [--fill 0.25] [--workdir DIR] [--keep] [--profile]

Set-up (not measured): starts SeaweedFS (``weed mini``, as bench/consolidate.py), makes a
sparse raw image with ``--fill`` of its 1 MiB pieces random, protects it into a local store
and into a SeaweedFS store (one agent cycle, an ingest and a consolidation each).

Measured, each alone, one after the other (MB/s: the disk's virtual bytes per second):

- ``export_point`` to raw and to vhd (dynamic), from the local store and from SeaweedFS,
  against ``qemu-img convert`` of the raw file to raw and to vpc (dynamic VHD).
- ``hotspare serve`` (:func:`hotspare.replica.serve.start_server`: nbdkit and hotspare's
  plugin) of the point in each store, read by ``qemu-img convert -O raw`` from
  ``nbd+unix:///?socket=...``, against ``qemu-nbd --read-only`` serving the raw file, read
  the same way.

Every output is compared with the image afterwards (``qemu-img compare``, not timed). The
image, the stores' objects and SeaweedFS's volumes are all in the page cache: this measures
the reading code, not a disk. Nothing is asserted: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
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

from bench.consolidate import (  # noqa: E402
    BUCKET,
    DISK,
    MACHINE,
    make_image,
    protect,
    seaweedfs,
    threaded_jobs,
)
from bench.scratch import scratch  # noqa: E402
from hotspare.catalog import load_catalog  # noqa: E402
from hotspare.consolidate.export import export_point, find_point  # noqa: E402
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, save_machine  # noqa: E402
from hotspare.replica.consolidate import consolidate_disk  # noqa: E402
from hotspare.replica.serve import nbd_uri, start_server, stop_server  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from hotspare.store.base import Store  # noqa: E402
from tests.servers import SeaweedFS  # noqa: E402

MiB = 1 << 20
console = Console(width=150)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def same(out: Path, fmt: str, image: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(out), str(image)], capture_output=True,
                       check=False)
    return r.returncode == 0


def wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not open {path}")
        time.sleep(0.05)


class Run:
    """The rows of the report: (name, seconds, output checked equal)."""

    def __init__(self, image: Path, size: int, work: Path, profile: cProfile.Profile | None) -> None:
        self.image, self.size, self.work, self.profile = image, size, work, profile
        self.rows: dict[str, tuple[float, bool]] = {}

    def measure(self, name: str, fmt: str, write: Callable[[Path], object], *, ours: bool = False) -> None:
        out = self.work / f"out.{fmt}"
        out.unlink(missing_ok=True)
        if ours and self.profile:
            self.profile.enable()
        seconds = timed(lambda: write(out))
        if ours and self.profile:
            self.profile.disable()
        ok = same(out, fmt, self.image)
        out.unlink()
        self.rows[name] = (seconds, ok)
        console.print(f"{name}: {seconds:.2f} s, {self.size / seconds / 1e6:,.0f} MB/s"
                      f"{'' if ok else ' [red]OUTPUT DIFFERS[/red]'}")


def serve_copy(store_url: str, root_key: str, work: Path, env: dict[str, str]) -> Callable[[Path], None]:
    def copy(out: Path) -> None:
        sock = work / "serve.sock"
        proc = start_server(store_url, root_key, sock, log=work / "nbdkit.log", env=env)
        try:
            qemu_img("convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out))
        finally:
            stop_server(proc.pid)
    return copy


def qemu_nbd_copy(image: Path, work: Path) -> Callable[[Path], None]:
    def copy(out: Path) -> None:
        sock = work / "qemu-nbd.sock"
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen(["qemu-nbd", "--read-only", "--format=raw", "--persistent", f"--socket={sock}",
                                 str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(sock, proc, "qemu-nbd")
            qemu_img("convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="disk size (default 4)")
    ap.add_argument("--fill", type=float, default=0.25, help="fraction of the disk holding data (default 0.25)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where SeaweedFS, the image, the stores and the outputs go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--seed", type=int, default=2, help="random seed")
    ap.add_argument("--profile", action="store_true", help="cProfile hotspare's exports, print the top")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30)) // MiB * MiB
    if size < 16 * MiB or not 0 <= args.fill <= 1:
        console.print("[red]--size-gib must be at least 16 MiB, --fill in [0, 1][/red]")
        return 2
    with scratch(args.workdir, "export", args.keep, console) as root:
        with seaweedfs(root / "seaweedfs") as server:
            return run(args, root, size, server)


def run(args: argparse.Namespace, root: Path, size: int, server: SeaweedFS) -> int:
    rng = np.random.default_rng(args.seed)
    os.environ.update(server.env())
    image = root / "disk.img"
    t = time.perf_counter()
    data = make_image(image, size, args.fill, rng)
    console.print(f"image: {size / 2**30:.2f} GiB, {data / 2**20:,.0f} MiB of data, made in {time.perf_counter() - t:.1f} s")
    cfg = MachineConfig(name=MACHINE, disks=[DiskSpec(name=DISK, path=str(image), size=size,
                                                       block_size=DEFAULT_BLOCK_SIZE)])
    stores: dict[str, tuple[Store, str]] = {}
    for kind, url in [("local", str(root / "store")), ("SeaweedFS", f"s3://{BUCKET}/export")]:
        t = time.perf_counter()
        store = open_store(url)
        save_machine(store, cfg, create_only=True)
        protect(store, cfg, root / f"state-{kind}")
        consolidate_disk(store, MACHINE, cfg.disks[0], cfg.policy, run_jobs=threaded_jobs(store, 4))
        stores[kind] = (store, url)
        console.print(f"{kind} store: point made in {time.perf_counter() - t:.1f} s")

    profile = cProfile.Profile() if args.profile else None
    r = Run(image, size, root, profile)
    r.measure("qemu-img convert raw -> raw", "raw", lambda out: qemu_img("convert", "-f", "raw", "-O", "raw",
                                                                        str(image), str(out)))
    r.measure("qemu-img convert raw -> vpc", "vpc", lambda out: qemu_img("convert", "-f", "raw", "-O", "vpc",
                                                                        str(image), str(out)))
    roots = {}
    for kind, (store, _url) in stores.items():
        cat = load_catalog(store, MACHINE, DISK, size)
        point = find_point(cat)
        roots[kind] = point.root
        for fmt, qfmt in [("raw", "raw"), ("vhd", "vpc")]:
            r.measure(f"export {fmt}, {kind} store", qfmt,
                      lambda out, store=store, cat=cat, point=point, fmt=fmt: export_point(store, cat, point, fmt, out),
                      ours=True)
    r.measure("qemu-nbd --read-only, qemu-img convert from NBD", "raw", qemu_nbd_copy(image, root))
    for kind, (_store, url) in stores.items():
        r.measure(f"hotspare serve, {kind} store, qemu-img convert from NBD", "raw",
                  serve_copy(url, roots[kind], root, server.env()))
    for store, _ in stores.values():
        store.close()
    if profile:
        s = io.StringIO()
        pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(25)
        console.print(s.getvalue(), markup=False, highlight=False)

    # -- report -------------------------------------------------------------------------
    console.print(f"\n[bold]export and serve[/bold]: {size / 2**30:.2f} GiB disk, {data / 2**20:,.0f} MiB of data "
                  f"({args.fill:.0%} of its 1 MiB pieces), everything in the page cache")
    table = Table()
    for col, just in [("hotspare", "left"), ("s", "right"), ("MB/s", "right"), ("reference (same run)", "left"),
                      ("s", "right"), ("MB/s", "right"), ("ours/reference (MB/s)", "right"), ("output", "left")]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    pairs = [(f"export {fmt}, {kind} store", ref) for kind in stores
             for fmt, ref in [("raw", "qemu-img convert raw -> raw"), ("vhd", "qemu-img convert raw -> vpc")]]
    pairs += [(f"hotspare serve, {kind} store, qemu-img convert from NBD", "qemu-nbd --read-only, qemu-img convert from NBD")
              for kind in stores]
    for ours, ref in pairs:
        (s, ok), (rs, rok) = r.rows[ours], r.rows[ref]
        table.add_row(ours, f"{s:.2f}", f"{size / s / 1e6:,.0f}", ref, f"{rs:.2f}", f"{size / rs / 1e6:,.0f}",
                      f"{rs / s:.2f}", "[green]equal[/green]" if ok and rok else "[red]differs[/red]")
    console.print(table)
    console.print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0 if all(ok for _, ok in r.rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
