"""The ``hotspare`` command line.

Every command takes ``--store URL`` (default: ``HOTSPARE_STORE``, else ``./.hotspare/store``).
Expected faults print one line, ``error: ...``, and exit 1; usage errors exit 2; ``status``
and ``ingest`` exit 3 (EXIT_STALLED) when a machine's protection is stalled, with one line
per stall saying why (see :mod:`hotspare.stall`). Commands that run a flow import Prefect
lazily, so the agent and the read-only commands start fast.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from hotspare.errors import HotspareError, LostRace, MachineLive, NotApproved, OutcomeError, Refused

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="hotspare: a running-ready virtual twin for every protected machine.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[Optional[str], typer.Option("--store", envvar="HOTSPARE_STORE", show_envvar=True,
                                                 help="store URL: a directory, file://PATH or s3://BUCKET/PREFIX "
                                                      "(default ./.hotspare/store)")]
MachineArg = Annotated[str, typer.Argument(help="machine name")]
EXIT_STALLED = 3  # status, ingest: a machine's protection is stalled (hotspare.stall)


class _ExpectedFaultFilter:
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


NO_SERVER_HINT = ("no Prefect server configured: this command starts a temporary one (seconds of start-up, and its "
                  "runs vanish with it). To skip that and see the runs in the UI, point it at a running server: "
                  "`prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api")


def _flows():
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
                h.addFilter(_ExpectedFaultFilter())


def _store(url: str | None):
    from hotspare.store import open_store

    return open_store(url)


def _agent_state_dir(state_dir: str | None, machine: str) -> Path:
    root = state_dir or os.environ.get("HOTSPARE_AGENT_STATE") or "./.hotspare/agent"
    return Path(root) / machine


# The tracked block sizes DiskSpec accepts (a power of two from 4 KiB to 16 MiB), in KiB.
MIN_BLOCK_KIB, MAX_BLOCK_KIB = 4, 16 << 10


@app.command()
def protect(
    machine: MachineArg,
    disk: Annotated[list[str], typer.Option("--disk", help="NAME=PATH of a disk image or block device (repeatable)")],
    store: StoreOpt = None,
    block_size_kib: Annotated[int, typer.Option(help="tracked block size in KiB")] = 64,
    heartbeat_window: Annotated[Optional[int], typer.Option(help="seconds without heartbeat before failover")] = None,
    auto_approve: Annotated[Optional[bool], typer.Option("--auto-approve/--require-approval", help="approval policy")] = None,
    host: Annotated[Optional[str], typer.Option(help="VM host after a failover: local, docker, ec2 or a VM host block name")] = None,
    notify_block: Annotated[Optional[str], typer.Option(help="notification block (TYPE-SLUG/NAME, or NAME of a custom-webhook "
                                                             "block) that approval requests notify; hotspare deploy applies it")] = None,
) -> None:
    """Register MACHINE and its disks in the store (or update its policy)."""
    from pydantic import ValidationError

    from hotspare import layout
    from hotspare.errors import AlreadyExists, UsageError, field_error
    from hotspare.machine import MachineConfig, Policy, load_machine, parse_disk_arg, save_machine

    layout.check_name("machine", machine)
    if not MIN_BLOCK_KIB <= block_size_kib <= MAX_BLOCK_KIB or block_size_kib & (block_size_kib - 1):
        raise typer.BadParameter(f"--block-size-kib {block_size_kib}: the block size must be a power of two "
                                 f"from {MIN_BLOCK_KIB} to {MAX_BLOCK_KIB} KiB", param_hint="--block-size-kib")
    st = _store(store)
    disks = [parse_disk_arg(d, block_size_kib << 10) for d in disk]
    if len({d.name for d in disks}) != len(disks):
        raise UsageError("--disk names must be unique")
    policy_changes = {k: v for k, v in dict(heartbeat_window=heartbeat_window, auto_approve=auto_approve,
                                            host=host, notify_block=notify_block).items() if v is not None}
    try:
        cfg = MachineConfig(name=machine, disks=disks, policy=Policy(**policy_changes))
    except ValidationError as err:
        raise UsageError(f"machine {machine}: {field_error(err)}") from None
    try:
        save_machine(st, cfg, create_only=True)
        console.print(f"protected [bold]{machine}[/]: " + ", ".join(f"{d.name} ({d.size} bytes, {d.path})" for d in disks))
        return
    except AlreadyExists:
        pass
    old = load_machine(st, machine)
    resized = [(d, o) for d in disks for o in old.disks if d.name == o.name and d.size != o.size]
    if resized and [d.name for d in old.disks] == [d.name for d in disks]:
        # The agent tells a resized disk to re-protect; this is the way that works.
        d, o = resized[0]
        raise UsageError(f"disk {d.name} of machine {machine} is now {d.size} bytes, its replica {o.size}: a replica "
                         f"cannot change size in place. Protect the resized machine under a new name, which seeds a "
                         f"new replica: hotspare protect {machine}-2 " + " ".join(f"--disk {x.name}={x.path}" for x in disks)
                         + f" (then run its agent as {machine}-2); {machine}'s recovery points stay readable with "
                         f"hotspare export {machine}")
    if [(d.name, d.size, d.block_size) for d in old.disks] != [(d.name, d.size, d.block_size) for d in disks]:
        raise UsageError(f"machine {machine} is already protected with other disks "
                         f"({', '.join(f'{d.name}={d.size}' for d in old.disks)}); disks cannot change in place")
    new = old.model_copy(update={"disks": disks, "policy": old.policy.model_copy(update=policy_changes)})
    save_machine(st, new, create_only=False)
    console.print(f"{machine} was already protected; policy and disk paths updated")


@app.command()
def agent(
    machine: MachineArg,
    store: StoreOpt = None,
    once: Annotated[bool, typer.Option(help="run one cycle and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between cycles (cuts)")] = 0.5,
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
    if not (math.isfinite(give_up_after) and give_up_after >= 0):
        raise typer.BadParameter("--give-up-after must be a number of seconds, 0 for never")
    if tracker not in TRACKERS:
        raise typer.BadParameter(f"--tracker {tracker!r}: use one of {', '.join(TRACKERS)}")
    if tracker == "scan" and not serve and (fuse or serve_dir):
        # Said, not guessed: serving a disk whose writers bypass the daemon would mark
        # fuzzy cuts consistent.
        raise typer.BadParameter("--fuse and --serve-dir say how the disks are served: with --tracker scan, "
                                 "add --serve to serve them")
    st = _store(store)
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
    if restore and not _restore(st, cfg, _agent_state_dir(state_dir, machine), emit, interval, once):
        return
    cfg = load_machine(st, machine)  # a failback to replacement disks changed their paths
    with Agent(st, cfg, _agent_state_dir(state_dir, machine), tracker=tracker, serve_dir=serve_dir,  # type: ignore[arg-type]
               fuse=fuse, serve=serve, log_target=log_target_mib << 20, emit=emit, alarm=alarm,
               say=lambda s: console.print(f"{machine}/{s}", markup=False, highlight=False)) as ag:
        ag.progress = None if quiet or not console.is_terminal else bar_factory(console)
        _stop_on_signals(ag, "log")

        def on_cycle(report: CycleReport) -> None:
            for d in report.disks:
                if tracker == "qemu" and not d.extents and not once:
                    continue  # a quiet cut: nothing to say twice a second
                what = "read" if tracker == "qemu" else "scanned"
                console.print(f"{machine}/{d.disk}: {what} {d.scanned_bytes >> 20} MiB in {d.seconds:.2f}s, "
                              f"shipped {len(d.logs)} log(s), {d.extents} extent(s), {d.data_bytes} data bytes, "
                              f"{d.zero_bytes} zero bytes, last seq {d.last_seq}" + (" (resync)" if d.resync else ""))

        ag.run(interval=interval, once=once, on_cycle=on_cycle, give_up_after=give_up_after or None)


daemon_app = typer.Typer(help="The storage daemon that serves a machine's disks and tracks their writes.",
                         no_args_is_help=True)
app.add_typer(daemon_app, name="daemon")


def _daemon(store: str | None, machine: str, state_dir: str | None, serve_dir: str | None = None):
    from hotspare.capture.daemon import StorageDaemon
    from hotspare.machine import load_machine

    return StorageDaemon(_agent_state_dir(state_dir, machine), load_machine(_store(store), machine),
                         serve_dir=serve_dir)


@daemon_app.command("stop")
def daemon_stop(machine: MachineArg, store: StoreOpt = None,
                state_dir: Annotated[Optional[str], typer.Option(envvar="HOTSPARE_AGENT_STATE",
                                                                 help="agent state directory")] = None) -> None:
    """Quit MACHINE's storage daemon cleanly (its bitmaps are stored). The machine's I/O
    through it stops: do this at shutdown, last."""
    d = _daemon(store, machine, state_dir)
    console.print(f"{machine}: storage daemon " + ("stopped, bitmaps stored" if d.stop() else "was not running"))


def _stop_on_signals(worker, unit: str) -> None:
    """Ctrl-C or SIGTERM asks ``worker`` to stop after its current ``unit`` (never halfway
    through one); a second Ctrl-C aborts."""
    def on_signal(signum, frame):
        if worker.stop_requested:
            raise KeyboardInterrupt
        worker.stop_requested = True
        err_console.print(f"stopping after the current {unit} (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def _restore(st, cfg, state_dir: Path, emit, interval: float, once: bool) -> bool:
    """Restore mode until the failback finishes (True) or a stop (False)."""
    from hotspare.capture.agent import Agent
    from hotspare.failback.restore import Restorer

    with Agent(st, cfg, state_dir):  # the same lock: one agent per machine, either mode
        r = Restorer(st, cfg, state_dir, emit=emit, say=lambda s: console.print(f"{cfg.name} (restore): {s}"))
        _stop_on_signals(r, "data log")
        console.print(f"{cfg.name}: restore mode; shipping nothing, waiting for the failback flow's orders")
        done = r.run(interval=interval, once=once)
    if done and not once:
        console.print(f"{cfg.name}: failback finished; protecting again")
    return done and not once


@app.command("ingest")
def ingest_cmd(machine: MachineArg, store: StoreOpt = None) -> None:
    """Validate and accept MACHINE's new extent logs (runs the ingest flow)."""
    from hotspare.store import open_store

    url = open_store(store).url
    _flows()
    from flows.ingest import ingest

    result = ingest(machine=machine, store=url)
    for d in result.disks:
        console.print(f"{machine}/{d.disk}: accepted {len(d.accepted)} log(s) ({d.accepted_bytes} data bytes), "
                      f"rejected {len(d.rejected)}, waiting {len(d.waiting)}; catalog v{d.catalog_version}, "
                      f"applied up to seq {d.applied_seq}")
    for r in result.rejected:
        err_console.print(f"rejected: {r}")
    for line in result.stalled:
        err_console.print(line, markup=False, highlight=False)
    if result.rejected:
        raise typer.Exit(1)
    if result.stalled:
        raise typer.Exit(EXIT_STALLED)


@app.command("consolidate")
def consolidate_cmd(machine: MachineArg, store: StoreOpt = None,
                    policy_block: Annotated[Optional[str], typer.Option(help="machine policy block for retention")] = None) -> None:
    """Ingest, then compact MACHINE's new logs into a new recovery point (runs the consolidate flow)."""
    from hotspare.store import open_store

    url = open_store(store).url
    _flows()
    from flows.consolidate import consolidate

    for r in consolidate(machine=machine, store=url, policy_block=policy_block):
        if r.point is None:
            console.print(f"{machine}/{r.disk}: nothing new to consolidate (base {r.base})")
            continue
        console.print(f"{machine}/{r.disk}: point {r.point}{' (converted from its VHD)' if r.converted else ''} from "
                      f"{r.logs} log(s), {r.bytes_applied} bytes applied; {r.chunks_written} chunk(s) written in "
                      f"{r.packs_written} pack(s), {r.chunks_deduplicated} deduplicated, {r.pages_written} index "
                      f"page(s), {r.bytes_uploaded} bytes uploaded in {r.seconds:.1f}s; {r.points} point(s) kept, "
                      f"base {r.base}")


def _catalogs(store: str | None, machine: str):
    from hotspare.catalog import load_catalog
    from hotspare.machine import load_machine

    st = _store(store)
    cfg = load_machine(st, machine)
    return st, cfg, {d.name: load_catalog(st, machine, d.name, d.size) for d in cfg.disks}


def _drill_text(v) -> str:
    """A point's drill verdict in a few words, for a table."""
    if v is None:
        return "untested (never drilled)"
    when = v.at.strftime("%Y-%m-%d %H:%M")
    if v.verdict == "verified":
        return f"verified {when}, booted in {v.seconds:.1f}s"
    return f"{v.verdict.upper() if v.verdict == 'failed' else v.verdict} {when}: {v.reason[:160]}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


@app.command()
def points(machine: MachineArg, store: StoreOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List MACHINE's recovery points, per disk."""
    _, _, cats = _catalogs(store, machine)

    def roles(c, p) -> list[str]:
        return [r for r in ("base", "current") if (q := c.point(r)) is not None and q.id == p.id]

    if as_json:
        print(json.dumps({d: [dict(p.model_dump(mode="json"), current="current" in roles(c, p),
                                   base="base" in roles(c, p), vhd_object=c.vhd_objects.get(p.id))
                              for p in c.points]
                          for d, c in cats.items()}, indent=1))
        return
    table = Table(title=f"recovery points of {machine}")
    for col in ("disk", "point", "epoch", "seq", "time (UTC)", "bytes applied", "crash-consistent", "role", "drill"):
        table.add_column(col)
    for d, c in cats.items():
        for p in c.points:
            role = " ".join(roles(c, p))
            table.add_row(d, p.id, str(p.epoch), str(p.seq), p.time.strftime("%Y-%m-%d %H:%M:%S"), f"{p.bytes_applied:,}",
                          "yes" if p.consistent else "NO (a scan of a live disk)", role, _drill_text(p.drill))
    console.print(table)


@app.command("check", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             options_metavar="[MACHINE] [--read-data[=FRACTION]] [OPTIONS]")
def check_cmd(ctx: typer.Context, store: StoreOpt = None,
              as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """Prove that the store is whole (MACHINE, default every machine): every catalog and state
    version, every object a catalog names at its size, every index page and pack entry, every
    accepted log's metadata, the quarantine. --read-data also reads the data and checks every
    chunk's SHA-256 and every log row's checksum; --read-data=0.1 (or =10%) reads a tenth of
    the packs and logs, chosen at random. Exit 0 clean, 1 repairable findings only (garbage:
    hotspare consolidate MACHINE removes it), 2 damaged, 3 the check could not run."""
    from hotspare.check import check_store, parse_fraction

    machine, fraction = None, None
    try:
        for arg in ctx.args:  # typer has no option with an optional value: parsed here
            if arg == "--read-data" or arg.startswith("--read-data="):
                fraction = arg.partition("=")[2]
            elif arg.startswith("-") or machine is not None:
                raise typer.BadParameter(f"unexpected argument {arg!r}; usage: hotspare check [MACHINE] "
                                         "[--read-data[=FRACTION]]")
            else:
                machine = arg
        report = check_store(_store(store), machine, read_data=parse_fraction(fraction),
                             say=(lambda s: err_console.print(s, style="dim")) if console.is_terminal else None)
    except HotspareError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(3) from None
    if as_json:
        print(json.dumps({"verdict": report.verdict, "exit_code": report.exit_code, "summary": report.summary(),
                          **report.model_dump(mode="json")}, indent=1))
        raise typer.Exit(report.exit_code)
    if report.findings:
        table = Table(title=f"findings in {report.machines and ', '.join(report.machines) or 'the store'}")
        for col in ("severity", "object", "reason", "points", "repair"):
            table.add_column(col, overflow="fold")
        styles = {"damaged": "bold red", "repairable": "yellow", "warning": "cyan"}
        for f in report.findings:
            table.add_row(f"[{styles[f.severity]}]{f.severity}[/]", f.key, f.reason, ", ".join(f.points), f.repair)
        # Piped: one row per line, unwrapped, so each finding reads (and greps) as one line.
        (console if console.is_terminal else Console(width=1 << 16, soft_wrap=True)).print(table)
    console.print(report.summary(), markup=False, highlight=False)
    raise typer.Exit(report.exit_code)


@app.command()
def export(
    machine: MachineArg,
    disk: Annotated[str, typer.Option(help="disk name")],
    out: Annotated[Optional[Path], typer.Option(help="file to write")] = None,
    fmt: Annotated[str, typer.Option("--format", help="vhd (dynamic), vhd-fixed or raw")] = "vhd",
    point: Annotated[Optional[str], typer.Option(help="point id (see hotspare points)")] = None,
    at: Annotated[Optional[str], typer.Option(help="ISO time: the newest point at or before it")] = None,
    to_store: Annotated[bool, typer.Option("--to-store", help="write a VHD object under vhd/ in the store "
                                           "(for hypervisors and cloud imports) instead of --out")] = False,
    store: StoreOpt = None,
) -> None:
    """Materialise a recovery point of one disk as a local image, or as a VHD object in the store."""

    from hotspare.consolidate.export import export_point, find_point
    from hotspare.errors import UsageError
    from hotspare.progress import bar_factory

    if fmt not in ("vhd", "vhd-fixed", "raw"):
        raise UsageError(f"--format {fmt!r}: use vhd, vhd-fixed or raw")
    if point and at:
        raise UsageError("give --point or --at, not both")
    when = _parse_at(at)
    st, cfg, cats = _catalogs(store, machine)
    spec = cfg.disk(disk)
    if to_store:
        from hotspare.replica.vhdobject import make_vhd_object

        if out is not None:
            raise UsageError("give --out or --to-store, not both")
        pid = find_point(cats[disk], point, when).id
        bar = bar_factory(console)(f"VHD of {pid}", spec.size) if console.is_terminal else None
        p, key, made = make_vhd_object(st, machine, spec, pid, fmt=fmt, progress=bar)  # type: ignore[arg-type]
        console.print(f"{machine}/{disk} point {p.id}: VHD object {key}{'' if made else ' (already made)'}")
        return
    if out is None:
        raise UsageError("give --out FILE (or --to-store)")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: directory {out.parent} does not exist")
    for d in cfg.disks:
        if _same_path(out, Path(d.path)):
            raise UsageError(f"--out {out} is disk {d.name} of protected machine {machine} ({d.path}): "
                             "refusing to overwrite it; export to another file")
    p = find_point(cats[disk], point, when)
    progress = bar_factory(console)(f"export {p.id}", cats[disk].disk_size) if console.is_terminal else None
    export_point(st, cats[disk], p, fmt, out, progress)  # type: ignore[arg-type]
    console.print(f"exported {machine}/{disk} point {p.id} ({p.time.isoformat()}) to {out} as {fmt}")


@app.command()
def serve(
    machine: MachineArg,
    disk: Annotated[str, typer.Option(help="disk name")],
    point: Annotated[Optional[str], typer.Option(help="point id (see hotspare points)")] = None,
    at: Annotated[Optional[str], typer.Option(help="ISO time: the newest point at or before it")] = None,
    socket: Annotated[Optional[Path], typer.Option(help="unix socket to serve on (default: ./<machine>-<disk>.sock)")] = None,
    store: StoreOpt = None,
) -> None:
    """Serve a recovery point of one disk read-only over NBD (nbdkit), until interrupted."""
    import signal as signals

    from hotspare.consolidate.export import find_point
    from hotspare.errors import UsageError
    from hotspare.replica.serve import nbd_uri, start_server, stop_server

    if point and at:
        raise UsageError("give --point or --at, not both")
    st, cfg, cats = _catalogs(store, machine)
    cfg.disk(disk)
    p = find_point(cats[disk], point, _parse_at(at))
    if not p.root:
        raise UsageError(f"{machine}/{disk} point {p.id} is in the layout before chunks: run "
                         f"`hotspare consolidate {machine}` once to convert the disk")
    sock = Path(socket or f"{machine}-{disk}.sock").absolute()
    log = sock.with_name(sock.name + ".log")
    proc = start_server(st.url, p.root, sock, log=log)
    console.print(f"serving {machine}/{disk} point {p.id} ({p.time.isoformat()}) read-only at {nbd_uri(sock)}; "
                  "Ctrl-C stops")
    signals.signal(signals.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        proc.wait()
        raise UsageError(f"nbdkit serving {machine}/{disk} exited with {proc.returncode}: see {log}")
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc.pid)
        sock.unlink(missing_ok=True)


def _parse_at(at: str | None):
    from hotspare.consolidate.export import parse_at

    return parse_at(at)


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (through links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def machine_status(st, machine: str) -> dict:
    """What ``hotspare status`` reports for one machine, as plain data."""
    from hotspare.catalog import catalog_logs, load_catalog
    from hotspare.catalog.model import utcnow
    from hotspare.drill import last_drills
    from hotspare.fleetview import vm_health
    from hotspare.heartbeat import SKEW_REPORTED, load_heartbeat
    from hotspare.machine import load_machine
    from hotspare.stall import machine_stalls
    from hotspare.state import load_state

    cfg = load_machine(st, machine)
    state = load_state(st, machine)
    hb = load_heartbeat(st, machine)
    disks = {}
    cats = {d.name: load_catalog(st, machine, d.name, d.size) for d in cfg.disks}
    stalls = machine_stalls(st, cfg, state.state, hb, cats)
    for d in cfg.disks:
        cat = cats[d.name]
        cur = cat.point("current")
        disks[d.name] = {
            "size": d.size, "catalog_version": cat.version, "applied_seq": cat.applied_seq(cat.epoch),
            "newest_point": cur.id if cur else None, "newest_point_time": cur.time.isoformat() if cur else None,
            "lag_seconds": round(max(0.0, (utcnow() - cur.time).total_seconds()), 1) if cur else None,
            "logs_not_consolidated": (len(catalog_logs(st, cat, after=cur.position)) if cur else cat.log_count),
            "logs_accepted": cat.log_count, "manifests": len(cat.manifests),
            "fenced_epochs": [f.epoch for f in cat.fences],
            "capture": hb.disks.get(d.name) if hb else None,  # tracker, served (where), consistent
        }
    return {
        "machine": machine, "state": state.state, "epoch": state.epoch,
        "since": (state.at if state.version else cfg.created_at).isoformat(),
        "phase": state.phase or None, "host": state.host, "vm": state.vm,
        "vm_health": vm_health(state),  # the VM's QMP status and its capture, checked now
        "heartbeat": None if hb is None else {"time": hb.time.isoformat(), "age_seconds": round(hb.age, 1),
                                              "received": hb.received_at.isoformat() if hb.received_at else None,
                                              "clock_skew_seconds": None if hb.skew is None else round(hb.skew, 1),
                                              "clock_skewed": hb.skew is not None and abs(hb.skew) > SKEW_REPORTED,
                                              "mode": hb.mode, "epoch": hb.epoch,
                                              "fresh": hb.age <= cfg.policy.heartbeat_window,
                                              "restore": hb.restore.model_dump(mode="json") if hb.restore else None,
                                              # a stall the agent lived through and reported once past it
                                              "last_stall": hb.last_stall},
        "policy": cfg.policy.model_dump(), "disks": disks, "drill": _drill_status(last_drills(cats)),
        "stalled": bool(stalls), "stalls": [dict(x.payload(), line=x.line()) for x in stalls],
    }


def _drill_status(found: dict) -> dict:
    from hotspare.catalog.model import utcnow

    last, ok = found["last"], found["last_success"]
    return {"drilled": last is not None, "newest_verified_point": found["newest_verified_point"],
            "last_success": ok.isoformat() if ok else None,
            "last_success_age_seconds": round((utcnow() - ok).total_seconds(), 1) if ok else None,
            "last_verdict": last.verdict if last else None, "last_point": found["last_point"],
            "last_reason": last.reason if last else None}


@app.command()
def status(machine: Annotated[Optional[str], typer.Argument(help="machine name (default: all)")] = None,
           store: StoreOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
           publish: Annotated[bool, typer.Option("--publish", help="also update the fleet view in the Prefect UI "
                                                 "(artifact hotspare-fleet) and emit an event per dead VM or capture")] = False) -> None:
    """Each machine's state, last heartbeat, newest recovery point, replication lag, and its
    VM's live status and capture. Exits 3 when a machine's protection is stalled, with one
    line per machine saying why."""
    from hotspare.machine import list_machines

    st = _store(store)
    if publish:
        _publish_fleet(st)
    names = [machine] if machine else list_machines(st)
    report = [machine_status(st, m) for m in names]
    stalled = [r for r in report if r["stalled"]]
    if as_json:
        print(json.dumps(report if machine is None else report[0], indent=1))
        if stalled:
            raise typer.Exit(EXIT_STALLED)
        return
    table = Table(title=f"hotspare machines in {st.url}")
    for col in ("machine", "state", "epoch", "VM", "heartbeat", "drill", "disk", "newest point", "lag"):
        table.add_column(col)
    for r in report:
        hb = r["heartbeat"]
        hb_text = "never" if hb is None else f"{hb['age_seconds']:.0f}s ago ({hb['mode']})" + ("" if hb["fresh"] else " SILENT")
        if hb is not None and hb["clock_skewed"]:
            hb_text += f"; agent clock {hb['clock_skew_seconds']:+.0f}s off the store's"
        vm = f"{r['host']}:{r['vm'].get('vm_id', '?')}" if r["vm"] else ""
        if r["vm_health"]:
            vm += f" ({r['vm_health']['status']}, capture {r['vm_health']['capture']})"
        dr = r["drill"]
        if not dr["drilled"]:
            drill_text = "never drilled"
        else:
            drill_text = (f"verified {dr['newest_verified_point']}, last success {_age(dr['last_success_age_seconds'])} ago"
                          if dr["last_success"] else "never verified")
            if dr["last_verdict"] != "verified":
                drill_text += f"; last drill ({dr['last_point']}) {dr['last_verdict'].upper()}: {(dr['last_reason'] or '')[:120]}"
        for i, (d, info) in enumerate(r["disks"].items()):
            lag = "" if info["lag_seconds"] is None else f"{info['lag_seconds']:.0f}s"
            table.add_row(*(r["machine"], r["state"] + (f" ({r['phase']})" if r["phase"] else ""), str(r["epoch"]), vm, hb_text,
                            drill_text)
                          if i == 0 else ("", "", "", "", "", ""), d, info["newest_point"] or "none", lag)
    console.print(table)
    for r in report:
        last = (r["heartbeat"] or {}).get("last_stall")
        if last and not r["stalled"]:
            console.print(f"{r['machine']}: recovered from a stall ({last['reason']}, {last['seconds']:.0f}s, "
                          f"ended {last['ended']}): {last['detail']}", markup=False, highlight=False)
    for r in stalled:
        # One line per machine: every reason it is stalled, so nothing scrolls out of view.
        why = "; ".join((f"disk {x['disk']}: " if x["disk"] else "") + f"{x['reason']}: {x['detail']}"
                        for x in r["stalls"])
        console.print(f"{r['machine']}: STALLED: {why}", markup=False, highlight=False)
    if stalled:
        raise typer.Exit(EXIT_STALLED)


def _publish_fleet(st) -> None:
    """``status --publish``: the fleet view as a Prefect artifact (needs a running server: a
    temporary one would take the artifact with it)."""
    if not os.environ.get("PREFECT_API_URL"):
        from tasks.events import prefect_api_configured

        if not prefect_api_configured():
            raise HotspareError("--publish needs a running Prefect server: `prefect server start`, then "
                                "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    from tasks.fleet import publish_fleet_view

    rows = publish_fleet_view(st)
    err_console.print(f"fleet view of {len(rows)} machine(s) published: Prefect UI > Artifacts > hotspare-fleet")


vm_app = typer.Typer(help="The VM a machine failed over to.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
VmDirOpt = Annotated[Optional[str], typer.Option("--vm-dir", envvar="HOTSPARE_VM_DIR",
                                                 help="where VMs keep their files (default ./.hotspare/vms)")]


@app.command("failback")
def failback_cmd(machine: MachineArg, store: StoreOpt = None,
                 approve: Annotated[bool, typer.Option(help="approve the cut-over now instead of in the Prefect UI")] = False,
                 target_disk: Annotated[Optional[list[str]], typer.Option(
                     help="NAME=PATH: restore disk NAME onto another disk or image (replacement hardware); repeatable")] = None,
                 vm_dir: VmDirOpt = None,
                 catch_up_mib: Annotated[int, typer.Option(help="catch-up rounds run while more than this changed, MiB")] = 64) -> None:
    """Fail MACHINE back from its VM (runs the failback flow; its agent must run with --restore)."""
    from hotspare.store import open_store

    targets = {}
    for arg in target_disk or []:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--target-disk {arg!r}: use NAME=PATH")
        targets[name] = os.path.abspath(path)
    if catch_up_mib < 0:
        raise typer.BadParameter("--catch-up-mib must not be negative")
    url = open_store(store).url
    _flows()
    from flows.failback import failback

    _report(failback(machine=machine, store=url, approve=approve, target_disk=targets or None, vm_dir=vm_dir,
                     catch_up_bytes=catch_up_mib << 20, return_state=True), "failback")


def _report(state, what: str) -> None:
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


@app.command("failover")
def failover_cmd(machine: MachineArg, store: StoreOpt = None,
                 approve: Annotated[bool, typer.Option(help="approve now instead of waiting in the Prefect UI")] = False,
                 vm_dir: VmDirOpt = None,
                 expect_marker: Annotated[bool, typer.Option(help="wait for the demo guest's marker")] = True,
                 boot_timeout: Annotated[float, typer.Option(help="seconds the VM has to show its marker")] = 120.0) -> None:
    """Fail MACHINE over to a VM booted from its replica (runs the failover flow)."""
    from hotspare.store import open_store

    if not boot_timeout > 0:
        raise typer.BadParameter("--boot-timeout must be a positive number of seconds")
    url = open_store(store).url
    _flows()
    from flows.failover import failover

    _report(failover(machine=machine, store=url, approve=approve, vm_dir=vm_dir, expect_marker=expect_marker,
                     boot_timeout=boot_timeout, return_state=True), "failover")


@app.command("drill")
def drill_cmd(machine: MachineArg, store: StoreOpt = None,
              point: Annotated[Optional[str], typer.Option(help="point id to drill (default: the newest)")] = None,
              at: Annotated[Optional[str], typer.Option(help="drill the newest point at or before this ISO time")] = None,
              vm_dir: VmDirOpt = None,
              boot_timeout: Annotated[Optional[float], typer.Option(
                  help="seconds the VM has to show its boot evidence (default: the policy's)")] = None) -> None:
    """Boot a recovery point of MACHINE in an isolated VM, check that it boots, and record the
    verdict in the catalog (runs the drill flow; never touches the machine or a failover)."""
    from hotspare.store import open_store

    if point and at:
        raise typer.BadParameter("give --point or --at, not both")
    if boot_timeout is not None and not boot_timeout > 0:
        raise typer.BadParameter("--boot-timeout must be a positive number of seconds")
    _parse_at(at)  # a bad time fails before the flow starts
    url = open_store(store).url
    _flows()
    from flows.drill import drill

    _report(drill(machine=machine, store=url, point=point, at=at, vm_dir=vm_dir, boot_timeout=boot_timeout,
                  return_state=True), "drill")


def _running_vm(st, machine: str, vm_dir: str | None):
    from hotspare import failover as engine
    from hotspare.state import load_state
    from hotspare.vm.host import VmHandle

    state = load_state(st, machine)
    workdir = engine.vm_dir(machine, vm_dir)
    host = _vm_host(state.host or "local") if state.state in ("failed-over", "failing-over") else None
    vm = state.vm
    if vm is None and host is not None and state.state == "failing-over":
        # A failover that died between the launch and recording it: its VM's handle is in
        # the work directory.
        running = host.find_running(workdir)
        vm = running.model_dump(mode="json") if running is not None else None
    if host is None or not vm:
        raise HotspareError(f"{machine} has no launched VM (state {state.state}"
                            f"{', step ' + state.step if state.step else ''})")
    return state, VmHandle.model_validate(vm), host, workdir


def _vm_host(name: str):
    from blocks.vmhost import resolve_vm_host  # a block name needs the Prefect API

    return resolve_vm_host(name)


@vm_app.command("capture")
def vm_capture(machine: MachineArg, store: StoreOpt = None, vm_dir: VmDirOpt = None,
               interval: Annotated[float, typer.Option(help="seconds between captures")] = 2.0) -> None:
    """Ship the failed-over VM's writes as extent logs until it stops (run by failover)."""
    import threading

    from hotspare.machine import load_machine
    from hotspare.state import load_state
    from hotspare.vm.qemu.capture import VmCapture
    from hotspare.vm.host import VmHandle, load_handle

    st = _store(store)
    cfg = load_machine(st, machine)
    from hotspare import failover as engine

    workdir = engine.vm_dir(machine, vm_dir)
    handle = load_handle(workdir)
    if handle is None:
        raise HotspareError(f"no VM handle in {workdir}")
    state = load_state(st, machine)
    epoch = state.epoch + (1 if state.state == "failing-over" else 0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cap = VmCapture(_vm_host(state.host or "local"), VmHandle.model_validate(handle.model_dump()), st,
                    epoch=epoch, disks=cfg.disks)
    cap.run(interval=interval, stop=stop, on_ship=lambda keys: console.print(f"shipped {len(keys)} log(s)"))


@vm_app.command("stop")
def vm_stop(machine: MachineArg, store: StoreOpt = None, vm_dir: VmDirOpt = None) -> None:
    """Stop MACHINE's failed-over VM cleanly, its last writes shipped first, without failing back."""
    from hotspare import failover as engine
    from hotspare.machine import load_machine
    from hotspare.state import commit_state
    from hotspare.vm.qemu.capture import VmCapture

    st = _store(store)
    cfg = load_machine(st, machine)
    state, handle, host, workdir = _running_vm(st, machine, vm_dir)
    engine.stop_capture(workdir)
    # A failing-over machine's VM writes the epoch after the fenced one (as vm capture does).
    epoch = state.epoch + (1 if state.state == "failing-over" else 0)
    keys = VmCapture(host, handle, st, epoch=epoch, disks=cfg.disks).final_capture()
    commit_state(st, state.next(step="vm-stopped", vm=None))
    if state.state == "failing-over":
        console.print(f"stopped VM {handle.vm_id} of {machine}, launched by an unfinished failover; its writes went "
                      f"out in {len(keys)} log(s). {machine} stays fenced (failing-over): run 'hotspare failover "
                      f"{machine}' to boot it again.")
        return
    console.print(f"stopped VM {handle.vm_id} of {machine}; its last writes went out in {len(keys)} log(s). "
                  f"The replica (epoch {state.epoch}) is the truth; run 'hotspare consolidate {machine}'.")


@app.command()
def deploy(machines: Annotated[Optional[list[str]], typer.Argument(help="machines (default: all)")] = None,
           store: StoreOpt = None,
           store_block: Annotated[Optional[str], typer.Option(help="store block the automations pass to flows")] = None) -> None:
    """Register hotspare's block types, then apply the detection automations (heartbeat
    loss, alerts, restore) and, for machines whose policy names a notification block, the
    notification of a waiting approval, to the Prefect server."""
    from hotspare.machine import list_machines, load_machine

    st = _store(store)
    _flows()
    _register_blocks()
    from deployments import automations as auto

    params = {"store_block": store_block} if store_block else {"store": st.url}
    failover_id = auto.deployment_id("failover/failover")
    cfgs = [load_machine(st, m) for m in (machines or list_machines(st))]
    items = [auto.heartbeat_loss(cfg, failover_id, params) for cfg in cfgs]
    items += [auto.approval_notification(cfg, auto.notification_block_id(cfg.policy.notify_block))
              for cfg in cfgs if cfg.policy.notify_block]  # approvals waiting notify the policy's block
    items.append(auto.alert_down(failover_id, params))
    items.append(auto.restore_heartbeat(auto.deployment_id("failback/failback"), params))
    for name in auto.apply(items):
        console.print(f"automation {name} applied")


def _register_blocks() -> None:
    """Register hotspare's block types, so the UI offers them (Blocks > +) before anyone
    has saved one."""
    from blocks import register_block_types

    for slug in register_block_types():
        console.print(f"block type {slug} registered")


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
    from flows.consolidate import consolidate
    from flows.failback import failback
    from flows.failover import failover
    from hotspare.demo import DemoFlows, run_demo

    run_demo(Path(workdir), size_mib=size_mib, console=console,
             flows=DemoFlows(consolidate=consolidate, failover=failover, failback=failback))

def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error base classes: typer raises its vendored copy's, not click's."""
    found: list[type[Exception]] = []
    try:
        from typer._click.exceptions import ClickException as Vendored

        found.append(Vendored)
    except ImportError:
        pass
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


_CLICK_ERRORS = _click_errors()



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
    except _CLICK_ERRORS as err:  # bad arguments: click's usage message, no traceback
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


if __name__ == "__main__":
    main()
