"""``hotspare demo``: the main job on embedded defaults.

A demo disk image plays the protected physical machine. The demo protects it, ships its
seed, writes to it from outside with qemu-io (as any program on the machine would), ships
the changes, ingests them through the Prefect flow, and checks that the accepted logs,
replayed over zeros, equal the image byte for byte.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hotspare.capture.agent import Agent
from hotspare.catalog import load_catalog
from hotspare.errors import HotspareError
from hotspare.machine import MachineConfig, load_machine, parse_disk_arg, save_machine
from hotspare.replay import replay_catalog
from hotspare.store import open_store

MACHINE = "demo"


def _qemu_io(image: Path, *commands: str) -> None:
    if not shutil.which("qemu-io"):
        raise HotspareError("qemu-io is missing: install Debian's qemu-utils (scripts/setup.sh does)")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def _make_image(path: Path, size_mib: int) -> None:
    """A disk with some content: random data in a few places, the rest zeros."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        for off in range(0, size_mib << 20, 16 << 20):
            f.seek(off)
            f.write(rng.integers(0, 256, 2 << 20, dtype=np.uint8).tobytes())


def run_demo(workdir: Path, *, size_mib: int, console: Console) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    store = open_store(str(workdir / "store"))
    image = workdir / "demo-machine.img"
    state = workdir / "agent" / MACHINE
    if not image.exists():
        _make_image(image, size_mib)
    console.rule("[bold]hotspare demo")
    console.print(f"store: {store.url}\nprotected machine '{MACHINE}': disk image {image}")
    try:
        cfg = load_machine(store, MACHINE)
    except HotspareError:
        cfg = MachineConfig(name=MACHINE, disks=[parse_disk_arg(f"root={image}")])
        save_machine(store, cfg, create_only=True)
    rows = []
    with Agent(store, cfg, state) as agent:
        t = time.monotonic()
        first = agent.cycle().disks[0]
        rows.append(("agent pass (seed or catch-up)", first, time.monotonic() - t))
        # Outside writes, as programs on the machine would make them.
        _qemu_io(image, "write -P 0x5a 1M 64k", "write -P 0xa5 37M 300k", "write -z 16M 1M",
                 f"write -P 0x11 {size_mib - 1}M 4k")
        t = time.monotonic()
        second = agent.cycle().disks[0]
        rows.append(("agent pass after qemu-io writes", second, time.monotonic() - t))

    from flows.ingest import ingest

    result = ingest(machine=MACHINE, store=store.url)
    d = result.disks[0]
    catalog = load_catalog(store, MACHINE, "root", cfg.disks[0].size)
    replica = workdir / "replica.raw"
    replay_catalog(store, catalog, replica)
    same = _same_bytes(image, replica)

    table = Table(title="what happened")
    for col in ("step", "logs", "extents", "data bytes", "zero bytes", "seconds"):
        table.add_column(col)
    for name, r, secs in rows:
        table.add_row(name, str(len(r.logs)), str(r.extents), f"{r.data_bytes:,}", f"{r.zero_bytes:,}", f"{secs:.2f}")
    console.print(table)
    console.print(f"ingest: accepted {len(d.accepted)} log(s), rejected {len(d.rejected)}; "
                  f"catalog v{d.catalog_version}, applied up to seq {d.applied_seq}")
    console.print(f"replica (accepted logs replayed over zeros) equals the disk image: "
                  f"{'[green]yes[/]' if same else '[red]NO[/]'}")
    console.print("Prefect UI: the 'ingest' flow run and its table artifact "
                  "(run `prefect server start` and set PREFECT_API_URL to keep them)")
    if not same:
        raise HotspareError("the replica differs from the protected disk")


def _same_bytes(a: Path, b: Path, chunk: int = 64 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True
