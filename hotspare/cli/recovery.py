"""Moving a machine between its disks and a VM: ``failover``, ``failback`` and ``drill``,
each through its flow (so the runs, approvals and artifacts show in the Prefect UI)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from hotspare.cli.common import MachineArg, StoreOpt, VmDirOpt, app, load_flows, open_store, parse_at, report_flow


@app.command("failback")
def failback_cmd(machine: MachineArg, store: StoreOpt = None,
                 approve: Annotated[bool, typer.Option(help="approve the cut-over now instead of in the Prefect UI")] = False,
                 target_disk: Annotated[Optional[list[str]], typer.Option(
                     help="NAME=PATH: restore disk NAME onto another disk or image (replacement hardware); repeatable")] = None,
                 vm_dir: VmDirOpt = None,
                 catch_up_mib: Annotated[int, typer.Option(help="catch-up rounds run while more than this changed, MiB")] = 64) -> None:
    """Fail MACHINE back from its VM (runs the failback flow; its agent must run with --restore)."""
    targets = {}
    for arg in target_disk or []:
        name, sep, path = arg.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--target-disk {arg!r}: use NAME=PATH")
        targets[name] = os.path.abspath(path)
    if catch_up_mib < 0:
        raise typer.BadParameter("--catch-up-mib must not be negative")
    url = open_store(store).url
    load_flows()
    from flows.failback import failback

    report_flow(failback(machine=machine, store=url, approve=approve, target_disk=targets or None, vm_dir=vm_dir,
                     catch_up_bytes=catch_up_mib << 20, return_state=True), "failback")


@app.command("failover")
def failover_cmd(machine: MachineArg, store: StoreOpt = None,
                 approve: Annotated[bool, typer.Option(help="approve now instead of waiting in the Prefect UI")] = False,
                 vm_dir: VmDirOpt = None,
                 expect_marker: Annotated[bool, typer.Option(help="wait for the demo guest's marker")] = True,
                 boot_timeout: Annotated[float, typer.Option(help="seconds the VM has to show its marker")] = 120.0) -> None:
    """Fail MACHINE over to a VM booted from its replica (runs the failover flow)."""
    if not boot_timeout > 0:
        raise typer.BadParameter("--boot-timeout must be a positive number of seconds")
    url = open_store(store).url
    load_flows()
    from flows.failover import failover

    report_flow(failover(machine=machine, store=url, approve=approve, vm_dir=vm_dir, expect_marker=expect_marker,
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
    if point and at:
        raise typer.BadParameter("give --point or --at, not both")
    if boot_timeout is not None and not boot_timeout > 0:
        raise typer.BadParameter("--boot-timeout must be a positive number of seconds")
    parse_at(at)  # a bad time fails before the flow starts
    url = open_store(store).url
    load_flows()
    from flows.drill import drill

    report_flow(drill(machine=machine, store=url, point=point, at=at, vm_dir=vm_dir, boot_timeout=boot_timeout,
                  return_state=True), "drill")
