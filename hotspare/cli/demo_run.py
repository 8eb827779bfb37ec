"""What ``hotspare demo`` runs: the main job on embedded defaults (a store in a local directory,
Prefect's temporary local API, the local QEMU VM host).

A bootable demo disk plays the protected physical machine: QEMU boots it from the storage
daemon's NBD export, and its guest writes a counter to its data partition every second while
the agent ships every write at 0.5 s cuts (the demo measures the RPO). Then the machine loses
power (QEMU, the daemon and the agent killed): its last writes never leave it. After the heartbeat window, the failover flow (auto-approve policy)
fences the machine, consolidates, boots the replica as a VM, and captures the VM's writes
as a new epoch; the VM continues counting from what the replica held. Then the machine
returns: its agent runs in restore mode (its unshipped writes are its divergence) and the
failback flow (auto-approve) applies the VM's changes while the VM serves, stops the VM,
applies the last deltas, verifies every block and lifts the fence. The machine's disk is
checked to equal the newest recovery point, and the machine boots from it and counts on,
protected again in a new epoch.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from rich.table import Table

from hotspare.capture.agent import Agent
from hotspare.capture.daemon import running_pid
from hotspare.catalog import load_catalog
from hotspare.cli.common import console
from hotspare.consolidate.export import export_point, find_point
from hotspare.demodisk import build_demo_disk, parse_markers, qemu_accel, read_marker
from hotspare.errors import HotspareError
from hotspare.failback.restore import Restorer
from hotspare.machine import MachineConfig, Policy, parse_disk_arg, save_machine
from hotspare.state import load_state
from hotspare.store import open_store

MACHINE = "demo"
WINDOW = 10  # heartbeat window, seconds (the smallest Prefect's proactive triggers allow)


def _boot_physical(served_at: str, serial: Path) -> subprocess.Popen:
    """The 'physical machine': QEMU whose disk is the storage daemon's NBD export, so every
    guest write passes the tracker (``reconnect-delay``: the guest's I/O waits out a daemon
    restart instead of failing)."""
    sock = served_at.split("socket=", 1)[1]
    drive = (f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=root,"
             "file.reconnect-delay=20,if=virtio")
    return subprocess.Popen(["qemu-system-x86_64", "-accel", qemu_accel(), "-m", "256", "-nodefaults",
                             "-display", "none", "-nic", "none", "-drive", drive, "-serial", f"file:{serial}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _replicate(agent: Agent, serial: Path, seconds: float, interval: float = 0.5) -> tuple[int, list[float]]:
    """Run the agent's cycles for ``seconds`` while the guest counts; returns the logs shipped
    and the measured RPO of each guest write: from its marker on the serial console (the
    guest prints it after its write is durable) to the end of the first cycle that froze
    after it, when its extent is durable in the store."""
    seen: dict[int, float] = {}
    pending: list[int] = []
    rpo: list[float] = []
    shipped = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for m in parse_markers(serial.read_text(errors="replace")) if serial.exists() else []:
            if m.counter not in seen:
                seen[m.counter] = time.monotonic()
                pending.append(m.counter)
        frozen_at = time.monotonic()
        covered = [c for c in pending if seen[c] <= frozen_at]
        shipped += sum(len(d.logs) for d in agent.cycle().disks)
        done = time.monotonic()
        rpo += [done - seen[c] for c in covered]
        pending = [c for c in pending if c not in covered]
        time.sleep(max(0.0, frozen_at + interval - time.monotonic()))
    return shipped, rpo


def _power_loss(physical: subprocess.Popen, agent: Agent) -> None:
    """The machine, its storage daemon and its agent die at once."""
    physical.kill()
    physical.wait()
    pid = agent.daemon.pid()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def _wait_marker(serial: Path, timeout: float, after: int = 0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m.counter for m in parse_markers(serial.read_text(errors="replace"))] if serial.exists() else []
        if found and found[-1] > after:
            return found[-1]
        time.sleep(0.2)
    raise HotspareError(f"no guest marker in {serial} after {timeout:.0f}s")


def run_demo(workdir: Path, *, size_mib: int) -> None:
    from flows.consolidate import consolidate
    from flows.failback import failback
    from flows.failover import failover

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
    agent = Agent(store, cfg, root / "agent", say=lambda s: console.print(f"  agent: {s}"))
    with agent:
        agent.cycle()  # starts the storage daemon and ships the seed
        physical = _boot_physical(agent.daemon.served_at("root"), root / "physical-serial.log")
        try:
            first = _wait_marker(root / "physical-serial.log", 120)
            shipped, rpo = _replicate(agent, root / "physical-serial.log", 6.0)
        finally:
            _power_loss(physical, agent)  # writes since the last cut never leave the machine
    last_physical = read_marker(image)
    rpo_text = (f"RPO from a guest write to its extent durable in the store: median {statistics.median(rpo):.2f}s, "
                f"max {max(rpo):.2f}s over {len(rpo)} writes") if rpo else "no guest write measured"
    step("protect + replicate", f"the machine booted from the daemon's NBD export (counter {first}), the agent "
                                f"shipped {shipped} log(s) at 0.5 s cuts; {rpo_text}; then it lost power at "
                                f"counter {last_physical.counter}", t)


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
    serial = Path(load_state(store, MACHINE).vm["serial_log"])
    vm_now = parse_markers(serial.read_text(errors="replace"))[-1].counter
    step("the VM serves", f"it counts on to {vm_now}; its writes ship as epoch {result.epoch} logs every 2 s", t)

    t = time.monotonic()

    restorer = Restorer(store, cfg, root / "agent", say=lambda s: console.print(f"  machine (restore mode): {s}"))
    done: list[bool] = []
    agent_thread = threading.Thread(target=lambda: done.append(restorer.run(interval=0.5)), daemon=True)
    agent_thread.start()
    _wait_restore_heartbeat(store, agent_thread)
    back = failback(machine=MACHINE, store=store.url, vm_dir=str(vms))
    agent_thread.join(60)
    vm_last = parse_markers(serial.read_text(errors="replace"))[-1].counter
    moved = ", ".join(f"{k} {v} bytes" for k, v in back.bytes_moved.items())
    step("failback", f"the machine returned in restore mode; {moved}; cut-over downtime {back.downtime_s:.1f}s; "
                     f"{back.verified_blocks} blocks verified equal to the replica; protected again in epoch {back.epoch}", t)

    t = time.monotonic()
    out = root / "newest-point.raw"
    cat = load_catalog(store, MACHINE, "root", cfg.disks[0].size)
    export_point(store, cat, find_point(cat), "raw", out)
    on_disk = read_marker(image)
    ok = filecmp.cmp(image, out, shallow=False) and on_disk is not None and on_disk.counter in (vm_last, vm_last + 1)
    step("machine check", f"the machine's disk equals the newest point {cat.points[-1].id} byte for byte and holds "
                          f"counter {on_disk.counter if on_disk else None} (the VM printed {vm_last} last)", t)

    t = time.monotonic()
    agent = Agent(store, cfg, root / "agent", say=lambda s: console.print(f"  agent: {s}"))
    with agent:
        agent.cycle()  # a new daemon: its bitmap died with the power, so a frozen-view scan
        physical = _boot_physical(agent.daemon.served_at("root"), root / "physical-serial-2.log")
        try:
            again = _wait_marker(root / "physical-serial-2.log", 120)
            shipped, _ = _replicate(agent, root / "physical-serial-2.log", 2.0)
        finally:
            physical.kill()
            physical.wait()
            agent.daemon.stop()  # a clean shutdown stores the bitmap
    step("protected again", f"the machine boots from its own disk, through a new storage daemon, and counts on at {again}; its agent shipped "
                            f"{shipped} log(s) in epoch {back.epoch}", t)

    table = Table(title="hotspare demo: what happened")
    for col in ("step", "what", "seconds"):
        table.add_column(col)
    for name, detail, secs in rows:
        table.add_row(name, detail, f"{secs:.1f}")
    console.print(table)
    console.print(f"time from the machine's silence to the VM's first marker: {rto:.1f}s "
                  f"(heartbeat window {WINDOW}s included)")
    console.print(f"store: {store.url}\nPrefect UI: flow runs 'consolidate demo', 'failover demo' and 'failback demo' "
                  "with their artifacts (approvals, VM screen, failback plan, progress, verification, summary); run "
                  "`prefect server start` and set PREFECT_API_URL before the demo to keep them.")
    if not ok:
        raise HotspareError("the machine's disk does not equal the replica's final state")
    console.print("[green]the machine's disk holds the VM's last write, verified block for block[/]")


def _wait_restore_heartbeat(store, agent_thread: threading.Thread, timeout: float = 120) -> None:
    """The failback starts once the returning machine reports in restore mode."""
    from hotspare.heartbeat import load_heartbeat

    deadline = time.monotonic() + timeout
    while True:
        hb = load_heartbeat(store, MACHINE)
        if hb is not None and hb.mode == "restore":
            return
        if not agent_thread.is_alive() or time.monotonic() > deadline:
            raise HotspareError("the returning machine's agent did not report in restore mode")
        time.sleep(0.2)


def _stop_previous(root: Path, vms: Path) -> None:
    """A VM left running by an interrupted earlier demo is stopped before starting over."""
    from hotspare import failover as fo
    from hotspare.vm.host import load_handle

    pid = running_pid(root / "agent" / "qsd" / "pid")
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    workdir = vms / MACHINE
    if not workdir.exists():
        return
    fo.stop_capture(workdir)
    handle = load_handle(workdir)
    if handle is not None:
        fo.vm_host("local").kill(handle)
