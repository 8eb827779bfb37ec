"""``hotspare vm``: the VM a machine failed over to, outside the flows (its capture, a clean stop)."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from hotspare.cli.common import MachineArg, StoreOpt, VmDirOpt, app, console, open_store
from hotspare.errors import HotspareError

vm_app = typer.Typer(help="The VM a machine failed over to.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")


def _vm_host(name: str):
    from blocks.vmhost import resolve_vm_host  # a block name needs the Prefect API

    return resolve_vm_host(name)


@vm_app.command("capture")
def vm_capture(machine: MachineArg, store: StoreOpt = None, vm_dir: VmDirOpt = None,
               interval: Annotated[float, typer.Option(help="seconds between captures")] = 2.0) -> None:
    """Ship the failed-over VM's writes as extent logs until it stops (failover runs the
    same capture as ``python -m hotspare.vm.qemu.capture``)."""
    from hotspare import failover as engine
    from hotspare.machine import load_machine
    from hotspare.state import load_state
    from hotspare.vm.qemu.capture import VmCapture
    from hotspare.vm.host import load_handle

    st = open_store(store)
    cfg = load_machine(st, machine)
    workdir = engine.vm_dir(machine, vm_dir)
    handle = load_handle(workdir)
    if handle is None:
        raise HotspareError(f"no VM handle in {workdir}")
    state = load_state(st, machine)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cap = VmCapture(_vm_host(state.host or "local"), handle, st, epoch=engine.vm_epoch(state), disks=cfg.disks)
    cap.run(interval=interval, stop=stop, on_ship=lambda keys: console.print(f"shipped {len(keys)} log(s)"))


@vm_app.command("stop")
def vm_stop(machine: MachineArg, store: StoreOpt = None, vm_dir: VmDirOpt = None) -> None:
    """Stop MACHINE's failed-over VM cleanly, its last writes shipped first, without failing back."""
    from hotspare import failover as engine
    from hotspare.machine import load_machine

    st = open_store(store)
    cfg = load_machine(st, machine)
    state, handle, keys = engine.stop_vm(st, cfg, engine.vm_dir(machine, vm_dir), _vm_host)
    if state.state == "failing-over":
        console.print(f"stopped VM {handle.vm_id} of {machine}, launched by an unfinished failover; its writes went "
                      f"out in {len(keys)} log(s). {machine} stays fenced (failing-over): run 'hotspare failover "
                      f"{machine}' to boot it again.")
        return
    console.print(f"stopped VM {handle.vm_id} of {machine}; its last writes went out in {len(keys)} log(s). "
                  f"The replica (epoch {state.epoch}) is the truth; run 'hotspare consolidate {machine}'.")
