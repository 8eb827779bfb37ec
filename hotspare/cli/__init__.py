"""The ``hotspare`` command line: one module per command group, on one typer app.

Terms:
- command group: the commands of one concern, in one module: :mod:`~hotspare.cli.machines`
  (protect, status), :mod:`~hotspare.cli.agent` (agent, daemon), :mod:`~hotspare.cli.replica`
  (ingest, consolidate, points, check, export, serve), :mod:`~hotspare.cli.recovery`
  (failover, failback, drill), :mod:`~hotspare.cli.vm` (vm capture, vm stop),
  :mod:`~hotspare.cli.deploy` and :mod:`~hotspare.cli.demo`; what they share is
  :mod:`~hotspare.cli.common`.
- flow command: a command that runs a Prefect flow (ingest, consolidate, failover, failback,
  drill, demo). The CLI is the only part of ``hotspare`` that imports ``flows``, ``tasks``,
  ``blocks`` or ``deployments``, always inside the command, so the agent and the read-only
  commands start without Prefect.
- expected fault: a :class:`~hotspare.errors.HotspareError`. It prints one line,
  ``error: ...``, and exits 1, or its outcome's code (README, "Exit codes"); usage errors
  exit 2; ``status`` and ``ingest`` exit 3 (EXIT_STALLED) when a machine's protection is
  stalled, with one line per stall saying why (see :mod:`hotspare.stall`).

Every command takes ``--store URL`` (default: ``HOTSPARE_STORE``, else ``./.hotspare/store``).
"""

from __future__ import annotations

import atexit
import os
import sys

import typer

# Each command group adds its commands to the app; in this order they are listed in --help.
from hotspare.cli import machines, agent, replica, recovery, vm, deploy, demo  # noqa: F401, I001
from hotspare.cli.common import app, err_console
from hotspare.errors import HotspareError, OutcomeError

# Click's usage-error base class, as typer raises it: typer vendors its own click, and
# exports only the subclass BadParameter.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run() -> int:
    """Run the command in sys.argv; returns its exit code (expected faults print one line)."""
    # Prefect, when a command runs a flow: no telemetry from a machine that may have no
    # route out, and no temporary-server chatter beyond warnings.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL", "WARNING")
    # A temporary server on a loaded machine can take more than Prefect's 20 s to answer
    # (seen here: "Timed out while attempting to connect to ephemeral Prefect API server").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    try:
        rv = app(standalone_mode=False)  # returns the exit code of a typer.Exit
        return rv if isinstance(rv, int) else 0
    except HotspareError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        return err.exit_code if isinstance(err, OutcomeError) else 1
    except (typer.Exit, SystemExit) as ex:
        code = getattr(ex, "exit_code", None)
        if code is None:
            code = getattr(ex, "code", 0)
        return code if isinstance(code, int) else 1 if code else 0
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except _CLICK_ERROR as err:  # bad arguments: click's usage message, no traceback
        err.show()
        return err.exit_code


def main() -> None:
    """The ``hotspare`` command: run, do what Python owes at exit, then end the process
    without the interpreter's native teardown. pyarrow's C++ thread pools, destroyed during
    finalisation while a worker is still alive, abort a process that has finished its work
    ("terminate called without an active exception", exit -6; apache/arrow#34314, seen in
    CI on ``hotspare check``), which would turn a true exit code into a crash."""
    import threading

    code = run()
    try:
        getattr(threading, "_shutdown", lambda: None)()  # joins non-daemon threads, as exit does
        atexit._run_exitfuncs()  # Prefect's servers and log/event queues, logging's flush
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(code)


__all__ = ["app", "main", "run"]
