"""``hotspare demo`` and ``hotspare demo-disk``: the whole cycle on a demo machine, and its
bootable disk (the cycle itself is :mod:`hotspare.cli.demo_run`, imported when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hotspare.cli.common import app, console


@app.command("demo-disk")
def demo_disk(path: Annotated[Path, typer.Argument(help="image file to write")],
              size: Annotated[int, typer.Option(help="size in MiB")] = 64) -> None:
    """Build the bootable demo machine's disk image (Debian kernel, busybox, syslinux)."""
    from hotspare.demodisk import build_demo_disk

    build_demo_disk(path, size)
    console.print(f"built {path} ({size} MiB): boots from its own boot loader and writes a counter to partition 2")


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(help="where the demo keeps its store, images and state")] = "./.hotspare",
    size_mib: Annotated[int, typer.Option(help="size of the demo disk image, MiB")] = 64,
) -> None:
    """Run the whole cycle on a demo machine with embedded defaults."""
    from hotspare.cli.demo_run import run_demo

    run_demo(Path(workdir), size_mib=size_mib)
