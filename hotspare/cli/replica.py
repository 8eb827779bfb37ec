"""The replica's commands: ``ingest`` and ``consolidate`` (through their flows), ``points``,
``check``, ``export`` and ``serve`` (straight from the store)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from hotspare.cli.common import (EXIT_STALLED, MachineArg, StoreOpt, app, console, err_console, load_flows,
                                 open_store, parse_at)
from hotspare.errors import HotspareError


@app.command("ingest")
def ingest_cmd(machine: MachineArg, store: StoreOpt = None) -> None:
    """Validate and accept MACHINE's new extent logs (runs the ingest flow)."""
    url = open_store(store).url
    load_flows()
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
    url = open_store(store).url
    load_flows()
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

    st = open_store(store)
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
        report = check_store(open_store(store), machine, read_data=parse_fraction(fraction),
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
    when = parse_at(at)
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
    p = find_point(cats[disk], point, parse_at(at))
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


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (through links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
