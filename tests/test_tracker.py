"""The qemu tracker: the machine's disks served by qemu-storage-daemon, every write shipped
at crash-consistent cuts, and no write lost or re-sent in bulk after a crash. The scan
tracker on served disks (a frozen view scanned each cycle) is here too; on disks the agent
does not serve it has tests/test_capture.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

from hotspare import layout
from hotspare.capture import qemu as qemu_mod
from hotspare.capture.agent import Agent
from hotspare.capture.budget import CpuBudget
from hotspare.capture.daemon import io_engine
from hotspare.capture.nbd import NbdReader
from hotspare.catalog import Catalog, catalog_logs
from hotspare.ingest import ingest_disk
from hotspare.machine import MachineConfig, parse_disk_arg, save_machine
from hotspare.replay import apply_log, replay_catalog
from hotspare.store import open_store
from tests import journal_writer
from tests.helpers import HOTSPARE, NbdServer, cli, random_image, require, same_file, sha256_file

BS = 64 << 10


@pytest.fixture(autouse=True)
def _tools() -> None:
    require("qemu-storage-daemon", "qemu-system-common")
    require("nbdinfo", "libnbd-bin")
    require("fusermount3", "fuse3")


def setup_machine(tmp_path: Path, size: int, fill: float = 0.25, store_url: str | None = None):
    image = tmp_path / "disk.img"
    random_image(image, size, fill=fill)
    store = open_store(store_url or str(tmp_path / "store"))
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")])
    save_machine(store, cfg, create_only=True)
    return image, store, cfg


def ingest_all(store, cfg) -> Catalog:
    return ingest_disk(store, cfg.name, cfg.disks[0])[0]


def replica_equals(tmp_path: Path, store, cfg, image: Path) -> bool:
    replica = tmp_path / "replica.raw"
    replay_catalog(store, ingest_all(store, cfg), replica)
    return same_file(image, replica)


def qemu_io(uri: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, uri], check=True, capture_output=True)


def test_setup_leaves_every_byte_of_the_disk_unchanged(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 48 << 20)
    before = sha256_file(image)
    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        seed = ag.cycle().disks[0]
        assert sha256_file(image) == before, "protect and the daemon's first start rewrote the disk"
        assert seed.logs and seed.served_at.startswith("nbd+unix:///root?socket=")
    assert replica_equals(tmp_path, store, cfg, image)
    cat = ingest_all(store, cfg)
    assert all(lg.cut and lg.consistent for lg in catalog_logs(store, cat) if lg.cut)


def test_ships_exactly_the_writes_and_an_idle_cycle_ships_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 40 << 20)
    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        ag.cycle()
        uri = ag.daemon.served_at("root")
        qemu_io(uri, "write -P 0x5a 1M 4k", "write -z 2M 128k", "write -P 0x33 30M 1M")
        r = ag.cycle().disks[0]
        assert (r.data_bytes, r.zero_bytes) == (BS + (1 << 20), 128 << 10), "a block per write, no more"
        assert r.scanned_bytes == BS + (1 << 20) + (128 << 10), "only the dirty blocks are read"
        idle = ag.cycle().disks[0]
        assert idle.extents == 0 and idle.logs == []
    assert replica_equals(tmp_path, store, cfg, image)
    hb = store.get(layout.heartbeat_key("m1"))
    assert b'"tracker": "qemu"' in hb.replace(b'":"', b'": "') or b"qemu" in hb


def test_a_view_is_read_in_batches_that_keep_every_block(tmp_path: Path) -> None:
    """Scattered one-block runs (what random writes leave), a run across a batch boundary
    and the disk's short last block, read from a real NBD server: the extents hold exactly
    the runs' bytes, zeros as None, never span a gap, and come from a few pipelined
    batches, each released once as one range."""
    require("qemu-nbd", "qemu-utils")
    bs = 64 << 10
    size = 128 * bs + (12 << 10)
    image = tmp_path / "view.img"
    random_image(image, size, seed=5, fill=0.7)
    disk = image.read_bytes()
    runs = [(b * bs, bs) for b in range(0, 40, 3)] + [(41 * bs, 60 * bs), (128 * bs, size - 128 * bs)]
    released: list[list[tuple[int, int]]] = []
    with NbdServer(image, tmp_path / "view.sock", "view") as server, NbdReader(server.sock, "view") as view:
        # Each extent's data is valid until the next is taken (the buffer is read into again).
        extents = [(off, n, None if data is None else bytes(data), sums)
                   for off, n, data, sums in qemu_mod.read_view(view, runs, bs, size, release=released.append)]

    # 74 blocks and a bit: two batches of at most 4 MiB, each released as one range from its
    # first run to its last; together they cover every run and end at the disk's end.
    assert [len(b) for b in released] == [1, 1]
    (a, an), (b, bn) = released[0][0], released[1][0]
    assert (a, a + an == b, b + bn) == (0, True, size)
    covered = [(off, n) for off, n, _, _ in extents]
    want = b"".join(disk[off:off + n] for off, n in runs)
    got = b"".join(bytes(n) if data is None else data for _, n, data, _ in extents)
    assert got == want
    assert sum(n for _, n in covered) == sum(n for _, n in runs)
    for off, n, data, sums in extents:
        assert any(r <= off and off + n <= r + rn for r, rn in runs)  # no extent spans a gap
        assert (data is None) == (disk[off:off + n] == bytes(n))
        assert [int(x) for x in sums] == [xxhash.xxh3_64_intdigest(disk[o:min(o + bs, off + n)])
                                          for o in range(off, off + n, bs)]
    assert extents[-1][0] + extents[-1][1] == size  # the short last block is read, not padded


def test_writes_during_a_cycle_copy_only_blocks_the_cut_still_needs(tmp_path: Path, monkeypatch) -> None:
    """While the agent reads a cut's view, the view keeps the old bytes of a block only if the
    cut holds the block and the agent has not read it yet: 8 MiB written to clean blocks
    during the cycle cost the view nothing (the agent trimmed them), one dirty block
    rewritten costs one block. The cut still ships the block's bytes from before the cut,
    also when the block begins a longer dirty run."""

    image, store, cfg = setup_machine(tmp_path, 64 << 20)
    seen: dict[str, int] = {}
    read_view = qemu_mod.read_view

    def writes_while_the_view_lives(view, runs, *a, **k):
        fleece = ag.daemon.view_dir / "root.fleece.qcow2"
        seen["before"] = fleece.stat().st_size
        (tmp_path / "cut.img").write_bytes(image.read_bytes())  # the disk at the cut
        # Clean blocks, then the first block of a dirty 1 MiB run: the read of that run spans
        # a copied block and uncopied ones, which QEMU 7.2 serves from the live disk.
        qemu_io(uri, "write -P 0x77 16M 8M", "write -P 0x78 50M 64k")
        seen["after"] = fleece.stat().st_size
        return read_view(view, runs, *a, **k)

    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        ag.cycle()
        uri = ag.daemon.served_at("root")
        qemu_io(uri, "write -P 0x5a 40M 64k", "write -P 0x5b 50M 1M")
        monkeypatch.setattr(qemu_mod, "read_view", writes_while_the_view_lives)
        r = ag.cycle().disks[0]
        monkeypatch.setattr(qemu_mod, "read_view", read_view)
        assert r.data_bytes == BS + (1 << 20), "the cut holds the writes before it, none after"
        grew = seen["after"] - seen["before"]
        assert BS <= grew < 2 * BS + (256 << 10), f"the view copied {grew} bytes for one rewritten cut block"
        cut = tmp_path / "cut-replica.raw"
        replay_catalog(store, ingest_all(store, cfg), cut)
        _same_content(tmp_path / "cut.img", cut)
        ag.cycle()
    assert replica_equals(tmp_path, store, cfg, image)


def test_a_cpu_limit_paces_the_agent_and_loses_nothing(tmp_path: Path) -> None:
    """--cpu-limit 0.1: a 128 MiB burst ships on at most a tenth of a CPU (plus the bucket's
    burst and the last upload), the cycle says how long it waited, the heartbeat too, and the
    replica is exact."""
    image, store, cfg = setup_machine(tmp_path, 256 << 20)
    with Agent(store, cfg, tmp_path / "state" / "m1", cpu_limit=0.1) as ag:
        ag.cycle()
        qemu_io(ag.daemon.served_at("root"), "write -P 0x3c 0 128M")
        t0, c0 = time.monotonic(), time.process_time()
        r = ag.cycle().disks[0]
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
    assert r.data_bytes == 128 << 20 and r.paced_seconds > 0.2, r
    assert cpu <= 0.1 * wall + 0.5, f"the agent used {cpu:.2f} CPU-seconds in {wall:.2f}s"
    assert json.loads(store.get(layout.heartbeat_key("m1")))["disks"]["root"]["paced_seconds"] > 0.2
    assert replica_equals(tmp_path, store, cfg, image)
    r = cli("agent", "m1", "--store", str(tmp_path / "store"), "--cpu-limit", "0", check=False)
    assert r.returncode == 2 and "--cpu-limit 0: give a share of one CPU of at least 0.05" in r.stderr, r.stderr


def test_a_rescan_releases_what_it_has_scanned(tmp_path: Path, monkeypatch) -> None:
    """A rescan (here the first start's) reads the whole view; each scanned chunk is trimmed
    at once, so 1 MiB rewritten there during the scan costs the view no copy, while a block
    not scanned yet is copied once, and the cut holds its bytes from before the writes."""
    image, store, cfg = setup_machine(tmp_path, 64 << 20)
    seen: dict[str, int] = {}
    scan = qemu_mod.scan

    def writes_during_the_scan(view, *a, **k):
        fleece = ag.daemon.view_dir / "root.fleece.qcow2"
        (tmp_path / "cut.img").write_bytes(image.read_bytes())  # the disk at the cut
        chunks = scan(view, *a, **k)
        yield next(chunks)  # the first 32 MiB, taken (and trimmed) by the tracker
        seen["before"] = fleece.stat().st_size  # the second is not read yet
        qemu_io(uri, "write -P 0x61 1M 1M", "write -P 0x62 60M 64k")
        seen["after"] = fleece.stat().st_size
        yield from chunks

    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        uri = ag.daemon.served_at("root")
        monkeypatch.setattr(qemu_mod, "scan", writes_during_the_scan)
        ag.cycle()
        monkeypatch.setattr(qemu_mod, "scan", scan)
        grew = seen["after"] - seen["before"]
        assert grew < 4 * BS, f"the view copied {grew} bytes, for one block not yet scanned"
        cut = tmp_path / "cut-replica.raw"
        replay_catalog(store, ingest_all(store, cfg), cut)
        _same_content(tmp_path / "cut.img", cut)
        ag.cycle()
    assert replica_equals(tmp_path, store, cfg, image)


def test_a_cpu_budget_sleeps_off_its_debt_and_saves_no_more_than_its_burst() -> None:
    """The token bucket on a fake clock: work within the burst runs on, a debt is slept off
    at the share's rate, and a long idle spell saves at most the burst."""
    now, used, slept = [0.0], [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    b = CpuBudget(0.5, burst=0.1, clock=lambda: now[0], cpu=lambda: used[0], sleep=sleep)
    used[0] = 0.05
    b.pace()
    assert slept == []
    used[0] = 0.35  # 0.3 CPU-seconds more: 0.25 in debt, half a CPU pays that back in 0.5 s
    b.pace()
    assert slept == [pytest.approx(0.5)]
    b.pace()  # the sleep paid it
    assert len(slept) == 1
    now[0] += 3600
    b.pace()
    assert b.tokens == pytest.approx(0.1) and b.slept == pytest.approx(0.5)
    used[0] += 0.3  # so the next burst waits again, however long the idle spell was
    b.pace()
    assert slept[-1] == pytest.approx(0.4)
    CpuBudget(None).pace()  # no limit: never waits
    with pytest.raises(ValueError, match="more than 0 CPUs"):
        CpuBudget(0)


def test_the_daemon_serves_through_io_uring_where_it_can(tmp_path: Path, monkeypatch) -> None:
    """The daemon does its disk I/O through io_uring where QEMU and the kernel have it (the
    probe), and the disk is then opened with it; else through QEMU's thread pool, as when
    the probe cannot run."""
    image, store, cfg = setup_machine(tmp_path, 64 << 20)
    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        ag.cycle()
        fds = {os.readlink(f) for f in Path(f"/proc/{ag.daemon.pid()}/fd").iterdir()}
    assert ("anon_inode:[io_uring]" in fds) == (io_engine() == "io_uring"), (io_engine(), fds)
    io_engine.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    try:
        assert io_engine() == "threads"
    finally:
        io_engine.cache_clear()


def _same_content(a: Path, b: Path) -> None:
    """Byte for byte, without reading the holes of two sparse raw files."""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"{a} and {b} differ: {r.stdout}{r.stderr}"


def test_cost_follows_the_writes_on_a_large_disk(tmp_path: Path) -> None:
    """An 8 GiB (sparse) disk: a cycle reads the dirty blocks, never the disk. Then a scan
    agent finds the daemon serving the disk: it scans a frozen view (the whole disk, by
    design) and ships exactly the changes at a consistent cut, and a qemu agent after it
    goes on from its bitmap without a scan."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(8 << 30)
    store = open_store(str(tmp_path / "store"))
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")])
    save_machine(store, cfg, create_only=True)
    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        ag.cycle()  # the seed scans the frozen view once
        uri = ag.daemon.served_at("root")
        qemu_io(uri, "write -P 0x11 0 64k", "write -P 0x22 5G 256k", f"write -P 0x33 {(8 << 30) - 4096} 4k")
        t0 = time.monotonic()
        r = ag.cycle().disks[0]
        seconds = time.monotonic() - t0
    assert r.scanned_bytes == BS + (256 << 10) + BS and r.data_bytes == r.scanned_bytes
    assert seconds < 5, f"a 3-write cycle on 8 GiB took {seconds:.1f}s"
    with Agent(store, cfg, tmp_path / "state" / "m1", tracker="scan") as ag:  # no --serve: it adopts the daemon
        qemu_io(uri, "write -P 0x44 7G 128k", "write -z 5G 64k", f"write -P 0x55 {(8 << 30) - 512} 512")
        r = ag.cycle().disks[0]
    assert (r.tracker, r.served, r.consistent, r.scanned_bytes) == ("scan", True, True, 8 << 30)
    assert (r.data_bytes, r.zero_bytes) == ((128 << 10) + BS, BS) and r.rescan is None, "exactly the changed blocks"
    with Agent(store, cfg, tmp_path / "state" / "m1") as ag:
        qemu_io(uri, "write -P 0x66 1G 4k")
        r = ag.cycle().disks[0]
    assert (r.rescan, r.scanned_bytes) == (None, BS), "the scan's cut left a bitmap the qemu tracker trusts"
    cat = ingest_all(store, cfg)
    assert all(lg.consistent for lg in catalog_logs(store, cat) if lg.cut)
    replica = tmp_path / "replica.raw"
    replay_catalog(store, cat, replica)
    _same_content(image, replica)


def _run_agent_thread(ag: Agent, interval: float) -> threading.Thread:
    t = threading.Thread(target=ag.run, kwargs=dict(interval=interval, once=False), daemon=True)
    t.start()
    return t


def _cuts_are_crash_consistent(tmp_path: Path, store, cfg) -> int:
    """Replay the accepted logs in order; at every cut the state must be crash-consistent."""
    cat = ingest_all(store, cfg)
    size = cfg.disks[0].size
    state = tmp_path / "replay.raw"
    with open(state, "wb") as f:
        f.truncate(size)
    fd = os.open(state, os.O_RDWR)
    cuts = 0
    try:
        for lg in catalog_logs(store, cat):
            apply_log(store, lg.key, fd)
            if lg.cut:
                assert lg.consistent
                bad = journal_writer.check_state(fd, size)
                assert not bad, f"cut after {lg.key} is not a state a crash could leave: {bad[:3]}"
                cuts += 1
    finally:
        os.close(fd)
    return cuts


@pytest.mark.parametrize("served,tracker", [("fuse", "qemu"), ("nbd", "qemu"), ("fuse", "scan")])
def test_every_cut_of_a_journaling_writer_is_crash_consistent(tmp_path: Path, served: str, tracker: str) -> None:
    """Also the scan tracker on a served disk: each cycle scans a frozen view, never the
    live disk the writer races (a live scan's cuts break the journal's rule)."""
    image, store, cfg = setup_machine(tmp_path, 16 << 20, fill=0)
    seconds = 6 if tracker == "qemu" else 4  # new CI time kept short: 4 s still give ~30 cuts
    with Agent(store, cfg, tmp_path / "state" / "m1", fuse=served == "fuse", tracker=tracker,
               serve=True) as ag:  # (the qemu tracker serves anyway)
        ag.cycle()
        target = ag.daemon.served_at("root")
        t = _run_agent_thread(ag, 0.1)
        writer = subprocess.run([sys.executable, "-m", "tests.journal_writer", served, target, str(seconds),
                                 str(cfg.disks[0].size)], capture_output=True, text=True, timeout=120,
                                cwd=Path(__file__).parent.parent)
        assert writer.returncode == 0, writer.stderr
        ag.stop_requested = True
        t.join(30)
        ag.stop_requested = False
        last = ag.cycle().disks[0]
    assert (last.tracker, last.served, last.consistent) == (tracker, True, True)
    commits = int(writer.stdout)
    assert commits > 20
    cuts = _cuts_are_crash_consistent(tmp_path, store, cfg)
    assert cuts >= 10, f"only {cuts} cuts in {seconds} s at 0.1 s cycles"
    assert replica_equals(tmp_path, store, cfg, image)
    hb = json.loads(store.get(layout.heartbeat_key("m1")))["disks"]["root"]
    assert (hb["tracker"], hb["served"], hb["consistent"], hb["rescan"]) == (tracker, True, True, None)


def test_fio_zipf_random_writes_replicate_exactly(tmp_path: Path) -> None:
    require("fio", "fio")
    image, store, cfg = setup_machine(tmp_path, 64 << 20)
    with Agent(store, cfg, tmp_path / "state" / "m1", fuse=True) as ag:
        ag.cycle()
        t = _run_agent_thread(ag, 0.2)
        subprocess.run(["fio", "--name=zipf", f"--filename={ag.daemon.served_at('root')}", "--rw=randwrite",
                        "--bssplit=4k/50:16k/20:64k/20:1m/10", "--random_distribution=zipf:1.1",
                        "--io_size=96m", "--size=64m", "--ioengine=psync", "--fdatasync=8", "--randrepeat=0",
                        "--allow_file_create=0"], check=True, capture_output=True, timeout=300)
        ag.stop_requested = True
        t.join(30)
        ag.stop_requested = False
        ag.cycle()
    assert replica_equals(tmp_path, store, cfg, image)


def _env(tmp_path: Path, store) -> dict[str, str]:
    return {"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state")}


@pytest.mark.parametrize("point", ["agent-after-freeze", "agent-after-upload", "agent-before-release"])
def test_agent_killed_at_a_crash_point_resends_only_the_frozen_blocks(tmp_path: Path, point: str) -> None:
    image, store, cfg = setup_machine(tmp_path, 32 << 20)
    env = _env(tmp_path, store)
    cli("agent", "m1", "--once", env=env)
    uri = f"nbd+unix:///root?socket={tmp_path / 'state' / 'm1' / 'serve' / 'root.sock'}"
    qemu_io(uri, "write -P 0x77 3M 128k", "write -P 0x78 20M 4k")
    crashed = cli("agent", "m1", "--once", env={**env, "HOTSPARE_CRASH_AT": point}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    qemu_io(uri, "write -P 0x79 8M 4k")  # the daemon outlived the agent: the machine goes on
    r = cli("agent", "m1", "--once", env=env)
    assert "merged 1 bitmap" in r.stdout and "scanning" not in r.stdout, r.stdout
    assert f"{4 * BS} data bytes" in r.stdout, "exactly the 3 frozen blocks and the new one ship again"
    assert replica_equals(tmp_path, store, cfg, image)


def test_a_served_scan_killed_after_an_upload_ships_a_block_that_returns_to_its_old_content(tmp_path: Path) -> None:
    """Every cycle of the served scan tracker compares a view with the hash map: the map
    marks the blocks in flight, so a block written back to what the saved map knew after a
    crash ships again (as on the live scan: tests/test_capture.py)."""
    image, store, cfg = setup_machine(tmp_path, 8 << 20, fill=0)
    env = {**_env(tmp_path, store), "HOTSPARE_TRACKER": "scan"}
    qemu_io(str(image), "write -P 0x22 0 64k")  # the saved map starts as all zeros
    crashed = cli("agent", "m1", "--once", "--serve", env={**env, "HOTSPARE_CRASH_AT": "agent-after-upload"},
                  check=False)
    assert crashed.returncode == -signal.SIGKILL
    qemu_io(f"nbd+unix:///root?socket={tmp_path / 'state' / 'm1' / 'serve' / 'root.sock'}", "write -z 0 64k")
    r = cli("agent", "m1", "--once", env=env)  # no --serve: the running daemon serves the disk
    assert "serves the disks" in r.stdout and "shipped 1 log(s)" in r.stdout, r.stdout
    assert replica_equals(tmp_path, store, cfg, image)


def test_agent_killed_at_random_moments_of_a_workload_loses_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 32 << 20)
    env = {**os.environ, **_env(tmp_path, store)}
    cli("agent", "m1", "--once", env=env)
    uri = f"nbd+unix:///root?socket={tmp_path / 'state' / 'm1' / 'serve' / 'root.sock'}"
    stop = threading.Event()

    def workload() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            off = rng.randrange(0, (32 << 20) // 4096 - 64) * 4096
            qemu_io(uri, f"write -P {rng.randrange(1, 255)} {off} {rng.choice([4096, 65536, 200704])}", "flush")

    w = threading.Thread(target=workload, daemon=True)
    w.start()
    rng = random.Random(3)
    outputs = []
    for _ in range(4):
        p = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "0.1", "--quiet"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.5, 2.0))
        p.kill()
        outputs.append(p.communicate()[0])
    stop.set()
    w.join(30)
    r = cli("agent", "m1", "--once", env=env)
    assert not any("scanning" in o for o in outputs + [r.stdout]), "a bitmap that survived needs no rescan"
    assert replica_equals(tmp_path, store, cfg, image)


def test_daemon_killed_scans_the_frozen_view_and_ships_only_what_differs(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 32 << 20)
    env = _env(tmp_path, store)
    cli("agent", "m1", "--once", env=env)
    uri = f"nbd+unix:///root?socket={tmp_path / 'state' / 'm1' / 'serve' / 'root.sock'}"
    qemu_io(uri, "write -P 0x41 5M 64k", "write -P 0x42 9M 4k", "flush")  # acknowledged, not shipped
    os.kill(int((tmp_path / "state" / "m1" / "qsd" / "pid").read_text()), signal.SIGKILL)
    time.sleep(0.2)
    r = cli("agent", "m1", "--once", env=env)
    assert "scanning a frozen view" in r.stdout and ("gone" in r.stdout or "inconsistent" in r.stdout), r.stdout
    assert f"{2 * BS} data bytes" in r.stdout, "only the two blocks that differ ship"
    assert replica_equals(tmp_path, store, cfg, image)
    # Stopped cleanly, the daemon stores its bitmap: the next start needs no scan.
    cli("daemon", "stop", "m1", env=env)
    qemu_io(str(image), "read 0 4k")  # the disk is plain raw, readable by anything
    r = cli("agent", "m1", "--once", env=env)
    assert "scanning" not in r.stdout, r.stdout


def test_state_that_the_store_does_not_hold_is_reseeded(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 16 << 20)
    env = _env(tmp_path, store)
    cli("agent", "m1", "--once", env=env)
    cli("daemon", "stop", "m1", env=env)
    # Re-protected into a new, empty store with the old agent state.
    store2 = open_store(str(tmp_path / "store2"))
    save_machine(store2, cfg, create_only=True)
    r = cli("agent", "m1", "--once", env={**env, "HOTSPARE_STORE": store2.url})
    assert "re-seeding" in r.stdout, r.stdout
    cat = ingest_all(store2, cfg)
    assert catalog_logs(store2, cat)[0].first_seq == 0 and not cat.resync_from
    replica = tmp_path / "replica2.raw"
    replay_catalog(store2, cat, replica)
    assert same_file(image, replica)


def test_status_shows_where_each_disk_is_served(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    env = _env(tmp_path, store)
    cli("agent", "m1", "--once", "--fuse", env=env)
    st = json.loads(cli("status", "m1", "--json", env=env).stdout)
    cap = st["disks"]["root"]["capture"]
    fuse_file = str(tmp_path / "state" / "m1" / "serve" / "root.img")
    assert cap["tracker"] == "qemu" and cap["served_at"] == fuse_file
    assert cap["served"] is True and cap["consistent"] is True
    # The scan tracker is told to serve; --fuse alone would leave that to a guess.
    r = cli("agent", "m1", "--once", "--tracker", "scan", "--fuse", env=env, check=False)
    assert r.returncode == 2 and "--serve" in r.stderr and "Traceback" not in r.stderr, r.stderr
    cli("agent", "m1", "--once", "--tracker", "scan", "--serve", "--fuse", env=env)
    cap = json.loads(cli("status", "m1", "--json", env=env).stdout)["disks"]["root"]["capture"]
    assert (cap["tracker"], cap["served"], cap["served_at"], cap["consistent"]) == ("scan", True, fuse_file, True)


def test_a_client_with_reconnect_delay_stalls_across_a_daemon_restart(tmp_path: Path) -> None:
    """kill -9 of the daemon under a QEMU client: its I/O waits for the new daemon (started
    by the agent) instead of failing, and the write it made meanwhile replicates."""
    image, store, cfg = setup_machine(tmp_path, 16 << 20)
    env = _env(tmp_path, store)
    cli("agent", "m1", "--once", env=env)
    sock = tmp_path / "state" / "m1" / "serve" / "root.sock"
    opts = f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=root," \
           "file.reconnect-delay=30"
    client = subprocess.Popen(["qemu-io", "--image-opts", "-c", "write -P 0x61 1M 64k", "-c", "sleep 8000",
                               "-c", "write -P 0x62 2M 64k", "-c", "flush", opts],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    os.kill(int((tmp_path / "state" / "m1" / "qsd" / "pid").read_text()), signal.SIGKILL)
    r = cli("agent", "m1", "--once", env=env)  # a new daemon: a frozen-view scan
    assert "scanning a frozen view" in r.stdout
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0 and "error" not in (out + err).lower(), out + err
    r = cli("agent", "m1", "--once", env=env)
    assert "scanning" not in r.stdout and f"{BS} data bytes" in r.stdout, r.stdout
    assert replica_equals(tmp_path, store, cfg, image)
    hb = store.get(layout.heartbeat_key("m1")).decode()
    assert '"rescan": null' in hb.replace('":null', '": null')


def test_daemon_killed_at_random_moments_of_a_workload_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the daemon under a running agent and a QEMU client: the agent starts a new
    daemon by itself, the client's I/O stalls and goes on, and the replica equals the disk."""
    image, store, cfg = setup_machine(tmp_path, 16 << 20)
    env = {**os.environ, **_env(tmp_path, store)}
    cli("agent", "m1", "--once", env=env)
    sock = tmp_path / "state" / "m1" / "serve" / "root.sock"
    opts = f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=root," \
           "file.reconnect-delay=60"
    rng = random.Random(11)
    cmds = []
    for i in range(120):
        cmds += ["-c", f"write -P {i % 250 + 1} {rng.randrange(0, 250) * BS} {rng.choice([4096, BS, 3 * BS])}",
                 "-c", "flush", "-c", "sleep 50"]
    client = subprocess.Popen(["qemu-io", "--image-opts", *cmds, opts], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    agent = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "0.2", "--quiet"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not store.exists("machines/m1/agent-lease.json"):  # its first cycle ran
            assert time.monotonic() < deadline and agent.poll() is None, agent.communicate()
            time.sleep(0.1)
        for _ in range(6):  # at whatever the agent is doing then: a cut, a view read, an upload
            time.sleep(rng.uniform(0.3, 1.2))
            pidfile, wait = tmp_path / "state" / "m1" / "qsd" / "pid", time.monotonic() + 30
            while True:  # the agent may be starting the next daemon: its pid file comes back soon
                try:
                    pid = int(pidfile.read_text())
                    break
                except (FileNotFoundError, ValueError):
                    assert time.monotonic() < wait and agent.poll() is None, "the agent started no new daemon"
                    time.sleep(0.05)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the agent has not started the next daemon yet: that one is dead already
        out, err = client.communicate(timeout=120)
    finally:
        agent.send_signal(signal.SIGINT)
        a_out, a_err = agent.communicate(timeout=60)
    assert client.returncode == 0 and "error" not in (out + err).lower(), \
        f"{(out + err)[-1500:]}\nagent:\n{a_out[-3000:]}\n{a_err[-3000:]}"
    assert agent.returncode == 0, a_err
    assert a_out.count("starting a new one") >= 1 and "scanning a frozen view" in a_out, a_out
    cli("agent", "m1", "--once", env=env)
    assert replica_equals(tmp_path, store, cfg, image)


def test_failover_prefers_the_newest_crash_consistent_point() -> None:
    from datetime import datetime, timezone

    from hotspare.catalog import RecoveryPoint
    from hotspare.consolidate.export import find_point

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    cat = Catalog(machine="m1", disk="root", version=3, disk_size=1 << 20, points=[
        RecoveryPoint(id="0-5", epoch=0, seq=5, time=t, bytes_applied=1, consistent=True),
        RecoveryPoint(id="0-9", epoch=0, seq=9, time=t, bytes_applied=1, consistent=False)])
    assert find_point(cat).id == "0-9"
    assert find_point(cat, prefer_consistent=True).id == "0-5"
