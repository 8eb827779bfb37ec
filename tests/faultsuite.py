"""The fault suite's short tier (issue 11): a machine through protect, agent, ingest and
consolidate, with store faults injected by a proxy in front of SeaweedFS and a SIGKILL at
every crash point of that cycle, each followed by the plain re-run a user would make; then
a second machine on the qemu tracker (writes through its storage daemon's NBD export), with
store faults and a SIGKILL at each of that tracker's crash points.

After every case it checks what a user would: the newest recovery point holds everything
the agent reported shipped, or ``hotspare status`` says the machine is stalled (a stall that
status does not report is a *silent* stall). At the end the current point, exported with
``hotspare export``, is compared with the disk byte for byte. :func:`run` returns the
figures, and :meth:`Figures.line` is the line the suite prints:
``N faults, M crash points, 0 bytes lost, 0 silent stalls``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.cli import machine_status
from hotspare.heartbeat import load_heartbeat
from hotspare.store import open_store
from hotspare.store.base import Store
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import cli, qemu_io, random_image

SIZE = 8 << 20
MACHINE, DISK = "m1", "root"
QEMU_MACHINE = "m2"

# Store faults per step: throttling, server errors, connections reset before the server
# acted, bodies cut short after the headers, on the objects each step reads and writes.
AGENT_FAULTS = [Rule("PUT", "/epochs/", "503", 2), Rule("PUT", "/epochs/", "reset", 1),
                Rule("GET", "catalog/HEAD", "truncate", 1), Rule("PUT", "heartbeat", "503", 1),
                Rule("GET", "list-type=2", "reset", 1)]
CONSOLIDATE_FAULTS = [Rule("GET", ".parquet", "truncate", 2), Rule("GET", "list-type=2", "reset", 1),
                      Rule("GET", "list-type=2", "503", 1), Rule("PUT", "/packs/", "503", 2),
                      Rule("PUT", "catalog/0", "503", 1), Rule("GET", "machine.json", "truncate", 1),
                      Rule("HEAD", "/", "503", 2), Rule("GET", "/index/", "truncate", 1)]

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
    q = Suite(tmp, store, url, proxy, env, s.figures, machine=QEMU_MACHINE, tracker="qemu")
    q.protect_and_seed(12)  # its storage daemon serves the disk from here on
    for point in QEMU_CRASHES:
        q.some_writes()
        q.crash("agent", point)
        q.some_writes()
        q.agent(faults=AGENT_FAULTS)
        q.consolidate()
        q.check_progress(point)
    s.figures.bytes_lost = s.bytes_lost() + q.bytes_lost()
    if os.environ.get("HOTSPARE_SUITE_TIMINGS"):
        for step, secs, n in s.timings + q.timings:
            say(f"{step:40s} {secs:6.1f}s {n} faults")
        for note in s.figures.notes:
            say(note)
    return s.figures


def suite_env(tmp: Path, store_url: str, proxy_url: str) -> dict[str, str]:
    """The CLI's environment: every store call of every command goes through the proxy."""
    return {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp / "agent"), "HOTSPARE_TRACKER": "scan",
            "AWS_ENDPOINT_URL": proxy_url, "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "")}
