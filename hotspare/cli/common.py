"""What every command group shares: the typer app, the consoles, the common options, and
the few steps several commands take (open the store, import the flows, report a flow's end)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from hotspare.errors import HotspareError, LostRace, MachineLive, NotApproved, Refused

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hotspare: a running-ready virtual twin for every protected machine.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[Optional[str], typer.Option("--store", envvar="HOTSPARE_STORE", show_envvar=True,
                                                 help="store URL: a directory, file://PATH or s3://BUCKET/PREFIX "
                                                      "(default ./.hotspare/store)")]
MachineArg = Annotated[str, typer.Argument(help="machine name")]
VmDirOpt = Annotated[Optional[str], typer.Option("--vm-dir", envvar="HOTSPARE_VM_DIR",
                                                 help="where VMs keep their files (default ./.hotspare/vms)")]
EXIT_STALLED = 3  # status, ingest: a machine's protection is stalled (hotspare.stall)

NO_SERVER_HINT = ("no Prefect server configured: this command starts a temporary one (seconds of start-up, and its "
                  "runs vanish with it). To skip that and see the runs in the UI, point it at a running server: "
                  "`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")


class ExpectedFaultFilter:
    """Drops the traceback of an expected fault from console log records: the CLI prints
    it in one line at the end; the run's logs in the Prefect API keep the full record."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HotspareError):
            record.exc_info = None
            record.exc_text = None
            record.msg = record.getMessage().splitlines()[0]
            record.args = ()
        return True


def load_flows() -> None:
    """Import the flows package (and so Prefect), with its console logging quieted; says how
    to avoid the temporary server when no server is configured."""
    import logging

    import flows  # noqa: F401
    from tasks.events import prefect_api_configured

    if not prefect_api_configured():
        err_console.print(f"note: {NO_SERVER_HINT}", markup=False, highlight=False)
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # otherwise done at the first flow run, after we could add the filter

    seen = set()
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and id(h) not in seen:
                seen.add(id(h))
                h.addFilter(ExpectedFaultFilter())


def open_store(url: str | None):
    from hotspare.store import open_store as open_url

    return open_url(url)


def agent_state_dir(state_dir: str | None, machine: str) -> Path:
    root = state_dir or os.environ.get("HOTSPARE_AGENT_STATE") or "./.hotspare/agent"
    return Path(root) / machine


def stop_on_signals(worker, unit: str) -> None:
    """Ctrl-C or SIGTERM asks ``worker`` to stop after its current ``unit`` (never halfway
    through one); a second Ctrl-C aborts."""
    def on_signal(signum, frame):
        if worker.stop_requested:
            raise KeyboardInterrupt
        worker.stop_requested = True
        err_console.print(f"stopping after the current {unit} (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def parse_at(at: str | None):
    from hotspare.consolidate.export import parse_at as parse

    return parse(at)


def report_flow(state, what: str) -> None:
    """A flow's final state in one line; an error exits without a traceback, with the
    code of its outcome (README, "Exit codes")."""
    if state.is_completed():
        result = state.result()
        console.print(result.message if hasattr(result, "message") else str(result))
        return
    if state.is_cancelled():
        outcome = getattr(state.result(raise_on_failure=False), "outcome", None)
        error = {"refused": MachineLive if what == "failover" else Refused, "rejected": NotApproved,
                 "timed-out": NotApproved, "lost-race": LostRace}.get(outcome, HotspareError)
        raise error(state.message or f"{what} cancelled")
    state.result()  # re-raises the flow's error, printed in one line by main()
