"""``hotspare protect`` and ``hotspare status``: registering a machine, and how every machine stands."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer
from rich.table import Table

from hotspare.cli.common import EXIT_STALLED, MachineArg, StoreOpt, app, console, err_console, open_store
from hotspare.errors import HotspareError

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
    from hotspare import layout
    from hotspare.machine import parse_disk_arg, protect_machine

    layout.check_name("machine", machine)
    if not MIN_BLOCK_KIB <= block_size_kib <= MAX_BLOCK_KIB or block_size_kib & (block_size_kib - 1):
        raise typer.BadParameter(f"--block-size-kib {block_size_kib}: the block size must be a power of two "
                                 f"from {MIN_BLOCK_KIB} to {MAX_BLOCK_KIB} KiB", param_hint="--block-size-kib")
    st = open_store(store)
    disks = [parse_disk_arg(d, block_size_kib << 10) for d in disk]
    policy_changes = {k: v for k, v in dict(heartbeat_window=heartbeat_window, auto_approve=auto_approve,
                                            host=host, notify_block=notify_block).items() if v is not None}
    _, created = protect_machine(st, machine, disks, policy_changes)
    if created:
        console.print(f"protected [bold]{machine}[/]: " + ", ".join(f"{d.name} ({d.size} bytes, {d.path})" for d in disks))
    else:
        console.print(f"{machine} was already protected; policy and disk paths updated")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


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
    from hotspare.status import machine_status

    st = open_store(store)
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
