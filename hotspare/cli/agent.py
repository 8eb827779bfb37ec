"""``hotspare agent`` and ``hotspare daemon``: the machine's side, capturing its disks' writes
(or, with ``--restore``, taking the failback's orders), and the storage daemon it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hotspare.cli.common import (MachineArg, StoreOpt, agent_state_dir, app, console, open_store,
                                 stop_on_signals)


@app.command()
def agent(
    machine: MachineArg,
    store: StoreOpt = None,
    once: Annotated[bool, typer.Option(help="run one cycle and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between cycles (cuts)")] = 0.5,
    cpu_limit: Annotated[Optional[float], typer.Option(
        envvar="HOTSPARE_CPU_LIMIT", help="at most this much of one CPU for the agent, averaged (0.5: half a CPU); "
        "under heavier writes the cuts come later instead. Default: no limit")] = None,
    state_dir: Annotated[Optional[str], typer.Option(envvar="HOTSPARE_AGENT_STATE",
                                                     help="agent state directory (default ./.hotspare/agent)")] = None,
    tracker: Annotated[str, typer.Option(envvar="HOTSPARE_TRACKER",
                                         help="qemu: serve the disks through qemu-storage-daemon and ship every "
                                              "write at crash-consistent cuts; scan: re-read the whole disk each "
                                              "cycle, from a frozen view when the disks are served (--serve, or "
                                              "the machine's daemon runs: crash-consistent points), else the live "
                                              "disk (points not crash-consistent)")] = "qemu",
    serve_dir: Annotated[Optional[str], typer.Option(help="where the daemon serves each disk: DIR/DISK.sock (NBD), "
                                                          "or DIR/DISK.img with --fuse (default STATE/MACHINE/serve)")] = None,
    fuse: Annotated[bool, typer.Option("--fuse", help="serve each disk as a FUSE file instead of NBD")] = False,
    serve: Annotated[bool, typer.Option("--serve", help="with --tracker scan: serve the disks through the storage "
                                        "daemon as the qemu tracker does, so each cycle scans a frozen view "
                                        "(crash-consistent points); the qemu tracker always serves")] = False,
    log_target_mib: Annotated[int, typer.Option(help="target size of one extent log, MiB")] = 64,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    restore: Annotated[bool, typer.Option("--restore", help="the machine returns after a failover: ship nothing, "
                                          "report divergence, apply the failback flow's orders")] = False,
    give_up_after: Annotated[float, typer.Option(help="exit 1 once the store has been unreachable this many "
                                                      "seconds (default 0: wait for it for ever)")] = 0.0,
) -> None:
    """Capture MACHINE's disks and ship their changes as extent logs, with a heartbeat per cycle.
    With --restore, fail back instead, then continue protecting in the new epoch.

    --tracker scan without --serve is for disks the agent cannot serve: it reads the live
    disk, and its points are marked not crash-consistent, unless the machine's storage
    daemon already serves the disks (then it scans frozen views, as with --serve)."""
    import math

    from hotspare.capture.agent import TRACKERS, Agent, CycleReport
    from hotspare.machine import load_machine
    from hotspare.progress import bar_factory

    if not (math.isfinite(interval) and interval > 0) or log_target_mib <= 0:
        raise typer.BadParameter("--interval and --log-target-mib must be positive numbers")
    if cpu_limit is not None and not (math.isfinite(cpu_limit) and 0.05 <= cpu_limit):
        raise typer.BadParameter(f"--cpu-limit {cpu_limit:g}: give a share of one CPU of at least 0.05 (0.5: half a CPU)")
    if not (math.isfinite(give_up_after) and give_up_after >= 0):
        raise typer.BadParameter("--give-up-after must be a number of seconds, 0 for never")
    if tracker not in TRACKERS:
        raise typer.BadParameter(f"--tracker {tracker!r}: use one of {', '.join(TRACKERS)}")
    if tracker == "scan" and not serve and (fuse or serve_dir):
        # Said, not guessed: serving a disk whose writers bypass the daemon would mark
        # fuzzy cuts consistent.
        raise typer.BadParameter("--fuse and --serve-dir say how the disks are served: with --tracker scan, "
                                 "add --serve to serve them")
    st = open_store(store)
    cfg = load_machine(st, machine)
    if interval * 2 > cfg.policy.heartbeat_window:
        raise typer.BadParameter(f"--interval {interval:g}s: heartbeats would come less than twice per heartbeat "
                                 f"window ({cfg.policy.heartbeat_window}s) and the live machine would be failed "
                                 "over; use a shorter interval or widen the window (hotspare protect --heartbeat-window)")
    emit = alarm = None
    try:
        from tasks.events import emit_heartbeat, machine_alarm, prefect_api_configured

        if prefect_api_configured():
            emit, alarm = emit_heartbeat, machine_alarm(machine)
    except ImportError:  # the agent runs without Prefect installed on the machine
        pass
    if restore and not _restore(st, cfg, agent_state_dir(state_dir, machine), emit, interval, once):
        return
    cfg = load_machine(st, machine)  # a failback to replacement disks changed their paths
    with Agent(st, cfg, agent_state_dir(state_dir, machine), tracker=tracker, serve_dir=serve_dir,  # type: ignore[arg-type]
               fuse=fuse, serve=serve, log_target=log_target_mib << 20, emit=emit, alarm=alarm, cpu_limit=cpu_limit,
               say=lambda s: console.print(f"{machine}/{s}", markup=False, highlight=False)) as ag:
        ag.progress = None if quiet or not console.is_terminal else bar_factory(console)
        stop_on_signals(ag, "log")

        def on_cycle(report: CycleReport) -> None:
            for d in report.disks:
                if tracker == "qemu" and not d.extents and not once:
                    continue  # a quiet cut: nothing to say twice a second
                what = "read" if tracker == "qemu" else "scanned"
                console.print(f"{machine}/{d.disk}: {what} {d.scanned_bytes >> 20} MiB in {d.seconds:.2f}s, "
                              f"shipped {len(d.logs)} log(s), {d.extents} extent(s), {d.data_bytes} data bytes, "
                              f"{d.zero_bytes} zero bytes, last seq {d.last_seq}" + (" (resync)" if d.resync else "")
                              + (f", waited {d.paced_seconds:.2f}s for --cpu-limit" if d.paced_seconds >= 0.01 else ""))

        ag.run(interval=interval, once=once, on_cycle=on_cycle, give_up_after=give_up_after or None)


daemon_app = typer.Typer(help="The storage daemon that serves a machine's disks and tracks their writes.",
                         no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")


def _daemon(store: str | None, machine: str, state_dir: str | None, serve_dir: str | None = None):
    from hotspare.capture.daemon import StorageDaemon
    from hotspare.machine import load_machine

    return StorageDaemon(agent_state_dir(state_dir, machine), load_machine(open_store(store), machine),
                         serve_dir=serve_dir)


@daemon_app.command("stop")
def daemon_stop(machine: MachineArg, store: StoreOpt = None,
                state_dir: Annotated[Optional[str], typer.Option(envvar="HOTSPARE_AGENT_STATE",
                                                                 help="agent state directory")] = None) -> None:
    """Quit MACHINE's storage daemon cleanly (its bitmaps are stored). The machine's I/O
    through it stops: do this at shutdown, last."""
    d = _daemon(store, machine, state_dir)
    console.print(f"{machine}: storage daemon " + ("stopped, bitmaps stored" if d.stop() else "was not running"))


def _restore(st, cfg, state_dir: Path, emit, interval: float, once: bool) -> bool:
    """Restore mode until the failback finishes (True) or a stop (False)."""
    from hotspare.capture.agent import Agent
    from hotspare.failback.restore import Restorer

    with Agent(st, cfg, state_dir):  # the same lock: one agent per machine, either mode
        r = Restorer(st, cfg, state_dir, emit=emit, say=lambda s: console.print(f"{cfg.name} (restore): {s}"))
        stop_on_signals(r, "data log")
        console.print(f"{cfg.name}: restore mode; shipping nothing, waiting for the failback flow's orders")
        done = r.run(interval=interval, once=once)
    if done and not once:
        console.print(f"{cfg.name}: failback finished; protecting again")
    return done and not once
