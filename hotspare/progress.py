"""Rich progress bars for long work (a first pass over a big disk, an export)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def bar_factory(console: Console) -> Callable[[str, int], Callable[[int], None]]:
    """A factory the agent calls per disk: it returns the callback that advances the bar."""

    def start(label: str, total: int) -> Callable[[int], None]:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        task = progress.add_task(label, total=total)
        progress.start()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress.update(task, advance=n)
            if done >= total:
                progress.stop()

        return advance

    return start
