"""The scan-tracker agent (``--tracker scan``) on a local store: what it ships, and its
durability rules. The qemu tracker has tests/test_tracker.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hotspare import layout
from hotspare.capture.agent import Agent, Fenced
from hotspare.catalog import Catalog, Fence, catalog_logs, commit_catalog, load_catalog
from hotspare.ingest import ingest_disk
from hotspare.machine import MachineConfig, parse_disk_arg, save_machine
from hotspare.replay import replay_catalog
from hotspare.store import open_store
from tests.helpers import HOTSPARE, cli, qemu_io, random_image, same_file

BS = 64 << 10


def setup_machine(tmp_path: Path, size: int, fill: float = 0.25, block_kib: int = 64):
    image = tmp_path / "disk.img"
    random_image(image, size, fill=fill)
    store = open_store(str(tmp_path / "store"))
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}", block_kib << 10)])
    save_machine(store, cfg, create_only=True)
    return image, store, cfg


def ingest_all(store, cfg) -> Catalog:
    """Accept every pending log through the engine (the Prefect flow is tested elsewhere)."""
    return ingest_disk(store, cfg.name, cfg.disks[0])[0]


def test_first_pass_ships_only_nonzero_blocks_then_changes(tmp_path: Path) -> None:
    size = (40 << 20) + 512 * 3  # not a multiple of the block size: the last block is short
    image, store, cfg = setup_machine(tmp_path, size)
    nonzero = 0
    data = image.read_bytes()
    for off in range(0, size, BS):
        if any(data[off:off + BS]):
            nonzero += len(data[off:off + BS])
    with Agent(store, cfg, tmp_path / "state", tracker="scan") as agent:
        r = agent.cycle().disks[0]
        assert r.data_bytes == nonzero and r.zero_bytes == 0
        assert agent.cycle().disks[0].extents == 0, "an unchanged disk ships nothing"
        qemu_io(image, "write -P 0x5a 1M 64k", "write -z 0 1M", f"write -P 0x33 {size - 1024} 1024")
        r = agent.cycle().disks[0]
    # 64 KiB at 1M is one block; 0..1M became zeros (16 blocks) where the seed had data;
    # the short last block changed.
    assert r.data_bytes == BS + (size % BS or BS)
    assert r.zero_bytes == (1 << 20 if any(data[:1 << 20]) else 0)
    cat = ingest_all(store, cfg)
    replica = tmp_path / "replica.raw"
    replay_catalog(store, cat, replica)
    assert same_file(image, replica)
    # Logs carry null data for zero ranges, never zero bytes.
    for log in catalog_logs(store, cat):
        t = pq.read_table(Path(store.url.removeprefix("file://")) / log.key)
        for d in t.column("data").to_pylist():
            assert d is None or any(d)


def test_log_target_splits_logs(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 64 << 20, fill=1.0)
    with Agent(store, cfg, tmp_path / "state", tracker="scan", log_target=8 << 20) as agent:
        r = agent.cycle().disks[0]
    assert len(r.logs) >= 2
    seqs = [layout.parse_log_name(k) for k in r.logs]
    assert all(b[0] == a[1] + 1 for a, b in zip(seqs, seqs[1:])), "consecutive logs continue the seq chain"


def test_fenced_epoch_ships_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    d = cfg.disks[0]
    cat = load_catalog(store, "m1", "root", d.size)
    commit_catalog(store, cat.next(epoch=1, fences=[Fence(epoch=0, after_seq=-1, reason="test")]))
    with Agent(store, cfg, tmp_path / "state", tracker="scan") as agent, pytest.raises(Fenced, match="fenced"):
        agent.cycle()
    assert list(store.list(layout.logs_prefix("m1", "root", 0))) == []


def test_kill_between_upload_and_checkpoint_loses_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 32 << 20)
    env = {"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state"),
           "HOTSPARE_TRACKER": "scan"}
    cli("agent", "m1", "--once", env=env)
    qemu_io(image, "write -P 0x77 3M 128k", "write -P 0x78 20M 4k")
    crashed = cli("agent", "m1", "--once", env={**env, "HOTSPARE_CRASH_AT": "agent-after-upload"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    orphan = sorted(o.key for o in store.list(layout.logs_prefix("m1", "root", 0)))[-1]
    # More writes land after the crash, then the agent restarts.
    qemu_io(image, "write -P 0x79 3M 4k")
    cli("agent", "m1", "--once", env=env)
    keys = sorted(o.key for o in store.list(layout.logs_prefix("m1", "root", 0)))
    assert orphan in keys and keys[-1] != orphan
    first_new = layout.parse_log_name(keys[-1])[0]
    assert first_new == layout.parse_log_name(orphan)[1] + 1, "the restart must not reuse the orphan's seqs"
    cat = ingest_all(store, cfg)
    replica = tmp_path / "replica.raw"
    replay_catalog(store, cat, replica)
    assert same_file(image, replica)


def test_ctrl_c_stops_after_the_current_log(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 384 << 20, fill=1.0)
    env = {**os.environ, "HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state"),
           "HOTSPARE_TRACKER": "scan"}
    proc = subprocess.Popen([HOTSPARE, "agent", "m1", "--once", "--log-target-mib", "8", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(store.list(layout.logs_prefix("m1", "root", 0))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping after the current log" in err and "Traceback" not in err
    shipped = len(list(store.list(layout.logs_prefix("m1", "root", 0))))
    assert shipped < (384 << 20) // (8 << 20), "the agent stopped before shipping the whole disk"
    cli("agent", "m1", "--once", "--quiet", env=env)
    replica = tmp_path / "replica.raw"
    replay_catalog(store, ingest_all(store, cfg), replica)
    assert same_file(image, replica)


def test_agent_refuses_a_resized_disk(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    with open(image, "ab") as f:
        f.write(bytes(4096))
    r = cli("agent", "m1", "--once", env={"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "s"),
                   "HOTSPARE_TRACKER": "scan"},
            check=False)
    assert r.returncode == 1
    assert "disk root of m1" in r.stderr and "was 8388608 bytes when protected and is now 8392704" in r.stderr
    assert "re-protect it under a new name (hotspare protect m1-2 --disk root=" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_block_that_returns_to_its_old_content_after_a_crash_still_ships(tmp_path: Path) -> None:
    """Issue 11, finding 1: a log uploaded just before a crash, then the block written back
    to what the saved hash map knew. The map marks blocks in flight, so they ship again."""
    image, store, cfg = setup_machine(tmp_path, 8 << 20, fill=0)
    env = {"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state"), "HOTSPARE_TRACKER": "scan"}
    qemu_io(image, "write -P 0x11 0 64k")
    cli("agent", "m1", "--once", env=env)
    qemu_io(image, "write -P 0x22 0 64k")
    crashed = cli("agent", "m1", "--once", env={**env, "HOTSPARE_CRASH_AT": "agent-after-upload"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    qemu_io(image, "write -P 0x11 0 64k")
    r = cli("agent", "m1", "--once", env=env)
    assert "shipped 1 log(s)" in r.stdout, r.stdout
    replica = tmp_path / "replica.raw"
    replay_catalog(store, ingest_all(store, cfg), replica)
    assert same_file(image, replica)


def test_scan_points_are_marked_not_crash_consistent(tmp_path: Path) -> None:
    """No daemon serves the disk: each cycle reads the live disk, and its cuts, heartbeat,
    points and `hotspare points` say not crash-consistent (a served disk's scan tracker is
    in tests/test_tracker.py)."""
    from hotspare.replica.consolidate import consolidate_disk

    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    with Agent(store, cfg, tmp_path / "state", tracker="scan") as agent:
        for i in range(2):  # two points
            r = agent.cycle().disks[0]
            assert (r.tracker, r.served, r.served_at, r.consistent) == ("scan", False, None, False)
            cat = ingest_all(store, cfg)
            last = catalog_logs(store, cat)[-1]
            assert last.cut and not last.consistent
            assert consolidate_disk(store, "m1", cfg.disks[0], cfg.policy).point is not None
            qemu_io(image, f"write -P 0x{i + 0x21:x} 1M 64k")
    hb = json.loads(store.get(layout.heartbeat_key("m1")))["disks"]["root"]
    assert (hb["tracker"], hb["served"], hb["consistent"]) == ("scan", False, False)
    assert not (tmp_path / "state" / "qsd").exists(), "no daemon was started for it"
    env = {"HOTSPARE_STORE": store.url}
    pts = json.loads(cli("points", "m1", "--json", env=env).stdout)["root"]
    assert len(pts) == 2 and not any(p["consistent"] for p in pts)
    table = cli("points", "m1", env={**env, "COLUMNS": "200"}).stdout
    assert table.count("NO (a scan of a live disk)") == 2, table


def test_an_interval_longer_than_half_the_heartbeat_window_is_refused(tmp_path: Path) -> None:
    """Issue 11, finding 7: such an agent's live machine would be failed over."""
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    r = cli("agent", "m1", "--interval", "40", env={"HOTSPARE_STORE": store.url,
                                                    "HOTSPARE_AGENT_STATE": str(tmp_path / "s")}, check=False)
    assert r.returncode == 2 and "heartbeat" in r.stderr and "Traceback" not in r.stderr
    for bad in ("nan", "0", "-1"):
        r = cli("agent", "m1", "--interval", bad, env={"HOTSPARE_STORE": store.url}, check=False)
        assert r.returncode == 2 and "positive" in r.stderr, r.stderr


def test_a_retried_upload_that_finds_its_own_log_is_not_an_alarm(tmp_path: Path) -> None:
    """Issue 11, finding 6: a lost answer after an upload, then the retry meets the log."""
    from hotspare.capture.upload import _same_object, upload_log
    from hotspare.extentlog import Extent, LogWriter

    store = open_store(str(tmp_path / "store"))

    def writer(path: Path, byte: int) -> LogWriter:
        w = LogWriter(str(path), machine="m1", disk="root", epoch=0, disk_size=1 << 20)
        w.add(Extent(seq=0, offset=0, length=4096, data=bytes([byte]) * 4096))
        return w

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    upload_log(store, writer(a, 1), str(a), machine="m1", disk="root", epoch=0)
    key = layout.log_key("m1", "root", 0, 0, 0)
    # The same bytes again (what a retry of the first upload sends) are the same object...
    shutil.copyfile(Path(store.url.removeprefix("file://")) / key, b)
    assert _same_object(store, key, str(b))
    # ... other bytes under the same seqs are another shipper.
    with pytest.raises(Exception, match="another agent shipping|other content"):
        upload_log(store, writer(b, 2), str(b), machine="m1", disk="root", epoch=0, who="agent")


def test_a_second_agent_for_one_machine_is_refused(tmp_path: Path) -> None:
    """Issue 11, finding 2: two agents with different state directories would stall the
    replica; the second is refused while the first runs, and takes over once it is gone."""
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    env = {**os.environ, "HOTSPARE_STORE": store.url, "HOTSPARE_TRACKER": "scan"}
    first = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "0.5", "--quiet", "--state-dir",
                              str(tmp_path / "a")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not store.exists("machines/m1/agent-lease.json"):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.1)
        r = cli("agent", "m1", "--once", "--state-dir", str(tmp_path / "b"), env=env, check=False)
        assert r.returncode == 1 and "another agent ships m1" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert str(tmp_path / "a") in r.stderr, "the refusal names the running agent"
    finally:
        first.kill()  # gone without releasing its lease
        first.wait()
    r = cli("agent", "m1", "--once", "--state-dir", str(tmp_path / "b"), env=env)
    cat = ingest_all(store, cfg)
    assert not cat.rejected and cat.resync_from is None
