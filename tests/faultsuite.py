"""The fault suite (issue 11). Its short tier runs in the tests; ``HOTSPARE_FAULT_SUITE=long``
runs the long one by hand (four to eight times the random kills).

1. Machine m1 on the scan tracker through protect, agent, ingest and consolidate, on
   SeaweedFS behind a fault-injecting proxy: store faults in every step, a log damaged at
   rest, a SIGKILL at every crash point of that cycle followed by the plain re-run, hostile
   objects where its logs go, a second agent from another state directory while the first
   runs (then the first killed at a random moment), the store unreachable under a running
   agent, agents whose clocks are ten minutes slow and fast (libfaketime), and ingest and
   consolidate killed at random moments.
2. Machine m3, whose agent stages its logs on a full file system, once and long-running.
3. Machine m2 on the qemu tracker (writes through its storage daemon's NBD export), with
   store faults and a SIGKILL at each of that tracker's crash points.
4. Failovers and failbacks of the demo machine (it boots), killed at random moments.

After every case it checks what a user would: the newest recovery point holds everything
the agent reported shipped, or ``hotspare status`` says the machine is stalled (a stall that
status does not report is a *silent* stall); a failover ends on one VM, a failback on a
disk equal to the replica. At the end each machine's current point, exported with
``hotspare export``, is compared with its disk byte for byte. :meth:`Figures.line` is the
line the suite prints: ``N faults, M crash points, 0 bytes lost, 0 silent stalls``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.status import machine_status
from hotspare.heartbeat import load_heartbeat
from hotspare.state import load_state
from hotspare.store import open_store
from hotspare.store.base import Store
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import HOTSPARE, cli, qemu_io, random_image, stop_group

SIZE = 8 << 20
MACHINE, DISK = "m1", "root"
QEMU_MACHINE = "m2"
LONG = os.environ.get("HOTSPARE_FAULT_SUITE") == "long"  # the long tier, by hand
FULL_MACHINE = "m3"  # its agent's state directory is on a full file system

# Store faults per step: throttling, server errors, connections reset before the server
# acted, bodies cut short after the headers, on the objects each step reads and writes.
# Resets come before the server saw the request and after it acted (its answer lost).
AGENT_FAULTS = [Rule("PUT", "/epochs/", "503", 2), Rule("PUT", "/epochs/", "reset", 1),
                Rule("PUT", "/epochs/", "reset-after", 1), Rule("GET", "catalog/HEAD", "truncate", 1),
                Rule("PUT", "heartbeat", "503", 1), Rule("PUT", "heartbeat", "500", 1),
                Rule("GET", "list-type=2", "reset", 1), Rule("GET", "list-type=2", "stall", 1)]
CONSOLIDATE_FAULTS = [Rule("GET", ".parquet", "truncate", 2), Rule("GET", "list-type=2", "reset", 1),
                      Rule("GET", "list-type=2", "503", 1), Rule("PUT", "/packs/", "503", 2),
                      Rule("PUT", "/packs/", "reset-after", 1), Rule("PUT", "catalog/0", "503", 1),
                      Rule("PUT", "catalog/0", "reset-after", 1), Rule("GET", "machine.json", "truncate", 1),
                      Rule("HEAD", "/", "503", 2), Rule("GET", "/index/", "truncate", 1),
                      Rule("GET", "/index/", "500", 1), Rule("PUT", "/index/", "stall", 1)]

# Every crash point of the protect/ingest/consolidate cycle, with the command that reaches
# it (failover and failback have theirs in tests/test_failover.py and tests/test_failback.py).
CRASHES = [("agent", "agent-after-upload"), ("consolidate", "ingest-before-commit"),
           ("consolidate", "catalog-before-commit"), ("consolidate", "consolidate-before-root"),
           ("consolidate", "consolidate-before-commit"), ("consolidate", "consolidate-before-gc")]
# The qemu tracker's: after the cut froze the bitmap, after the upload, before the release.
QEMU_CRASHES = ["agent-after-freeze", "agent-after-upload", "agent-before-release"]


@dataclass
class Figures:
    faults: int = 0
    crash_points: int = 0
    random_kills: int = 0  # SIGKILLs at random moments (counted among the faults too)
    bytes_lost: int = -1  # until measured
    silent_stalls: int = 0
    stalls_reported: int = 0  # stalls that status did report
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.faults} faults, {self.crash_points} crash points, {self.bytes_lost} bytes lost, "
                f"{self.silent_stalls} silent stalls")


class Suite:
    def __init__(self, tmp: Path, store: Store, url: str, proxy: FaultProxy, env: dict[str, str],
                 figures: Figures | None = None, *, machine: str = MACHINE, tracker: str = "scan") -> None:
        # ``store`` reaches the server directly (for the checks); ``url`` through the proxy
        # (AWS_ENDPOINT_URL names it, here and in ``env``, the CLI's environment).
        self.tmp, self.store, self.url, self.proxy = tmp, store, url, proxy
        self.machine, self.tracker = machine, tracker
        self.env = dict(env, HOTSPARE_TRACKER=tracker)
        self.image = tmp / f"{machine}.img"
        self.figures = figures or Figures()
        self._writes = 0
        self.timings: list[tuple[str, float, int]] = []  # (step, seconds, faults)

    # -- steps -----------------------------------------------------------------------------
    def write(self, *commands: str) -> None:
        """Writes as the machine's programs make them: to the disk itself (scan tracker) or
        through the storage daemon's export (qemu tracker, where the bitmaps see them)."""
        if self.tracker == "qemu":
            sock = self.tmp / "agent" / self.machine / "serve" / f"{DISK}.sock"
            qemu_io(f"nbd+unix:///{DISK}?socket={sock}", *commands)  # type: ignore[arg-type]
        else:
            qemu_io(self.image, *commands)

    def some_writes(self) -> None:
        """A few writes that differ every time: data, a rewrite, a trim."""
        n = self._writes = self._writes + 1
        self.write(f"write -P {n % 250 + 1} {(n * 320) % 7000 << 10} 96k",
                   f"write -P {(n * 7) % 250 + 1} {(n * 1100) % 7800 << 10} 8k", f"write -z {(n * 2900) % 7900 << 10} 64k")

    def protect_and_seed(self, seed: int) -> None:
        """A random disk, protected; its seed shipped and consolidated under store faults."""
        random_image(self.image, SIZE, seed=seed, fill=0.4)
        cli("protect", self.machine, "--disk", f"{DISK}={self.image}", env=self.env)
        self.agent(faults=AGENT_FAULTS)
        self.consolidate(faults=CONSOLIDATE_FAULTS)
        self.check_progress("seed")

    def _faults(self, rules: list[Rule] | None):
        """Arm ``rules`` on the proxy for one step; returns a function that disarms them and
        counts the faults injected."""
        self.proxy.rules = [Rule(r.method, r.path_contains, r.fault, r.times) for r in rules or []]
        before, t0 = self.proxy.faults, time.monotonic()

        def done(step: str) -> None:
            self.proxy.rules = []
            self.figures.faults += self.proxy.faults - before
            self.timings.append((step, time.monotonic() - t0, self.proxy.faults - before))
        return done

    def crash(self, command: str, point: str) -> None:
        """The CLI command, which must die at crash point ``point`` (SIGKILL)."""
        done = self._faults(None)
        args = ["agent", self.machine, "--once", "--quiet"] if command == "agent" else [command, self.machine]
        r = cli(*args, env=dict(self.env, HOTSPARE_CRASH_AT=point), check=False)
        done(f"{command} crash at {point}")
        assert r.returncode == -9, f"{point}: hotspare {' '.join(args)} exited {r.returncode}, not at the " \
                                   f"crash point\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stdout + r.stderr, r.stderr
        self.figures.crash_points += 1

    def agent(self, faults: list[Rule] | None = None) -> None:
        """One agent cycle, in this process (as ``hotspare agent --once``), through the proxy."""
        from hotspare.capture.agent import Agent
        from hotspare.machine import load_machine

        done = self._faults(faults)
        st = open_store(self.url)
        try:
            with Agent(st, load_machine(st, self.machine), self.tmp / "agent" / self.machine,
                       tracker=self.tracker) as ag:
                ag.cycle()
        finally:
            st.close()
            done("agent")

    def consolidate(self, faults: list[Rule] | None = None) -> None:
        """The consolidate flow (ingest first), in this process, through the proxy."""
        from flows.consolidate import consolidate

        done = self._faults(faults)
        try:
            consolidate(machine=self.machine, store=self.url)
        finally:
            done("consolidate")

    # -- faults beyond the store ------------------------------------------------------------
    def _popen(self, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None,
               log: str = "agent") -> subprocess.Popen:
        out = open(self.tmp / f"{self.machine}-{log}.log", "a")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen([*(prefix or []), HOTSPARE, *args], env={**os.environ, **(env or self.env)},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    def _running_agent(self, **kw) -> subprocess.Popen:
        """A long-running agent (``--interval 1``), once its lease is in the store."""
        proc = self._popen("agent", self.machine, "--interval", "1", "--quiet", **kw)
        deadline = time.monotonic() + 60
        while not self.store.exists(f"{layout.machine_prefix(self.machine)}agent-lease.json"):
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the agent exited {proc.poll()}: {self._log('agent')}"
            time.sleep(0.1)
        return proc

    def _log(self, name: str) -> str:
        return (self.tmp / f"{self.machine}-{name}.log").read_text(errors="replace")[-3000:]

    def random_kills(self, command: str, rng: random.Random, times: int, most: float) -> None:
        """``hotspare COMMAND MACHINE`` killed at random moments while the disk changes, each
        time followed by the plain re-run and the progress check."""
        for i in range(times):
            self.some_writes()
            self.agent()
            kill_at_random(self._popen(command, self.machine, log=command), rng, most, self.figures)
            self.consolidate()
            self.check_progress(f"{command} killed at random #{i + 1}")

    def two_agents(self, rng: random.Random) -> None:
        """A second agent, from another state directory, while the first runs: refused,
        naming the first, and nothing shipped; then the first is killed at a random moment
        of its cycles (its lease left behind) and a plain re-run takes over."""
        first = self._running_agent()
        try:
            self.some_writes()
            other = dict(self.env, HOTSPARE_AGENT_STATE=str(self.tmp / "other-agent"))
            r = cli("agent", self.machine, "--once", "--quiet", env=other, check=False)
            assert r.returncode == 1 and f"another agent ships {self.machine}" in r.stderr, r.stderr
            assert str(self.tmp / "agent") in r.stderr and "Traceback" not in r.stderr, r.stderr
            lease = json.loads(self.store.get(f"{layout.machine_prefix(self.machine)}agent-lease.json"))
            assert lease["state_dir"] == str(self.tmp / "agent" / self.machine), lease  # still the first's
            assert not (self.tmp / "other-agent" / self.machine / f"{DISK}.json").exists(), "the second kept no state"
            self.figures.faults += 1
            for _ in range(3):
                self.some_writes()
                time.sleep(rng.uniform(0.3, 1.5))
            assert kill_at_random(first, rng, 3.0, self.figures), f"the agent ended by itself: {self._log('agent')}"
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        self.agent()  # the same state directory: waits out the dead agent's lease, then ships
        self.consolidate()
        self.check_progress("two agents, the first killed at random")

    def outage(self, seconds: float) -> None:
        """The store unreachable for ``seconds`` (every connection reset, as a stopped server
        gives) under a long-running agent while the disk changes: the agent stays up, and
        once the store answers it ships everything written meanwhile."""
        agent = self._running_agent()
        try:
            self.some_writes()
            before = self.proxy.faults
            self.proxy.rules = [Rule(m, "", "reset", 1 << 30) for m in ("GET", "HEAD", "PUT", "POST", "DELETE")]
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                self.some_writes()
                time.sleep(seconds / 4)
            self.proxy.rules = []
            assert self.proxy.faults > before, "the agent did not try the store during the outage"
            self.proxy.faults = before  # one outage is one fault, however many requests it refused
            self.figures.faults += 1
            assert agent.poll() is None, f"the agent exited {agent.returncode} during the outage: {self._log('agent')}"
            self._a_cycle_from_now(agent, timeout=90)
        finally:
            stop_group(agent)
        self.consolidate()
        self.check_progress("store outage")

    def skewed_clock(self, offset: str, seconds: float) -> None:
        """The agent's clock ``offset`` off (libfaketime, e.g. ``-10m``): the heartbeat
        still counts as fresh and the skew is reported, a failover of the live machine is
        refused, and the new point's time is the store's."""
        from hotspare.catalog.model import utcnow
        from hotspare.errors import HotspareError
        from hotspare.failover import check_silent
        from hotspare.machine import load_machine
        from hotspare.state import load_state

        t0 = utcnow()
        self.some_writes()
        env = dict(self.env, FAKETIME_DONT_FAKE_MONOTONIC="1")
        r = subprocess.run(["faketime", "-f", offset, HOTSPARE, "agent", self.machine, "--once", "--quiet"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, f"agent with its clock {offset}: {r.stderr}"
        hb = machine_status(self.store, self.machine)["heartbeat"]
        assert hb["fresh"] and hb["clock_skewed"] and abs(hb["clock_skew_seconds"] - seconds) < 60, hb
        try:
            check_silent(self.store, load_machine(self.store, self.machine), load_state(self.store, self.machine))
        except HotspareError as err:
            assert "refusing" in str(err), err
        else:
            raise AssertionError(f"a failover of a live machine whose clock is {offset} was not refused")
        self.consolidate()
        cur = load_catalog(self.store, self.machine, DISK, SIZE).point("current")
        assert t0 - timedelta(seconds=5) <= cur.time <= utcnow() + timedelta(seconds=5), (offset, cur.time, t0)
        self.figures.faults += 1
        self.check_progress(f"agent clock {offset}")

    def full_state_dir(self, mountpoint: Path) -> None:
        """The agent's state directory on a full file system. ``--once``: one line naming
        it, exit 1, nothing shipped. Long-running: the agent stays up, its heartbeat says it
        is stuck and status reports the stall; once there is room it ships everything."""
        self.env = env = dict(self.env, HOTSPARE_AGENT_STATE=str(mountpoint))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mountpoint)], check=True)
        try:
            random_image(self.image, SIZE, seed=13, fill=0.4)  # more than the file system holds
            cli("protect", self.machine, "--disk", f"{DISK}={self.image}", env=env)
            r = cli("agent", self.machine, "--once", "--quiet", env=env, check=False)
            assert r.returncode == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
            (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert f"cannot stage a log in {mountpoint / self.machine}: No space left on device" in line, line
            assert not list(self.store.list(layout.logs_prefix(self.machine, DISK, 0))), "nothing shipped"
            self.figures.faults += 1
            agent = self._running_agent()
            try:
                self._wait_heartbeat(agent, lambda hb: hb.stuck is not None, "a heartbeat saying it is stuck")
                stalls = machine_status(self.store, self.machine)["stalls"]
                assert [x["reason"] for x in stalls] == ["agent-stuck"], stalls
                assert "No space left on device" in stalls[0]["line"], stalls
                self.figures.stalls_reported += 1
                subprocess.run(["mount", "-o", "remount,size=64m", str(mountpoint)], check=True)
                self._wait_heartbeat(agent, lambda hb: hb.stuck is None and hb.disks[DISK]["last_seq"] >= 0,
                                     "a heartbeat after the first shipped cycle")
                self.some_writes()
                self._a_cycle_from_now(agent)
            finally:
                stop_group(agent)
            self.consolidate()
            self.check_progress("full state directory, then room")
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)

    def _a_cycle_from_now(self, agent: subprocess.Popen, timeout: float = 60) -> None:
        """Wait for a whole agent cycle begun after now: the heartbeat after the first one
        sent from now on (a cycle ends with its heartbeat)."""
        from hotspare.catalog.model import utcnow

        now = utcnow()
        first = self._wait_heartbeat(agent, lambda hb: hb.time > now, "heartbeat", timeout)
        self._wait_heartbeat(agent, lambda hb: hb.time > first.time, "second heartbeat", timeout)

    def _wait_heartbeat(self, agent: subprocess.Popen, ok: Callable, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            hb = load_heartbeat(self.store, self.machine)
            if hb is not None and ok(hb):
                return hb
            assert agent.poll() is None and time.monotonic() < deadline, \
                f"{self.machine}: no {what} (agent exit {agent.poll()}); last {hb}: {self._log('agent')}"
            time.sleep(0.3)

    def hostile_logs(self) -> None:
        """Hostile objects where the agent's next logs go (garbage, a foreign Parquet file, a
        log of another disk, one whose rows lie about their data): each quarantined with its
        reason, nothing committed lost, and the agent's resync closes the hole."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from hotspare.extentlog import Extent, write_log

        cat = load_catalog(self.store, self.machine, DISK, SIZE)
        seq = self._next_seq(cat)
        work = self.tmp / "hostile"
        work.mkdir(exist_ok=True)
        pq.write_table(pa.table({"x": [1, 2, 3]}), work / "foreign.parquet")
        write_log(str(work / "other-disk.parquet"), [Extent(seq=seq + 2, offset=0, length=65536, data=b"\x01" * 65536)],
                  machine=self.machine, disk="data", epoch=cat.epoch, disk_size=SIZE)
        data = np.random.default_rng(seq).integers(0, 256, 65536, dtype=np.uint8).tobytes()  # stays as is in zstd
        write_log(str(work / "liar.parquet"), [Extent(seq=seq + 3, offset=1 << 16, length=65536, data=data)],
                  machine=self.machine, disk=DISK, epoch=cat.epoch, disk_size=SIZE)
        raw = bytearray((work / "liar.parquet").read_bytes())  # a data byte flipped behind its checksum
        at = raw.find(data[1000:1064])
        assert at > 0, "the extent's bytes are in the file"
        raw[at + 100] ^= 0x40
        (work / "liar.parquet").write_bytes(bytes(raw))
        objects = [(seq, b"not a parquet file at all"), (seq + 1, (work / "foreign.parquet").read_bytes()),
                   (seq + 2, (work / "other-disk.parquet").read_bytes()), (seq + 3, bytes(raw))]
        for n, body in objects:
            self.store.put(layout.log_key(self.machine, DISK, cat.epoch, n, n), body, create_only=True)
            self.figures.faults += 1
        try:
            self.consolidate()
        except Exception as err:  # noqa: BLE001 - a consolidation may refuse to go past the hole
            self.figures.notes.append(f"hostile logs: consolidate said {str(err).splitlines()[0]}")
        q = [o.key for o in self.store.list(layout.QUARANTINE) if o.key.endswith(".parquet")]
        for n, _ in objects:
            assert any(layout.log_key(self.machine, DISK, cat.epoch, n, n) in k for k in q), (n, q)
        self.agent()
        self.consolidate()
        self.check_progress("hostile logs")

    def _next_seq(self, cat) -> int:
        hb = load_heartbeat(self.store, self.machine)
        return (hb.disks[DISK]["last_seq"] if hb else -1) + 1

    # -- checks ----------------------------------------------------------------------------
    def check_progress(self, case: str) -> list[str]:
        """After a converging re-run, the current point holds the agent's last shipped seq,
        or status calls the machine stalled; anything else is a silent stall. Returns the
        reasons status gave."""
        hb = load_heartbeat(self.store, self.machine)
        shipped = hb.disks[DISK]["last_seq"] if hb else -1
        cat = load_catalog(self.store, self.machine, DISK, SIZE)
        cur = cat.point("current")
        at = cur.seq if cur is not None and cur.epoch == cat.epoch else -1
        if at < shipped:
            stalls = machine_status(self.store, self.machine)["stalls"]
            if not stalls:
                self.figures.silent_stalls += 1
                self.figures.notes.append(f"{self.machine} {case}: point at seq {at}, agent shipped {shipped}, "
                                          "status says nothing")
            else:
                self.figures.stalls_reported += len(stalls)
            return [x["reason"] for x in stalls]
        return []

    def damage_newest_log(self) -> None:
        """Flip bytes in the middle of the newest shipped log, as a bad disk at rest would."""
        cat = load_catalog(self.store, self.machine, DISK, SIZE)
        key = max(o.key for o in self.store.list(layout.logs_prefix(self.machine, DISK, cat.epoch),
                                                 start_after=cat.newest.get(cat.epoch)))
        raw = bytearray(self.store.get(key))
        for i in range(len(raw) // 2, len(raw) // 2 + 16):
            raw[i] ^= 0xFF
        self.store.put(key, bytes(raw))
        self.figures.faults += 1

    def bytes_lost(self) -> int:
        """Bytes where the exported current point (``hotspare export``) differs from the disk."""
        out = self.tmp / f"{self.machine}-export.raw"
        cli("export", self.machine, "--disk", DISK, "--out", str(out), "--format", "raw", env=self.env)
        disk = np.fromfile(self.image, dtype=np.uint8)
        replica = np.fromfile(out, dtype=np.uint8)
        if disk.size != replica.size:
            return abs(disk.size - replica.size) + int(np.count_nonzero(disk[:replica.size] != replica[:disk.size]))
        return int(np.count_nonzero(disk != replica))


def run(tmp: Path, store: Store, url: str, proxy: FaultProxy, env: dict[str, str],
        say: Callable[[str], None] = print) -> Figures:
    s = Suite(tmp, store, url, proxy, env)
    # The seed and a round of changes, every step under store faults.
    s.protect_and_seed(11)
    s.some_writes()
    s.agent()
    s.some_writes()
    s.agent(faults=AGENT_FAULTS)
    s.consolidate(faults=CONSOLIDATE_FAULTS)
    s.check_progress("faults round")
    # A log damaged at rest: quarantined, which leaves a hole that status must report until
    # the agent's resync closes it.
    s.some_writes()
    s.agent()
    s.damage_newest_log()
    try:
        s.consolidate()
    except Exception as err:  # noqa: BLE001 - a consolidation may refuse to go past the hole
        s.figures.notes.append(f"damaged log: consolidate said {str(err).splitlines()[0]}")
    assert "resync-pending" in s.check_progress("damaged log"), "the hole must show in status"
    s.agent()
    s.consolidate()
    s.check_progress("after the resync")
    # A kill at each crash point, then the plain re-run.
    for command, point in CRASHES:
        if command == "agent":
            # Finding 1's case: a block shipped just before the crash returns to its old
            # content (the next case's consolidation and check cover it).
            s.write("write -P 0x11 0 64k")
            s.agent()
            s.write("write -P 0x22 0 64k")
            s.crash("agent", point)
            s.write("write -P 0x11 0 64k")
            s.agent()
            continue
        s.some_writes()
        s.agent()
        s.crash("consolidate", point)
        s.consolidate()
        s.check_progress(point)
    # Faults from outside the store: hostile objects where logs go, a second agent, the first
    # killed at a random moment, the store unreachable under a running agent, agents whose
    # clocks are wrong, and commands killed at random moments.
    rng = random.Random(int(os.environ.get("HOTSPARE_SUITE_SEED", "11")))
    rounds = 8 if LONG else 1
    s.hostile_logs()
    s.two_agents(rng)
    s.outage(8.0)
    s.skewed_clock("-10m", -600)
    s.skewed_clock("+10m", 600)
    s.random_kills("consolidate", rng, 2 * rounds, 4.0)
    s.random_kills("ingest", rng, rounds, 2.5)
    f = Suite(tmp, store, url, proxy, env, s.figures, machine=FULL_MACHINE)
    (tmp / "small-fs").mkdir()
    f.full_state_dir(tmp / "small-fs")
    q = Suite(tmp, store, url, proxy, env, s.figures, machine=QEMU_MACHINE, tracker="qemu")
    q.protect_and_seed(12)  # its storage daemon serves the disk from here on
    for point in QEMU_CRASHES:
        q.some_writes()
        q.crash("agent", point)
        q.some_writes()
        q.agent(faults=AGENT_FAULTS)
        q.consolidate()
        q.check_progress(point)
    s.figures.bytes_lost = s.bytes_lost() + f.bytes_lost() + q.bytes_lost()
    if os.environ.get("HOTSPARE_SUITE_TIMINGS"):
        for step, secs, n in s.timings + f.timings + q.timings:
            say(f"{step:40s} {secs:6.1f}s {n} faults")
        for note in s.figures.notes:
            say(note)
    return s.figures


def suite_env(tmp: Path, store_url: str, proxy_url: str) -> dict[str, str]:
    """The CLI's environment: every store call of every command goes through the proxy."""
    return {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp / "agent"), "HOTSPARE_TRACKER": "scan",
            "AWS_ENDPOINT_URL": proxy_url, "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "")}


def kill_at_random(proc: subprocess.Popen, rng: random.Random, most: float, figures: Figures) -> bool:
    """SIGKILL ``proc``'s whole session at a random moment within ``most`` seconds; False
    when it had already ended by then (no kill counted)."""
    deadline = time.monotonic() + rng.uniform(0.2, most)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    figures.random_kills += 1
    figures.faults += 1
    return True


def _processes(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout
    return sorted(int(p) for p in out.split())


def failover_kills(tmp: Path, demo_disk: Path, figures: Figures, rng: random.Random, times: int) -> None:
    """Failovers of the demo machine (it boots) killed with SIGKILL at random moments, each
    followed by the plain re-run: the machine ends failed over on exactly one VM, with one
    capture and at most one disk server, and ``hotspare vm stop`` leaves no process behind. The
    first failover is not killed: its duration bounds the random moments."""
    env = {"HOTSPARE_STORE": str(tmp / "fo-store"), "HOTSPARE_AGENT_STATE": str(tmp / "fo-agent"),
           "HOTSPARE_VM_DIR": str(tmp / "vms"), "HOTSPARE_TRACKER": "scan",
           "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "")}
    names = [f"fo{i}" for i in range(times + 1)]
    for name in names:  # every machine protected first, so one wait makes them all silent
        image = tmp / f"{name}.img"
        shutil.copyfile(demo_disk, image)
        cli("protect", name, "--disk", f"root={image}", "--heartbeat-window", "10", env=env)
        cli("agent", name, "--once", "--quiet", env=env)
    time.sleep(11)
    st = open_store(env["HOTSPARE_STORE"])
    longest = 0.0
    for i, name in enumerate(names):
        t0 = time.monotonic()
        proc = subprocess.Popen([HOTSPARE, "failover", name, "--approve"], env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if i == 0:
            assert proc.wait(300) == 0, f"the unkilled failover of {name} failed"
            longest = time.monotonic() - t0
        else:
            if kill_at_random(proc, rng, longest, figures):
                figures.notes.append(f"failover {name} killed after {time.monotonic() - t0:.1f}s "
                                     f"({load_state(st, name).state})")
            r = cli("failover", name, "--approve", env=env, check=False)
            assert r.returncode == 0 and "Traceback" not in r.stderr, \
                f"{name}: the re-run after a kill at {time.monotonic() - t0:.1f}s exited {r.returncode}: {r.stderr}"
        ms = load_state(st, name)
        workdir = tmp / "vms" / name
        assert ms.state == "failed-over", (name, ms.state)
        assert _processes(f"guest={name}-") == [ms.vm["pid"]], f"{name}: one VM, the one its state names"
        # (its server ends once the VM's disk is all local: soon, for the demo's 64 MiB)
        assert len(_processes(f"nbdkit.*{workdir}")) <= 1, f"{name}: at most one disk server"
        assert len(_processes(f"hotspare.vm.qemu.capture.*{workdir}")) == 1, f"{name}: one capture"
        cli("vm", "stop", name, env=env)
        assert not _processes(f"guest={name}-") and not _processes(str(workdir)), f"{name}: vm stop left processes"


def failback_kills(tmp: Path, demo_disk: Path, figures: Figures, rng: random.Random, times: int) -> None:
    """Failbacks killed with SIGKILL at random moments (the VM serving, the restore agent
    applying, the cut-over), each followed by the plain re-run: the machine's disk equals
    the newest point block for block, the VM is gone and protection resumes in epoch 2."""
    from tests.test_failback import RestoreAgent, assert_same_image, fail_over, final_replica, vm_gone

    for i in range(times):
        work = tmp / f"fb{i}"
        work.mkdir()
        image = work / "demo.img"
        shutil.copyfile(demo_disk, image)
        env = dict(fail_over(work, image), PREFECT_API_URL=os.environ.get("PREFECT_API_URL", ""))
        st = open_store(env["HOTSPARE_STORE"])
        vm_id = load_state(st, "demo").vm["vm_id"]
        agent = RestoreAgent(env, work)
        try:
            agent.wait_restore_heartbeat(st)
            t0 = time.monotonic()
            with open(work / "failback.log", "w") as out:
                proc = subprocess.Popen([HOTSPARE, "failback", "demo", "--approve"], env={**os.environ, **env},
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if kill_at_random(proc, rng, 12.0, figures):  # a failback here takes 14 to 40 s
                figures.notes.append(f"failback {i} killed after {time.monotonic() - t0:.1f}s "
                                     f"({load_state(st, 'demo').phase or load_state(st, 'demo').state})")
            else:
                assert proc.returncode == 0, f"failback exited {proc.returncode}: {(work / 'failback.log').read_text()[-3000:]}"
                figures.notes.append(f"failback {i} ended after {time.monotonic() - t0:.1f}s, before its kill")
            if agent.proc.poll() is not None:
                agent = RestoreAgent(env, work)  # ended with the failback it served, or by itself
            r = cli("failback", "demo", "--approve", env=env, check=False)
            assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stdout[-2000:], r.stderr)
        finally:
            agent.stop()
            if load_state(st, "demo").vm:
                cli("vm", "stop", "demo", env=env)
        ms = load_state(st, "demo")
        assert (ms.state, ms.epoch) == ("protected", 2), (ms.state, ms.phase, ms.epoch)
        assert vm_gone(work, vm_id), "the VM is stopped"
        assert_same_image(image, final_replica(st, work, image.stat().st_size))
