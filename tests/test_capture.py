"""The scan-tracker agent on a local store: what it ships, and its durability rules."""

from __future__ import annotations

import os
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
    with Agent(store, cfg, tmp_path / "state") as agent:
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
    with Agent(store, cfg, tmp_path / "state", log_target=8 << 20) as agent:
        r = agent.cycle().disks[0]
    assert len(r.logs) >= 2
    seqs = [layout.parse_log_name(k) for k in r.logs]
    assert all(b[0] == a[1] + 1 for a, b in zip(seqs, seqs[1:])), "consecutive logs continue the seq chain"


def test_fenced_epoch_ships_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 8 << 20)
    d = cfg.disks[0]
    cat = load_catalog(store, "m1", "root", d.size)
    commit_catalog(store, cat.next(epoch=1, fences=[Fence(epoch=0, after_seq=-1, reason="test")]))
    with Agent(store, cfg, tmp_path / "state") as agent, pytest.raises(Fenced, match="fenced"):
        agent.cycle()
    assert list(store.list(layout.logs_prefix("m1", "root", 0))) == []


def test_kill_between_upload_and_checkpoint_loses_nothing(tmp_path: Path) -> None:
    image, store, cfg = setup_machine(tmp_path, 32 << 20)
    env = {"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state")}
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
    env = {**os.environ, "HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "state")}
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
    r = cli("agent", "m1", "--once", env={"HOTSPARE_STORE": store.url, "HOTSPARE_AGENT_STATE": str(tmp_path / "s")},
            check=False)
    assert r.returncode == 1
    assert "registered as 8388608" in r.stderr and "Traceback" not in r.stderr
