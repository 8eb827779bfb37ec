"""Failback: bytes moved, wall time and cut-over downtime, against the bytes that really
changed and a full copy of the disk measured in the same run.

    .venv/bin/python bench/failback.py [--size-gib 1] [--changed 0.02] [--workdir DIR] [--keep]

No real VM runs: the failover is simulated and the VM's writes are written straight into
the store as logs of its epoch, as its capture would ship them. In a local store, with
Prefect's temporary API (PREFECT_HOME in the work directory), it

- builds a raw image (random data in 25% of its 1 MiB pieces), protects it (auto-approve
  policy), ships it with one agent cycle and consolidates it (the seed point);
- lets the machine die with unshipped writes: random 64 KiB blocks (0.2% of the disk)
  written after the agent's pass (its *divergence*);
- fails over without a VM: fences epoch 0, commits the state ``failed-over`` in epoch 1
  (``vm`` None, so the cut-over stops nothing), and writes epoch-1 logs of random
  4 KiB..1 MiB writes covering ``--changed`` of the disk;
- copies the machine's disk (the full-copy reference's target), starts the agent's restore
  mode (``Restorer``) on the image in a thread, waits for its divergence report, then runs
  the ``failback`` flow in-process (``approve=True``) while a thread keeps writing small
  epoch-1 logs until the phase leaves ``phase-one`` (so phase two has deltas to move);
- exports the newest point to a raw file (not timed in any reference) and checks the
  machine's disk against it with ``qemu-img compare`` (FAIL if they differ);
- times ``qemu-img convert -n -f raw -O raw REPLICA.raw TARGET.img`` onto the copy: a full
  copy of the replica onto the machine's disk, the reference.

Prints (1) bytes moved (the apply orders' bytes) against the bytes changed during the
failover (the union of the epoch-1 writes and of the divergence's 64 KiB blocks, computed
here from what was written, not from the flow's plan), target <= 1.05x; (2) failback wall
time and bytes against the full copy; (3) phase-two downtime (the state's cut-over to
finish) against the whole failback. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import scratch  # noqa: E402
from hotspare import layout  # noqa: E402
from hotspare.capture.agent import Agent  # noqa: E402
from hotspare.catalog import load_catalog  # noqa: E402
from hotspare.consolidate.export import export_point, find_point  # noqa: E402
from hotspare.extentlog import Extent, LogWriter  # noqa: E402
from hotspare.failback import ranges as rg  # noqa: E402
from hotspare.failback.orders import load_orders  # noqa: E402
from hotspare.failback.restore import Restorer  # noqa: E402
from hotspare.fence import fence_disk  # noqa: E402
from hotspare.heartbeat import load_heartbeat  # noqa: E402
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, Policy, save_machine  # noqa: E402
from hotspare.state import commit_state, load_state  # noqa: E402
from hotspare.store import open_store  # noqa: E402

MACHINE, DISK = "bench", "root"
BS = DEFAULT_BLOCK_SIZE  # the agent's block: the divergence's granularity
MiB = 1 << 20
DIVERGENCE = 0.002  # fraction of the disk written as unshipped 64 KiB blocks
LOG_BYTES = 8 * MiB  # data per epoch-1 log written up front
BG_WRITES, BG_MAX, BG_INTERVAL = 4, 64 << 10, 0.5  # background VM writes during phase one
MOVED_TARGET = 1.05

console = Console() if sys.stdout.isatty() else Console(width=150)  # a readable table in logs too


def random_image(path: Path, size: int, rng: np.random.Generator, fill: float = 0.25) -> None:
    """A raw image with random data in a fraction of its 1 MiB pieces, zeros elsewhere
    (tests/helpers.py ``random_image``)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if rng.random() < fill:
                f.seek(off)
                f.write(rng.integers(0, 256, min(MiB, size - off), dtype=np.uint8).tobytes())


def diverge(path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """The machine's last writes, which never ship: random 64 KiB blocks. Returns them."""
    nblocks = size // BS
    blocks = np.sort(rng.choice(nblocks, size=max(1, round(nblocks * DIVERGENCE)), replace=False))
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in blocks.tolist():
            os.pwrite(fd, rng.bytes(BS), b * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    return blocks


def write_size(rng: np.random.Generator, hi: int) -> int:
    """4 KiB..``hi``, log-uniform, a multiple of 4 KiB (as bench/consolidate.py)."""
    return min(4096 * max(1, round(2 ** rng.uniform(0, np.log2(hi // 4096)))), hi)


def covering_writes(size: int, fraction: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random 4 KiB..1 MiB writes at 4 KiB-aligned offsets until their union covers
    ``fraction`` of the disk."""
    target = int(size * fraction)
    writes: list[tuple[int, int]] = []
    covered = 0
    while covered < target:
        n = min(write_size(rng, MiB), -(-(target - covered) // 4096) * 4096)
        writes.append((int(rng.integers(0, (size - n) // 4096 + 1)) * 4096, n))
        a = np.array(writes, dtype=np.int64)
        covered = rg.total(rg.from_extents(a[:, 0], a[:, 1]))
    return writes


class VmLogs:
    """The VM epoch's logs, written into the store as its capture ships them: seqs from 0,
    create-only under their seq range. Remembers every write."""

    def __init__(self, store, size: int, epoch: int) -> None:
        self.store, self.size, self.epoch = store, size, epoch
        self.seq = 0
        self.writes: list[tuple[int, int]] = []
        self.keys: list[str] = []
        self.lock = threading.Lock()

    def ship(self, writes: list[tuple[int, int]], rng: np.random.Generator, gate=None) -> bool:
        """One log of ``writes`` (random bytes); ``gate`` is asked right before the upload
        (False: dropped, nothing shipped)."""
        with self.lock:
            sink = io.BytesIO()
            w = LogWriter(sink, machine=MACHINE, disk=DISK, epoch=self.epoch, disk_size=self.size)
            ts = datetime.now(timezone.utc)
            for i, (off, n) in enumerate(writes):
                w.add(Extent(seq=self.seq + i, offset=off, length=n, data=rng.bytes(n), ts=ts))
            meta = w.close()
            if gate is not None and not gate():
                return False
            key = layout.log_key(MACHINE, DISK, self.epoch, meta.first_seq, meta.last_seq)
            self.store.put(key, sink.getvalue(), create_only=True)
            self.seq = meta.last_seq + 1
            self.writes += writes
            self.keys.append(key)
            return True

    def ship_all(self, writes: list[tuple[int, int]], rng: np.random.Generator) -> None:
        batch, data = [], 0
        for off, n in writes:
            batch.append((off, n))
            data += n
            if data >= LOG_BYTES:
                self.ship(batch, rng)
                batch, data = [], 0
        if batch:
            self.ship(batch, rng)


class Watch:
    """Polls the machine's state: when each (state, phase) began; keeps the VM writing
    small logs while the failback has not left phase one."""

    def __init__(self, store, vm: VmLogs, rng: np.random.Generator) -> None:
        self.store, self.vm, self.rng = store, vm, rng
        self.seen: list[tuple[float, str]] = []
        self.bg_logs = 0
        self.bg_bytes = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._states, daemon=True),
                        threading.Thread(target=self._writer, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _states(self) -> None:
        last = None
        while not self.stop.is_set():
            st = load_state(self.store, MACHINE)
            now = (st.state, st.phase)
            if now != last:
                self.seen.append((time.perf_counter(), f"{st.state}" + (f"/{st.phase}" if st.phase else "")))
                last = now
            self.stop.wait(0.05)

    def _vm_serving(self) -> bool:
        st = load_state(self.store, MACHINE)
        return st.state == "failed-over" or (st.state == "failing-back" and st.phase == "phase-one")

    def _writer(self) -> None:
        while not self.stop.is_set() and self._vm_serving():
            writes = []
            for _ in range(BG_WRITES):
                n = write_size(self.rng, BG_MAX)
                writes.append((int(self.rng.integers(0, (self.vm.size - n) // 4096 + 1)) * 4096, n))
            if not self.vm.ship(writes, self.rng, gate=self._vm_serving):
                return
            self.bg_logs += 1
            self.bg_bytes += sum(n for _, n in writes)
            self.stop.wait(BG_INTERVAL)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def stop_prefect() -> None:
    """Flush Prefect's logs and events, then stop its temporary server (it keeps its
    database in the work directory, which goes next)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        SubprocessASGIServer().stop()
    except Exception as err:  # best effort: the figures are printed already
        console.print(f"[yellow]stopping Prefect's temporary server: {err}[/yellow]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0, help="disk size (default 1)")
    ap.add_argument("--changed", type=float, default=0.02,
                    help="fraction of the disk the VM writes during the failover (default 0.02)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where the image, store and Prefect home go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    ap.add_argument("--verbose", action="store_true", help="show Prefect's flow and task logs")
    args = ap.parse_args()

    size = int(args.size_gib * (1 << 30)) // MiB * MiB
    if size < 16 * MiB or not 0 < args.changed <= 0.5:
        console.print("[red]--size-gib must be at least 16 MiB and --changed in (0, 0.5][/red]")
        return 2
    for tool in ("qemu-img",):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} is missing: apt-get install qemu-utils[/red]")
            return 2

    with scratch(args.workdir.absolute(), "failback", args.keep, console) as root:
        # Prefect's temporary API, its own home in the work directory (as scripts/run.sh);
        # set before anything imports prefect.
        os.environ["PREFECT_HOME"] = str(root / "prefect")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        if not args.verbose:
            os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        (root / "prefect").mkdir()
        try:
            return run(args, root, size)
        finally:
            if "prefect" in sys.modules:
                stop_prefect()


def run(args: argparse.Namespace, root: Path, size: int) -> int:
    from flows.consolidate import consolidate
    from flows.failback import failback

    rng = np.random.default_rng(args.seed)
    image, state_dir, store_dir = root / "machine.img", root / "agent", root / "store"
    replica, target = root / "replica.raw", root / "full-copy-target.img"
    console.print(f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    console.print("no real VM: the failover is simulated (fence + state) and the VM's writes are written "
                  "straight into the store as epoch-1 logs; the cut-over stops no VM")

    # -- protect, seed, consolidate ---------------------------------------------------------
    t = time.perf_counter()
    random_image(image, size, rng)
    store = open_store(str(store_dir))
    cfg = MachineConfig(name=MACHINE, disks=[DiskSpec(name=DISK, path=str(image), size=size, block_size=BS)],
                        policy=Policy(auto_approve=True))
    save_machine(store, cfg, create_only=True)
    with Agent(store, cfg, state_dir, tracker="scan") as agent:
        seed = agent.cycle().disks[0]
    console.print(f"seed: {size / 2**30:.2f} GiB image, {seed.data_bytes / MiB:.0f} MiB shipped in "
                  f"{len(seed.logs)} log(s), {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    consolidate(machine=MACHINE, store=store.url)
    console.print(f"seed consolidated (and Prefect's temporary API started) in {time.perf_counter() - t:.1f} s")

    # -- the machine dies with unshipped writes; the failover, simulated -----------------------
    div_blocks = diverge(image, size, rng)
    for d in cfg.disks:
        fence_disk(store, MACHINE, d, 0, "bench: simulated failover")
    ms = load_state(store, MACHINE)
    commit_state(store, ms.next(state="failed-over", step="verified", epoch=1, vm=None, host="local",
                                reason="bench: simulated failover"))
    vm = VmLogs(store, size, epoch=1)
    vm.ship_all(covering_writes(size, args.changed, rng), rng)
    up_front = len(vm.writes)
    console.print(f"machine died with {len(div_blocks)} unshipped 64 KiB block(s); the VM wrote {up_front} "
                  f"writes covering {args.changed:.1%} of the disk in {len(vm.keys)} epoch-1 log(s)")

    t = time.perf_counter()
    shutil.copyfile(image, target)  # the full copy's target: the machine's disk as it returns
    console.print(f"copied the machine's disk for the full-copy reference in {time.perf_counter() - t:.1f} s")

    # -- the machine returns in restore mode -------------------------------------------------------
    restorer = Restorer(store, cfg, state_dir)
    r_out: dict = {}

    def restore() -> None:
        try:
            r_out["finished"] = restorer.run(interval=0.2)
        except BaseException as err:  # reported below
            r_out["error"] = err

    t_r = time.perf_counter()
    r_thread = threading.Thread(target=restore, daemon=True)
    r_thread.start()
    while True:
        hb = load_heartbeat(store, MACHINE)
        if hb is not None and hb.mode == "restore" and hb.restore is not None and DISK in hb.restore.divergence:
            break
        if not r_thread.is_alive():
            console.print(f"[red]FAIL: the restore agent stopped: {r_out.get('error')!r}[/red]")
            return 1
        time.sleep(0.05)
    div_seconds = time.perf_counter() - t_r
    reported = hb.restore.divergence[DISK]
    console.print(f"restore agent: divergence {reported.blocks} block(s) reported after "
                  f"{div_seconds:.1f} s (it hashes the whole disk)")

    # -- the failback, with the VM still writing during phase one ----------------------------------
    watch = Watch(store, vm, np.random.default_rng(args.seed + 1))
    watch.start()
    t0 = time.perf_counter()
    try:
        fstate = failback(machine=MACHINE, store=store.url, approve=True, vm_dir=str(root / "vms"),
                          return_state=True)
    finally:
        t_fb = time.perf_counter() - t0
        watch.join()
    ok = fstate.is_completed()
    if not ok:
        restorer.stop_requested = True
    r_thread.join(30)
    if not ok:
        console.print(f"[red]FAIL: the failback flow ended {fstate.type.value}: {fstate.message}[/red]")
        return 1
    if r_out.get("finished") is not True:
        console.print(f"[red]FAIL: the restore agent did not finish: {r_out}[/red]")
        return 1
    result = fstate.result()
    final = load_state(store, MACHINE)
    downtime = final.failback.downtime_s if final.failback else None

    # -- checks --------------------------------------------------------------------------------
    cat = load_catalog(store, MACHINE, DISK, size)
    point = find_point(cat)
    t = time.perf_counter()
    export_point(store, cat, point, "raw", replica)
    export_s = time.perf_counter() - t
    problems = []
    if tuple(point.position) != (1, vm.seq - 1):
        problems.append(f"the newest point is at {tuple(point.position)}, the VM's last write at (1, {vm.seq - 1}): "
                        "some epoch-1 logs did not reach the replica")
    cmp = qemu_img("compare", "-f", "raw", "-F", "raw", str(image), str(replica))
    if cmp.returncode != 0:
        problems.append(f"qemu-img compare: the machine's disk differs from the newest point: "
                        f"{(cmp.stdout + cmp.stderr).strip()}")

    # -- the reference: a full copy of the replica onto the machine's disk -------------------------
    t = time.perf_counter()
    conv = qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(replica), str(target))
    copy_s = time.perf_counter() - t
    if conv.returncode != 0:
        console.print(f"[red]qemu-img convert failed: {conv.stderr.strip()}[/red]")
        return 1
    t = time.perf_counter()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_s = time.perf_counter() - t
    if qemu_img("compare", "-f", "raw", "-F", "raw", str(target), str(replica)).returncode != 0:
        problems.append("the full copy's target differs from the replica (reference broken)")

    # -- figures -----------------------------------------------------------------------------------
    orders = load_orders(store, MACHINE, 1)
    applies = [o for o in orders if o.kind == "apply"]
    moved = sum(o.bytes for o in applies)
    w = np.array(vm.writes, dtype=np.int64)
    vm_ranges = rg.from_extents(w[:, 0], w[:, 1])
    div_ranges = rg.from_blocks(div_blocks, BS, size)
    changed = rg.total(rg.union(vm_ranges, div_ranges))
    flow_moved = sum((result.bytes_moved or {}).values())

    def mib(n: float) -> str:
        return f"{n / MiB:,.1f} MiB"

    def verdict(good: bool) -> str:
        return "[green]met[/green]" if good else "[red]not met[/red]"

    console.print(f"\n[bold]failback[/bold]: {size / 2**30:.2f} GiB disk, VM wrote {args.changed:.1%} up front "
                  f"+ {mib(watch.bg_bytes)} in {watch.bg_logs} small log(s) while phase one ran, "
                  f"{len(div_blocks)} unshipped 64 KiB blocks, local store, no real VM")
    table = Table()
    for col, just in (("figure", "left"), ("hotspare", "right"), ("reference (same run)", "right"),
                      ("ratio", "right"), ("target", "left")):
        table.add_column(col, justify=just)
    ratio = moved / changed
    table.add_row("bytes moved vs bytes changed during the failover", mib(moved), mib(changed),
                  f"{ratio:.3f}x", f"<= {MOVED_TARGET}x: {verdict(ratio <= MOVED_TARGET)}")
    table.add_row("failback wall time vs full copy (qemu-img convert -n; export not counted)", f"{t_fb:.1f} s",
                  f"{copy_s:.1f} s", f"{t_fb / copy_s:.2f}x", "")
    table.add_row("  + the restore agent's divergence scan before it", f"{t_fb + div_seconds:.1f} s",
                  f"{copy_s:.1f} s", f"{(t_fb + div_seconds) / copy_s:.2f}x", "")
    table.add_row("failback bytes vs full copy", mib(moved), mib(size), f"{moved / size:.3f}x", "")
    if downtime is not None:
        table.add_row("phase-two downtime (cut-over to finish) vs whole failback", f"{downtime:.1f} s",
                      f"{t_fb:.1f} s", f"{downtime / t_fb:.2f}x", "")
    else:
        table.add_row("phase-two downtime vs whole failback", "not recorded", f"{t_fb:.1f} s", "", "")
    check = "[green]equal[/green]" if not problems else "[red]FAIL[/red]"
    table.add_row("machine's disk vs newest point (qemu-img compare)", check, "", "", "")
    console.print(table)

    detail = Table(title="where the bytes and the time went")
    detail.add_column("")
    detail.add_column("value", justify="right")
    detail.add_row("changed: VM epoch writes (union)", mib(rg.total(vm_ranges)))
    detail.add_row("  of them written while phase one ran (not a union)", mib(watch.bg_bytes))
    detail.add_row("changed: machine divergence (64 KiB blocks)", mib(rg.total(div_ranges)))
    detail.add_row("changed: union of both", mib(changed))
    for o in orders:
        detail.add_row(f"order {o.version} {o.label} ({o.kind})", mib(o.bytes) if o.kind == "apply" else "")
    detail.add_row("flow's own bytes_moved", mib(flow_moved))
    spans = watch.seen + [(t0 + t_fb, "end")]
    for (a, name), (b, _) in zip(spans, spans[1:]):
        if name.startswith(("failing-back", "failed-over")) and b > t0:
            detail.add_row(f"time in {name}", f"{b - max(a, t0):.1f} s")
    detail.add_row("restore agent's divergence scan (before the flow)", f"{div_seconds:.1f} s")
    detail.add_row("export of the newest point (not in any figure)", f"{export_s:.1f} s")
    detail.add_row("fsync of the full copy's target after qemu-img (not counted)", f"{fsync_s:.2f} s")
    console.print(detail)

    console.print(f"bytes moved / changed = {ratio:.3f}x (target <= {MOVED_TARGET}x): "
                  f"{verdict(ratio <= MOVED_TARGET)}; failback / full copy = {t_fb / copy_s:.2f}x in time, "
                  f"{moved / size:.3f}x in bytes; downtime = "
                  + (f"{downtime / t_fb:.0%} of the failback" if downtime is not None else "not recorded")
                  + f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if flow_moved != moved:
        console.print(f"[yellow]note: the flow reports {flow_moved} bytes moved, the apply orders {moved}[/yellow]")
    for p in problems:
        console.print(f"[red]FAIL: {p}[/red]")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
