"""The work directory every benchmark uses: its own subdirectory of ``--workdir``, emptied
before the run and removed after it (unless ``--keep``); ``--workdir`` itself goes only if
nothing else is left in it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console


@contextmanager
def scratch(workdir: Path, name: str, keep: bool, console: Console) -> Iterator[Path]:
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        if keep:
            console.print(f"work files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            try:
                workdir.rmdir()
            except OSError:
                pass
