"""``hotspare demo``: the main job on embedded defaults (a store in a local directory,
Prefect's temporary local API, the local QEMU VM host).

A bootable demo disk plays the protected physical machine: QEMU boots it writing straight
into the image, and its guest writes a counter to its data partition every second while the
agent ships the changes. Then the machine loses power (QEMU killed, agent stopped): its last
writes never leave it. After the heartbeat window, the failover flow (auto-approve policy)
fences the machine, consolidates, boots the replica as a VM, and captures the VM's writes
as a new epoch; the VM continues counting from what the replica held. Finally the VM is
stopped with its last writes shipped, a last consolidation runs, and the newest recovery
point is checked to hold the VM's last counter.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hotspare.capture.agent import Agent
from hotspare.catalog import load_catalog
from hotspare.consolidate.export import export_point, find_point
from hotspare.demodisk import build_demo_disk, parse_markers, qemu_accel, read_marker
from hotspare.errors import HotspareError
from hotspare.machine import MachineConfig, Policy, parse_disk_arg, save_machine
from hotspare.store import open_store

MACHINE = "demo"
WINDOW = 10  # heartbeat window, seconds (the smallest Prefect's proactive triggers allow)


def _boot_physical(image: Path, serial: Path) -> subprocess.Popen:
    """The 'physical machine': QEMU writing straight into the protected image."""
    return subprocess.Popen(["qemu-system-x86_64", "-accel", qemu_accel(), "-m", "256", "-nodefaults",
                             "-display", "none", "-nic", "none",
                             "-drive", f"file={image},format=raw,if=virtio", "-serial", f"file:{serial}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_marker(serial: Path, timeout: float, after: int = 0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m.counter for m in parse_markers(serial.read_text(errors="replace"))] if serial.exists() else []
        if found and found[-1] > after:
            return found[-1]
        time.sleep(0.2)
    raise HotspareError(f"no guest marker in {serial} after {timeout:.0f}s")


def run_demo(workdir: Path, *, size_mib: int, console: Console) -> None:
    from hotspare import failover as fo

    root = (workdir / "demo").absolute()
    vms = root / "vms"
    _stop_previous(root, vms)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    store = open_store(str(root / "store"))
    image = root / "physical-machine.img"
    rows: list[tuple[str, str, float]] = []

    def step(name: str, detail: str, t0: float) -> None:
        rows.append((name, detail, time.monotonic() - t0))
        console.print(f"[bold]{name}[/]: {detail}")

    console.rule("[bold]hotspare demo")
    t = time.monotonic()
    build_demo_disk(image, size_mib)
    step("demo disk", f"bootable image {image} ({size_mib} MiB, syslinux + Debian cloud kernel)", t)

    t = time.monotonic()
    cfg = MachineConfig(name=MACHINE, disks=[parse_disk_arg(f"root={image}")],
                        policy=Policy(heartbeat_window=WINDOW, auto_approve=True, retention_points=10))
    save_machine(store, cfg, create_only=True)
    physical = _boot_physical(image, root / "physical-serial.log")
    try:
        first = _wait_marker(root / "physical-serial.log", 120)
        with Agent(store, cfg, root / "agent") as agent:
            shipped = 0
            for _ in range(4):
                shipped += sum(len(d.logs) for d in agent.cycle().disks)
                time.sleep(1.5)
    finally:
        physical.kill()  # power loss: writes since the last agent cycle never leave the machine
        physical.wait()
    last_physical = read_marker(image)
    step("protect + replicate", f"the machine booted (counter {first}), the agent shipped {shipped} log(s) "
                                f"while it ran; then it lost power at counter {last_physical.counter}", t)

    from flows.consolidate import consolidate
    from flows.failover import failover

    t = time.monotonic()
    consolidate(machine=MACHINE, store=store.url)
    cat = load_catalog(store, MACHINE, "root", cfg.disks[0].size)
    step("consolidate", f"recovery point {cat.points[-1].id} committed as a dynamic VHD", t)

    silent_since = time.monotonic()
    console.print(f"waiting {WINDOW}s for the heartbeat window to pass...")
    time.sleep(WINDOW + 1)
    t = time.monotonic()
    result = failover(machine=MACHINE, store=store.url, vm_dir=str(vms))
    step("failover", f"{result.message}; QEMU accel {result.accel}; the VM's first marker: {result.marker}", t)
    rto = time.monotonic() - silent_since

    t = time.monotonic()
    time.sleep(6)
    from hotspare.state import commit_state, load_state
    from hotspare.vm.capture import VmCapture
    from hotspare.vm.host import VmHandle

    state = load_state(store, MACHINE)
    handle = VmHandle.model_validate(state.vm)
    fo.stop_capture(vms / MACHINE)
    VmCapture(fo.vm_host("local"), handle, store, disk="root", epoch=state.epoch,
              disk_size=cfg.disks[0].size).final_capture()
    commit_state(store, state.next(step="vm-stopped", vm=None))
    vm_last = parse_markers(Path(handle.serial_log).read_text(errors="replace"))[-1].counter
    step("the VM serves", f"it wrote up to counter {vm_last}; stopped with its last writes shipped as epoch "
                          f"{state.epoch} logs", t)

    t = time.monotonic()
    consolidate(machine=MACHINE, store=store.url)
    cat = load_catalog(store, MACHINE, "root", cfg.disks[0].size)
    out = root / "newest-point.raw"
    export_point(store, cat, find_point(cat), "raw", out)
    replica = read_marker(out)
    ok = replica is not None and replica.counter == vm_last
    step("replica check", f"newest point {cat.points[-1].id} holds counter "
                          f"{replica.counter if replica else None} (the VM's last: {vm_last})", t)

    table = Table(title="hotspare demo: what happened")
    for col in ("step", "what", "seconds"):
        table.add_column(col)
    for name, detail, secs in rows:
        table.add_row(name, detail, f"{secs:.1f}")
    console.print(table)
    console.print(f"time from the machine's silence to the VM's first marker: {rto:.1f}s "
                  f"(heartbeat window {WINDOW}s included)")
    console.print(f"store: {store.url}\nPrefect UI: flow runs 'consolidate demo' and 'failover demo' with their "
                  "artifacts (approval, VM screen, tables); run `prefect server start` and set PREFECT_API_URL "
                  "before the demo to keep them.")
    if not ok:
        raise HotspareError("the newest recovery point does not hold the VM's last write")
    console.print("[green]the replica holds the VM's last write[/]")


def _stop_previous(root: Path, vms: Path) -> None:
    """A VM left running by an interrupted earlier demo is stopped before starting over."""
    from hotspare import failover as fo
    from hotspare.vm.host import load_handle

    workdir = vms / MACHINE
    if not workdir.exists():
        return
    fo.stop_capture(workdir)
    handle = load_handle(workdir)
    if handle is not None:
        fo.vm_host("local").kill(handle)
