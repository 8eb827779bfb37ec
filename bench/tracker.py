"""The qemu tracker: write throughput through its export, RPO, and cost against the disk's
size, each against a reference measured in the same run.

    .venv/bin/python bench/tracker.py [--size-gib 16] [--small-gib 1] [--seconds 4] [--store local|s3|both]
                                      [--workdir DIR] [--keep]

1. Throughput: fio over NBD (``--ioengine=nbd``), sequential 64 KiB writes (iodepth 16) and
   random 4 KiB writes (iodepth 32) over a ``--small-gib`` disk for ``--seconds`` each,
   through the agent's export (qemu-storage-daemon with its dirty bitmap) while the agent
   cycles every 0.5 s into the local store, against ``qemu-nbd -f raw --cache=writeback``
   serving the same raw file with no bitmap. Interleaved, best of ``--rounds``. The export
   with the agent not cycling is shown too, to tell the bitmap's cost from the cycles', and
   the agent at ``--cpu-limit`` (default 0.5 of a CPU), with how long it waited for its
   budget and how far it lagged behind the writes. Target >= 0.8; a second reference,
   ``qemu-nbd --aio=io_uring``, shows the same I/O engine as the daemon's.
2. RPO: a writer process writes ``--writes`` unique 4 KiB blocks (one per 64 KiB block, a
   header naming the write) with FUA through our NBD export at Poisson times, and timestamps
   each acknowledgement (CLOCK_MONOTONIC); fio writes random 4 KiB blocks at ``--bg-iops``
   in the other half of the disk meanwhile; the agent cycles every 0.5 s. The bench records
   each cycle's freeze start and the time its cut log's upload returned (by wrapping the
   tracker's ``_freeze`` and the store's ``put_file`` on the instances: engine unchanged).
   Afterwards every log is read back from the store to find the cut that first holds each
   write's bytes: RPO = that cut's upload end - the acknowledgement (no guessing). The
   reference is ack -> the next freeze start (the wait for a cut that 0.5 s cadence alone
   costs). Per store (local, SeaweedFS via ``weed mini``). Target p99 < 1 s.
3. Cost follows the writes: the same ``--cycles`` cycles of 200 random 64 KiB writes on a
   ``--small-gib`` and a ``--size-gib`` sparse disk (the seed and one warm-up cycle
   excluded): mean cycle time, agent CPU (``getrusage`` self + children around
   ``Agent.cycle``) and the daemon's CPU (/proc) per cycle, with where the cycle time goes.
   Target ratio <= 1.2. Then the idle agent: cycles at 0.5 s for ``--idle-seconds``, CPU
   extrapolated to an hour.

Nothing is asserted: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import scratch
from hotspare.capture import qemu as qemu_mod
from hotspare.capture.agent import Agent, CycleReport
from hotspare.capture.daemon import io_engine
from hotspare.extentlog.reader import iter_extents
from hotspare.machine import DEFAULT_BLOCK_SIZE, DiskSpec, MachineConfig, save_machine
from hotspare.store import open_store
from hotspare.store.base import Store
from tests.servers import CountingStore

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = DEFAULT_BLOCK_SIZE
DISK = "root"
BUCKET = "hotspare-tracker"
INTERVAL = 0.5
TARGET_TP, TARGET_RPO, TARGET_COST = 0.8, 1.0, 1.2
WRITES_PER_CYCLE, COST_WRITE = 200, 64 * KiB
MAGIC = 0x68737270_6f777274  # the RPO writer's header
CLK_TCK = os.sysconf("SC_CLK_TCK")

console = Console()


# ------------------------------------------------------------------ a minimal NBD client


class NbdClient:
    """Fixed newstyle handshake, NBD_OPT_GO, simple replies, one request at a time."""

    def __init__(self, uri: str) -> None:
        u = urllib.parse.urlparse(uri)
        export = urllib.parse.unquote(u.path.lstrip("/")).encode()
        path = urllib.parse.parse_qs(u.query)["socket"][0]
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != 0x4E42444D41474943 or opt != 0x49484156454F5054:
            raise RuntimeError(f"{uri}: not a newstyle NBD server")
        self.s.sendall(struct.pack(">I", hflags & 3))  # FIXED_NEWSTYLE | NO_ZEROES as offered
        data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)  # NBD_OPT_GO
        self.size, self.flags = 0, 0
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(rlen)
            if rtype & (1 << 31):
                raise RuntimeError(f"{uri}: NBD_OPT_GO refused ({rtype:#x}) {payload!r}")
            if rtype == 3 and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            if rtype == 1:
                break
        self.handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.s.recv_into(view[got:])
            if not k:
                raise RuntimeError("NBD server closed the connection")
            got += k
        return bytes(buf)

    def _request(self, typ: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> None:
        self.handle += 1
        head = struct.pack(">IHHQQI", 0x25609513, flags, typ, self.handle, offset, length)
        self.s.sendmsg([head, data] if data else [head])
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or handle != self.handle or err:
            raise RuntimeError(f"NBD request {typ} at {offset} failed: error {err}")

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        use_fua = fua and self.flags & (1 << 3)
        self._request(1, offset, len(data), data, 1 if use_fua else 0)
        if fua and not use_fua:
            self.flush()

    def flush(self) -> None:
        self._request(3, 0, 0)

    def close(self) -> None:
        try:
            self.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
        finally:
            self.s.close()


# ------------------------------------------------------------------------------ helpers


def make_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def machine(store: Store, name: str, image: Path, size: int) -> MachineConfig:
    cfg = MachineConfig(name=name, disks=[DiskSpec(name=DISK, path=str(image), size=size, block_size=BS)])
    save_machine(store, cfg, create_only=True)
    return cfg


def cpu_self_children() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def fio(uri: str, out: Path, *, rw: str, bs: str, iodepth: int, seconds: float, size: int, offset: int = 0,
        extra: tuple[str, ...] = (), background: bool = False):
    args = ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", f"--offset={offset}", f"--size={size}", "--time_based",
            f"--runtime={max(1, round(seconds))}", "--randrepeat=0", "--norandommap", "--output-format=json",
            f"--output={out}", *extra]
    if background:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-2000:]}")
    res = fio_result(out)
    if res is None:
        raise RuntimeError(f"fio wrote no result: {p.stderr.strip()[-2000:]}")
    return res


def fio_result(out: Path) -> dict | None:
    """The write side of fio's JSON output (it may print a line before the JSON)."""
    try:
        text = out.read_text()
        return json.loads(text[text.index("{"):])["jobs"][0]["write"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def wait_socket(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{path}: no server after {timeout} s")


def percentile(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def mark(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]not met[/red]"


class Timers:
    """Wall time per wrapped call, accumulated by label (instance attributes: the engine is
    not changed; nested labels overlap, so the table says which contains which)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, name: str, label: str) -> None:
        orig = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.acc[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(obj, name, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.acc)


STEPS = [  # label, what it is
    ("cycle", "Agent.cycle, all of it"),
    ("prepare", "  _prepare: state, catalog, store listing"),
    ("dirty?", "  _dirty: query-named-block-nodes"),
    ("freeze", "  _freeze: fleece (a copy of a template), blockdev-add, transaction, 2 exports"),
    ("fleece create", "    of which qemu-img create of the template (once per disk size)"),
    ("ship", "  _ship: map, read, log, upload, hash map"),
    ("nbdinfo", "    of which nbdinfo --map (subprocess)"),
    ("read view", "    of which read_view: NBD reads and trims, zero test, xxh3"),
    ("upload", "    of which store.put_staged (the upload)"),
    ("hash map", "    of which update_hashes + save_meta"),
    ("release", "  _release: drop exports, cancel job, blockdev-del"),
    ("heartbeat", "  heartbeat"),
]


def instrument(ag: Agent, timers: Timers) -> None:
    assert ag.qemu is not None
    timers.wrap(ag, "cycle", "cycle")
    timers.wrap(ag, "_prepare", "prepare")
    timers.wrap(ag, "heartbeat", "heartbeat")
    timers.wrap(ag.qemu, "_dirty", "dirty?")
    timers.wrap(ag.qemu, "_freeze", "freeze")
    timers.wrap(ag.qemu, "_ship", "ship")
    timers.wrap(ag.qemu, "_release", "release")
    timers.wrap(ag.store, "put_staged", "upload")
    timers.wrap(ag.state, "update_hashes", "hash map")
    timers.wrap(ag.state, "save_meta", "hash map")


_patched = False


def patch_module_timers(timers_of: Callable[[], Timers | None]) -> None:
    """nbdinfo, read_view and qemu-img create are module-level calls of the tracker: time them
    for whichever Timers is current."""
    global _patched
    if _patched:
        return
    _patched = True

    def timed(fn: Callable, label: str) -> Callable:
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if (tm := timers_of()) is not None:
                    tm.acc[label] += time.perf_counter() - t
        return run

    def timed_gen(fn: Callable, label: str) -> Callable:  # the time spent in each next()
        def run(*a, **k):
            it = fn(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    if (tm := timers_of()) is not None:
                        tm.acc[label] += time.perf_counter() - t
                yield item
        return run

    qemu_mod.dirty_runs = timed(qemu_mod.dirty_runs, "nbdinfo")
    qemu_mod.read_view = timed_gen(qemu_mod.read_view, "read view")
    qemu_mod.qemu_img = timed(qemu_mod.qemu_img, "fleece create")


_current_timers: Timers | None = None


@dataclass
class Running:
    """An agent looping in a thread, its cycles recorded."""

    agent: Agent
    thread: threading.Thread | None = None
    reports: list[tuple[float, CycleReport]] = field(default_factory=list)

    def start(self, on_cycle: Callable[[CycleReport], None] | None = None) -> None:
        self.agent.stop_requested = False

        def cb(r: CycleReport) -> None:
            self.reports.append((time.monotonic(), r))
            if on_cycle:
                on_cycle(r)

        self.thread = threading.Thread(target=self.agent.run, kwargs={"interval": INTERVAL, "once": False, "on_cycle": cb},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.agent.stop_requested = True
        if self.thread is not None:
            self.thread.join(300)
        self.agent.stop_requested = False


# ------------------------------------------------------------------------ 1. throughput


def throughput(args, root: Path, daemons: list) -> dict:
    size = args.small
    image = root / "tp.img"
    make_sparse(image, size)
    store = open_store(str(root / "store-local"))
    cfg = machine(store, "tp", image, size)
    state = root / "state-tp"
    sock = root / "qemu-nbd.sock"
    ref_uri = f"nbd+unix:///root?socket={sock}"
    out = root / "fio.json"
    workloads = {"seq": {"rw": "write", "bs": "64k", "iodepth": 16}, "rand": {"rw": "randwrite", "bs": "4k", "iodepth": 32}}

    def ref(w: str, aio: str = "threads") -> dict:
        p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", DISK, "--cache=writeback", "-t",
                              f"--aio={aio}", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_socket(sock)
            return fio(ref_uri, out, seconds=args.seconds, size=size, **workloads[w])
        finally:
            p.terminate()
            p.wait(30)

    def ours(w: str, cycling: bool, cpu_limit: float | None = None) -> dict:
        with Agent(store, cfg, state, cpu_limit=cpu_limit) as ag:
            daemons.append(ag.daemon)
            ag.cycle()  # adopt or start the daemon, ship what is pending: not measured
            run = Running(ag)
            c0, d0 = cpu_self_children()[0], proc_cpu(ag.daemon.pid())
            if cycling:
                run.start()
            try:
                res = fio(ag.daemon.served_at(DISK), out, seconds=args.seconds, size=size, **workloads[w])
            finally:
                t_end = time.monotonic()
                run.stop()  # the cycle under way finishes: how far the agent lags behind the writes
                lag = time.monotonic() - t_end
            c1, d1 = cpu_self_children()[0], proc_cpu(ag.daemon.pid())
            ag.daemon.stop()  # qemu-nbd needs the file: the daemon holds its lock
        res = dict(res)
        cyc = [r for _, r in run.reports]
        res["cycles"] = len(cyc)
        res["shipped"] = sum(d.data_bytes + d.zero_bytes for r in cyc for d in r.disks)
        res["cycle_s"] = [d.seconds for r in cyc for d in r.disks]
        res["agent_cpu"], res["daemon_cpu"], res["lag"] = c1 - c0, d1 - d0, lag
        res["paced"] = sum(d.paced_seconds for r in cyc for d in r.disks)
        return res

    # The seed on the sparse disk, then one sequential pass with qemu-nbd so every block is
    # allocated before anything is timed.
    with Agent(store, cfg, state) as ag:
        daemons.append(ag.daemon)
        ag.cycle()
        ag.daemon.stop()
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", DISK, "--cache=writeback", "-t",
                          str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_socket(sock)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={ref_uri}", "--rw=write", "--bs=1m",
                        "--iodepth=8", f"--size={size}", f"--output={out}"], check=True, capture_output=True)
    finally:
        p.terminate()
        p.wait(30)

    best: dict = {}
    contenders = [("ref", lambda w: ref(w)), ("ref-uring", lambda w: ref(w, io_engine())),
                  ("ours", lambda w: ours(w, True)), ("idle", lambda w: ours(w, False)),
                  ("limited", lambda w: ours(w, True, args.cpu_limit))]
    for i in range(args.rounds):
        for w in workloads:
            k = i % len(contenders)
            order = contenders[k:] + contenders[:k]  # interleaved: background load hits all alike
            for name, fn in order:
                r = fn(w)
                console.print(f"  throughput round {i + 1}, {w}, {name}: {r['bw_bytes'] / MiB:,.0f} MiB/s, "
                              f"{r['iops']:,.0f} IOPS" + (f", {r['cycles']} cycles, "
                                                          f"{r['shipped'] / MiB:,.0f} MiB shipped"
                                                          if name in ("ours", "limited") else ""))
                key = (w, name)
                if key not in best or r["bw_bytes"] > best[key]["bw_bytes"]:
                    best[key] = r
    store.close()
    return best


def report_throughput(args, best: dict) -> None:
    console.print(f"\n[bold]1. write throughput through the export[/bold]: fio --ioengine=nbd, "
                  f"{args.small / GiB:g} GiB disk, {args.seconds:g} s per run, best of {args.rounds}, "
                  f"agent cycling every {INTERVAL} s into the local store")
    t = Table()
    for col, just in [("workload", "left"), ("hotspare export + agent cycles", "right"),
                      ("qemu-nbd, no bitmap", "right"), ("ratio", "right"), ("target", "right"), ("", "left")]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for agent, how in [("ours", ""), ("limited", f", agent at --cpu-limit {args.cpu_limit:g}")]:
        for w, label, unit in [("seq", "sequential 64 KiB writes, QD16", "MiB/s"),
                               ("rand", "random 4 KiB writes, QD32", "IOPS")]:
            o, r = best[(w, agent)], best[(w, "ref")]
            f = (lambda x: x["bw_bytes"] / MiB) if unit == "MiB/s" else (lambda x: x["iops"])
            ratio = f(o) / f(r)
            t.add_row(label + how, f"{f(o):,.0f} {unit}", f"{f(r):,.0f} {unit}", f"{ratio:.2f}", f">= {TARGET_TP}",
                      mark(ratio >= TARGET_TP))
    console.print(t)
    d = Table(title="throughput details")
    d.add_column("")
    d.add_column("sequential 64 KiB", justify="right")
    d.add_column("random 4 KiB", justify="right")

    def row(label: str, fn, agent: str = "ours") -> None:
        d.add_row(label, fn(best[("seq", agent)], best[("seq", "idle")], best[("seq", "ref")]),
                  fn(best[("rand", agent)], best[("rand", "idle")], best[("rand", "ref")]))

    row("export, agent not cycling (bitmap only) / qemu-nbd",
        lambda o, i, r: f"{i['bw_bytes'] / MiB:,.0f} MiB/s, {i['iops']:,.0f} IOPS = {i['bw_bytes'] / r['bw_bytes']:.2f}")
    d.add_row(f"export with cycles / qemu-nbd --aio={io_engine()} (the daemon's I/O engine)",
              *(f"{best[(w, 'ours')]['bw_bytes'] / best[(w, 'ref-uring')]['bw_bytes']:.2f}" for w in ("seq", "rand")))
    row("export with cycles / export without",
        lambda o, i, r: f"{o['bw_bytes'] / i['bw_bytes']:.2f}")
    row("write latency p99 (ours with cycles / qemu-nbd)",
        lambda o, i, r: f"{o['clat_ns']['percentile'].get('99.000000', 0) / 1e3:,.0f} / "
                        f"{r['clat_ns']['percentile'].get('99.000000', 0) / 1e3:,.0f} us")
    row("cycles during the run; mean / max cycle (incl. the last, which ends after fio)",
        lambda o, i, r: f"{o['cycles']}; {np.mean(o['cycle_s'] or [0]):.2f} / {max(o['cycle_s'] or [0]):.2f} s")
    row("after fio ended, the cycle under way still took",
        lambda o, i, r: f"{o['lag']:.1f} s")
    row("shipped by the agent during the run",
        lambda o, i, r: f"{o['shipped'] / MiB:,.0f} MiB ({o['shipped'] / max(1, o['io_bytes']):.2f}x the bytes written)")
    row("CPU during the run: agent / daemon",
        lambda o, i, r: f"{o['agent_cpu']:.1f} / {o['daemon_cpu']:.1f} s")
    row("CPU, agent not cycling: daemon", lambda o, i, r: f"{i['daemon_cpu']:.1f} s")
    lim = f"--cpu-limit {args.cpu_limit:g}: "
    row(lim + "cycles; mean / max cycle", lambda o, i, r: f"{o['cycles']}; {np.mean(o['cycle_s'] or [0]):.2f} / "
        f"{max(o['cycle_s'] or [0]):.2f} s", "limited")
    row(lim + "waited for the budget; after fio ended, the cycle still took",
        lambda o, i, r: f"{o['paced']:.1f} s; {o['lag']:.1f} s", "limited")
    row(lim + "shipped during the run; CPU agent / daemon",
        lambda o, i, r: f"{o['shipped'] / MiB:,.0f} MiB; {o['agent_cpu']:.1f} / {o['daemon_cpu']:.1f} s", "limited")
    console.print(d)


# ------------------------------------------------------------------------------- 2. RPO


def rpo_writer(uri: str, offsets: list[int], rate: float, seed: int, out: str) -> None:
    """In its own process (no GIL shared with the agent): FUA writes of unique 4 KiB blocks
    at Poisson times; saves the CLOCK_MONOTONIC time of each acknowledgement."""
    rng = np.random.default_rng(seed)
    filler = rng.bytes(4096)
    nbd = NbdClient(uri)
    acks = np.zeros(len(offsets))
    gaps = rng.exponential(1 / rate, len(offsets))
    due = time.monotonic()
    for i, off in enumerate(offsets):
        due += gaps[i]
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        nbd.write(off, struct.pack(">QQ", MAGIC, i) + filler[16:], fua=True)
        acks[i] = time.monotonic()
    nbd.close()
    np.save(out, acks)


def rpo(args, root: Path, kind: str, store: Store, daemons: list) -> dict:
    size = args.small
    image = root / f"rpo-{kind}.img"
    make_sparse(image, size)
    cfg = machine(store, f"rpo-{kind}", image, size)
    half = size // 2
    rng = np.random.default_rng(args.seed)
    nblocks = (size - half) // BS
    n = min(args.writes, nblocks)
    blocks = rng.choice(nblocks, n, replace=False)
    offsets = [int(half + b * BS + rng.integers(0, BS // 4096) * 4096) for b in blocks]
    rate = n / max(args.seconds, n / args.write_rate)
    cycles: list[dict] = []  # per cycle that froze: freeze start/end, keys, cut upload end, cycle end
    puts: dict[str, float] = {}
    pending: dict = {}

    # The agent's store tells when each log reached the store (its upload returned).
    counting = CountingStore(store)
    with Agent(counting, cfg, root / f"state-rpo-{kind}") as ag:
        daemons.append(ag.daemon)
        ag.cycle()  # the seed
        assert ag.qemu is not None
        orig_freeze = ag.qemu._freeze

        def freeze(busy):
            pending["start"] = time.monotonic()
            try:
                return orig_freeze(busy)
            finally:
                pending["end"] = time.monotonic()

        def put_done(key: str) -> None:
            puts[key] = time.monotonic()

        def on_cycle(r: CycleReport) -> None:
            if "start" in pending:
                keys = [k for d in r.disks for k in d.logs]
                cycles.append({"start": pending.pop("start"), "end": pending.pop("end"), "keys": keys,
                                   "cut": puts.get(keys[-1], time.monotonic()) if keys else time.monotonic(),
                                   "done": time.monotonic(), "seconds": r.disks[0].seconds,
                                   "shipped": sum(d.data_bytes + d.zero_bytes for d in r.disks)})

        ag.qemu._freeze = freeze  # type: ignore[method-assign]
        counting.on_put = put_done
        run = Running(ag)
        uri = ag.daemon.served_at(DISK)
        run.start(on_cycle)
        dur = n / rate
        bg = fio(uri, root / f"bg-{kind}.json", rw="randwrite", bs="4k", iodepth=4, seconds=dur + 1, size=half,
                 extra=(f"--rate_iops={args.bg_iops}",), background=True) if args.bg_iops > 0 else None
        c0, d0 = cpu_self_children()[0], proc_cpu(ag.daemon.pid())
        t0 = time.monotonic()
        acks_file = root / f"acks-{kind}.npy"
        p = mp.get_context("spawn").Process(target=rpo_writer, args=(uri, offsets, rate, args.seed, str(acks_file)))
        p.start()
        p.join(dur * 3 + 120)
        if bg is not None:
            try:
                bg.wait(30)  # it ends on its own, just after the writer
            except subprocess.TimeoutExpired:
                bg.terminate()
                bg.wait(30)
        acks = np.load(acks_file)
        deadline = time.monotonic() + 60  # until a cut that began after the last acknowledgement is shipped
        while time.monotonic() < deadline and not any(c["start"] > acks.max() for c in cycles):
            time.sleep(0.05)
        wall = time.monotonic() - t0
        run.stop()
        c1, d1 = cpu_self_children()[0], proc_cpu(ag.daemon.pid())
        counting.on_put = None
        ag.qemu._freeze = orig_freeze  # type: ignore[method-assign]

        # -- which cut holds each write: read every log back from the store --------------
        index_of = {off: i for i, off in enumerate(offsets)}
        found = np.full(n, -1)
        for ci, c in enumerate(cycles):
            for key in c["keys"]:
                with store.open(key) as f:
                    for offs, lens, data in iter_extents(f, key):
                        for j in np.flatnonzero(offs + lens > half).tolist():
                            o, ln = int(offs[j]), int(lens[j])
                            if not data[j].is_valid:
                                continue
                            buf = None
                            for b in range(max(o, half) // BS, -(-(o + ln) // BS)):
                                for w_off in (x for x in range(b * BS, b * BS + BS, 4096) if x in index_of):
                                    i = index_of[w_off]
                                    if found[i] >= 0 or not o <= w_off < o + ln:
                                        continue
                                    if buf is None:
                                        buf = memoryview(data[j].as_buffer())
                                    if struct.unpack(">QQ", buf[w_off - o:w_off - o + 16]) == (MAGIC, i):
                                        found[i] = ci
        bg_res = fio_result(root / f"bg-{kind}.json") if bg is not None else None
        starts = np.array([c["start"] for c in cycles])
        predicted = np.searchsorted(starts, acks, side="right")  # first freeze that began after the ack
        ok = found >= 0
        cut_end = np.array([c["cut"] for c in cycles] + [np.nan])
        rpo_s = cut_end[found[ok]] - acks[ok]
        wait = np.array(list(starts) + [np.nan])[predicted] - acks
        res = {"n": n, "rate": rate, "rpo": rpo_s, "wait": wait[~np.isnan(wait)], "missing": int((~ok).sum()),
                   "same": int((found[ok] == predicted[ok]).sum()), "earlier": int((found[ok] < predicted[ok]).sum()),
                   "later": int((found[ok] > predicted[ok]).sum()), "cycles": len(cycles),
                   "cycle_s": np.array([c["done"] - c["start"] for c in cycles]),
                   "freeze_ms": np.array([(c["end"] - c["start"]) * 1e3 for c in cycles]),
                   "shipped": sum(c["shipped"] for c in cycles), "wall": wall, "agent_cpu": c1 - c0, "daemon_cpu": d1 - d0,
                   "bg": bg_res, "ag": ag}
        return res


def report_rpo(args, results: dict[str, dict]) -> None:
    first = next(iter(results.values()))
    console.print(f"\n[bold]2. RPO[/bold]: write acknowledged (FUA, through NBD) -> its cut's log uploaded, "
                  f"{first['n']} unique 4 KiB writes at {first['rate']:.0f}/s, background fio random 4 KiB at "
                  f"{args.bg_iops} IOPS, cycles every {INTERVAL} s, {args.small / GiB:g} GiB disk")
    t = Table()
    for col, just in [("store", "left"), ("measure", "left"), ("hotspare: ack -> durable", "right"),
                      ("reference: ack -> next freeze", "right"), ("ratio", "right"), ("target", "right"),
                      ("", "left")]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for kind, r in results.items():
        for q in (50, 99):
            ours, ref = percentile(r["rpo"], q), percentile(r["wait"], q)
            target = f"< {TARGET_RPO:g} s" if q == 99 else ""
            t.add_row(kind, f"p{q}", f"{ours * 1e3:,.0f} ms", f"{ref * 1e3:,.0f} ms", f"{ours / ref:.2f}", target,
                      mark(ours < TARGET_RPO) if q == 99 else "")
        t.add_row(kind, "max", f"{r['rpo'].max() * 1e3:,.0f} ms" if len(r["rpo"]) else "-",
                  f"{r['wait'].max() * 1e3:,.0f} ms", "", "", "")
    console.print(t)
    d = Table(title="RPO details")
    d.add_column("")
    for kind in results:
        d.add_column(kind, justify="right")

    def row(label: str, fn) -> None:
        d.add_row(label, *(fn(r) for r in results.values()))

    row("writes found in the store / issued", lambda r: f"{r['n'] - r['missing']} / {r['n']}")
    row("  in the cut of the first freeze after the ack", lambda r: str(r["same"]))
    row("  in an earlier cut (acked during that freeze)", lambda r: str(r["earlier"]))
    row("  in a later cut (a cut missed an acked write!)", lambda r: str(r["later"]))
    row("cycles that froze; mean / p99 freeze start -> cycle end",
        lambda r: f"{r['cycles']}; {np.mean(r['cycle_s']):.3f} / {percentile(r['cycle_s'], 99):.3f} s")
    row("freeze (_freeze) p50 / max", lambda r: f"{percentile(r['freeze_ms'], 50):.0f} / {r['freeze_ms'].max():.0f} ms")
    row("shipped during the run (MiB/s)", lambda r: f"{r['shipped'] / MiB:,.0f} MiB ({r['shipped'] / MiB / r['wall']:.1f})")
    row("background fio IOPS achieved",
        lambda r: f"{r['bg']['iops']:,.0f}" if r["bg"] else "-")
    row("CPU: agent / daemon (per second)",
        lambda r: f"{r['agent_cpu']:.1f} / {r['daemon_cpu']:.1f} s ({r['agent_cpu'] / r['wall']:.2f} / "
                  f"{r['daemon_cpu'] / r['wall']:.2f})")
    console.print(d)


# ------------------------------------------------------------------------------ 3. cost


class CostRun:
    """One disk of the cost test: its agent, seeded, and its measured cycles."""

    def __init__(self, args, root: Path, store: Store, size: int, daemons: list) -> None:
        image = root / f"cost-{size // MiB}m.img"
        make_sparse(image, size)
        cfg = machine(store, f"cost-{size // MiB}m", image, size)
        self.size = size
        self.agent = Agent(store, cfg, root / f"state-cost-{size // MiB}m")
        self.agent.__enter__()
        daemons.append(self.agent.daemon)
        t = time.perf_counter()
        self.agent.cycle()
        self.seed = time.perf_counter() - t
        self.nbd = NbdClient(self.agent.daemon.served_at(DISK))
        self.timers = Timers()
        instrument(self.agent, self.timers)
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.kids: list[float] = []
        self.dcpu: list[float] = []
        self.shipped: list[int] = []

    def cycle(self, offsets: list[int], data: list[bytes], counted: bool) -> None:
        global _current_timers
        for off, buf in zip(offsets, data):
            self.nbd.write(off, buf)
        self.nbd.flush()
        saved = dict(self.timers.acc)
        _current_timers = self.timers
        s0, k0 = cpu_self_children()
        d0 = proc_cpu(self.agent.daemon.pid())
        t = time.perf_counter()
        r = self.agent.cycle()
        dt = time.perf_counter() - t
        s1, k1 = cpu_self_children()
        d1 = proc_cpu(self.agent.daemon.pid())
        _current_timers = None
        if not counted:
            self.timers.acc.clear()
            self.timers.acc.update(saved)
            return
        self.times.append(dt)
        self.cpu.append(s1 - s0)
        self.kids.append(k1 - k0)
        self.dcpu.append(d1 - d0)
        self.shipped.append(sum(d.data_bytes + d.zero_bytes for d in r.disks))

    def result(self) -> dict:
        self.nbd.close()
        return {"size": self.size, "seed": self.seed, "times": np.array(self.times), "cpu": np.array(self.cpu),
                    "kids": np.array(self.kids), "dcpu": np.array(self.dcpu), "shipped": np.array(self.shipped),
                    "steps": dict(self.timers.acc), "agent": self.agent}


def cost(args, root: Path, store: Store, daemons: list) -> tuple[dict, dict]:
    """The same writes on both disks, their cycles interleaved so background load hits both alike."""
    runs = [CostRun(args, root, store, args.small, daemons), CostRun(args, root, store, args.big, daemons)]
    rng = np.random.default_rng(args.seed)
    span = args.small // COST_WRITE
    for i in range(args.cycles + 1):  # the first after the seed is a warm-up, not counted
        offsets = [o * COST_WRITE for o in rng.choice(span, WRITES_PER_CYCLE, replace=False).tolist()]
        data = [rng.bytes(COST_WRITE) for _ in offsets]
        for run in runs if i % 2 == 0 else runs[::-1]:
            run.cycle(offsets, data, counted=i >= 1)
    return runs[0].result(), runs[1].result()


def idle(agent: Agent, seconds: float) -> dict:
    agent.cycle()  # nothing left dirty
    run = Running(agent)
    s0, k0 = cpu_self_children()
    d0 = proc_cpu(agent.daemon.pid())
    t0 = time.monotonic()
    run.start()
    time.sleep(seconds)
    run.stop()
    wall = time.monotonic() - t0
    s1, k1 = cpu_self_children()
    d1 = proc_cpu(agent.daemon.pid())
    return {"wall": wall, "cycles": len(run.reports), "agent": (s1 - s0) + (k1 - k0), "children": k1 - k0, "daemon": d1 - d0,
                "shipped": sum(d.data_bytes for _, r in run.reports for d in r.disks)}


def report_cost(args, small: dict, big: dict, idles: dict[str, dict]) -> None:
    console.print(f"\n[bold]3. cost follows the writes[/bold]: {args.cycles} cycles of {WRITES_PER_CYCLE} random "
                  f"64 KiB writes (the same on both disks), sparse disks, local store; seed and first cycle excluded")
    gb, gs = big["size"] / GiB, small["size"] / GiB
    t = Table()
    for col, just in [("measure, mean per cycle", "left"), (f"hotspare, {gb:g} GiB disk", "right"),
                      (f"reference: {gs:g} GiB disk", "right"), ("ratio", "right"), ("target", "right"),
                      ("", "left")]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for label, key, tgt in [("cycle time", "times", True), ("agent CPU (self + children)", None, True),
                            ("  of which children (qemu-img, nbdinfo)", "kids", False),
                            ("daemon CPU", "dcpu", False)]:
        def m(r: dict, key: str | None = key) -> float:
            return float(np.mean(r["cpu"] + r["kids"])) if key is None else float(np.mean(r[key]))
        ratio = m(big) / m(small)
        t.add_row(label, f"{m(big) * 1e3:,.1f} ms", f"{m(small) * 1e3:,.1f} ms", f"{ratio:.2f}",
                  f"<= {TARGET_COST}" if tgt else "", mark(ratio <= TARGET_COST) if tgt else "")
    console.print(t)
    d = Table(title="where a cycle's time goes (mean ms per cycle; indented steps are inside the one above)")
    d.add_column("step")
    d.add_column(f"{gb:g} GiB", justify="right")
    d.add_column(f"{gs:g} GiB", justify="right")
    nc = len(big["times"])
    for label, what in STEPS:
        d.add_row(what, f"{big['steps'].get(label, 0) / nc * 1e3:,.1f}",
                  f"{small['steps'].get(label, 0) / len(small['times']) * 1e3:,.1f}")
    d.add_row("cycle time p50 / max",
              f"{np.median(big['times']) * 1e3:,.0f} / {big['times'].max() * 1e3:,.0f}",
              f"{np.median(small['times']) * 1e3:,.0f} / {small['times'].max() * 1e3:,.0f}")
    d.add_row("shipped per cycle (MiB)", f"{big['shipped'].mean() / MiB:.1f}", f"{small['shipped'].mean() / MiB:.1f}")
    d.add_row("seed (first pass, excluded), s", f"{big['seed']:.1f}", f"{small['seed']:.1f}")
    console.print(d)
    i = Table(title=f"idle agent: cycles every {INTERVAL} s, no writes, {gb:g} GiB disk "
                    f"(reference: one core for an hour = 3,600 s)")
    for col in ["store", "cycles", "agent CPU", "agent CPU per hour", "share of one core", "daemon CPU per hour"]:
        i.add_column(col, justify="left" if col == "store" else "right")
    for kind, r in idles.items():
        per_h = r["agent"] / r["wall"] * 3600
        i.add_row(kind, f"{r['cycles']} in {r['wall']:.0f} s", f"{r['agent']:.2f} s", f"{per_h:,.0f} s",
                  f"{per_h / 3600:.2%}", f"{r['daemon'] / r['wall'] * 3600:,.0f} s")
    console.print(i)


# ------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=16.0, help="the large disk of the cost test (default 16)")
    ap.add_argument("--small-gib", type=float, default=1.0,
                    help="the disk of the throughput and RPO tests, the reference of the cost test (default 1)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per fio run and at least per RPO run (default 4)")
    ap.add_argument("--store", choices=["local", "s3", "both"], default="both",
                    help="store(s) of the RPO and idle tests: local directory, SeaweedFS, or both (default)")
    ap.add_argument("--cpu-limit", type=float, default=0.5,
                    help="the agent's --cpu-limit in the throughput test's limited runs (default 0.5)")
    ap.add_argument("--rounds", type=int, default=3, help="throughput runs per contender, best counts (default 3)")
    ap.add_argument("--writes", type=int, default=1200, help="RPO writes per store (default 1200)")
    ap.add_argument("--write-rate", type=float, default=200.0, help="RPO writes per second at most (default 200)")
    ap.add_argument("--bg-iops", type=int, default=250, help="background fio random 4 KiB IOPS in the RPO test (default 250)")
    ap.add_argument("--cycles", type=int, default=20, help="measured cycles per disk in the cost test (default 20)")
    ap.add_argument("--idle-seconds", type=float, default=20.0, help="idle run per store (default 20)")
    ap.add_argument("--only", default="throughput,rpo,cost", help="comma list of tests to run (default all)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where the images, states, stores and SeaweedFS go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--seed", type=int, default=1, help="random seed")
    args = ap.parse_args()
    args.small = int(args.small_gib * GiB) // MiB * MiB
    args.big = int(args.size_gib * GiB) // MiB * MiB
    only = set(args.only.split(","))
    for tool, pkg in [("qemu-storage-daemon", "qemu-system-common"), ("qemu-nbd", "qemu-utils"), ("fio", "fio"),
                      ("nbdinfo", "libnbd-bin"), ("fusermount3", "fuse3")]:
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, check=False).returncode != 0:
            console.print(f"[red]{tool} is missing: apt-get install {pkg}[/red]")
            return 2
    if args.small < 64 * MiB or args.big < args.small:
        console.print("[red]--small-gib must be at least 64 MiB and --size-gib at least --small-gib[/red]")
        return 2
    patch_module_timers(lambda: _current_timers)

    with scratch(args.workdir, "tracker", args.keep, console) as root, ExitStack() as servers:
        daemons: list = []
        try:
            kinds = ["local", "s3"] if args.store == "both" else [args.store]
            stores: dict[str, Store] = {}
            if "local" in kinds or {"cost", "throughput"} & only:
                stores["local"] = open_store(str(root / "store-local"))
            if "s3" in kinds and ({"rpo", "cost"} & only):
                from bench.consolidate import seaweedfs

                server = servers.enter_context(seaweedfs(root / "seaweedfs", bucket=BUCKET))  # after the daemons stop
                os.environ.update(server.env())
                stores["s3"] = open_store(f"s3://{BUCKET}/tracker")
            tp = rp = None
            if "throughput" in only:
                console.print("[bold]1. throughput[/bold]")
                tp = throughput(args, root, daemons)
            rpos: dict[str, dict] = {}
            if "rpo" in only:
                for kind in kinds:
                    console.print(f"[bold]2. RPO, {kind} store[/bold]")
                    rpos[kind] = rpo(args, root, kind, stores[kind], daemons)
                rp = rpos
            cs = None
            idles: dict[str, dict] = {}
            if "cost" in only:
                console.print("[bold]3. cost[/bold]")
                small, big = cost(args, root, stores["local"], daemons)
                idles["local"] = idle(big["agent"], args.idle_seconds)
                if "s3" in kinds:
                    ag = rpos["s3"]["ag"] if "s3" in rpos else None
                    if ag is None:
                        ag = CostRun(args, root, stores["s3"], args.small, daemons).agent
                    else:
                        ag.__enter__()
                    idles["s3 (SeaweedFS)"] = idle(ag, args.idle_seconds)
                cs = (small, big)
            if tp:
                report_throughput(args, tp)
            if rp:
                report_rpo(args, rp)
            if cs:
                report_cost(args, cs[0], cs[1], idles)
            console.print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        finally:
            for d in daemons:
                try:
                    d.stop()
                except Exception as err:  # noqa: BLE001 - best effort: report and go on
                    console.print(f"[yellow]stopping a storage daemon: {err}[/yellow]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
