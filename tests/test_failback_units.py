"""Failback's engine without a VM or Prefect: range arithmetic, what the store can say
about the changed ranges, and the restoring agent's handling of its orders."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from hotspare import layout
from hotspare.capture.agent import Agent, Fenced
from hotspare.catalog import AcceptedLog, Catalog
from hotspare.errors import InvalidObject, UsageError
from hotspare.extentlog import Extent, LogWriter
from hotspare.failback import ranges as rg
from hotspare.failback.orders import DiskDivergence, DiskOrder, Order, commit_order
from hotspare.failback.plan import divergence_ranges, hashes_bytes, replica_changes
from hotspare.failback.restore import Restorer
from hotspare.fence import fence_disk
from hotspare.machine import MachineConfig, parse_disk_arg, save_machine
from hotspare.state import commit_state, load_state
from hotspare.store import open_store
from tests.helpers import random_image

MIB = 1 << 20


def covered(r: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=bool)
    for a, b in r.tolist():
        out[a:b] = True
    return out


def test_union_equals_brute_force_coverage() -> None:
    rng = np.random.default_rng(7)
    starts = rng.integers(0, 10_000, 400)
    parts = np.stack([starts, starts + rng.integers(0, 300, 400)], axis=1)
    u = rg.union(parts[:150], parts[150:])
    assert (np.diff(u, axis=1) > 0).all() and (u[1:, 0] > u[:-1, 1]).all(), "sorted, disjoint, not touching"
    want = np.zeros(11_000, dtype=bool)
    for a, b in parts.tolist():
        want[a:b] = True
    assert (covered(u, 11_000) == want).all()
    assert rg.total(u) == int(want.sum())
    assert rg.total(rg.union()) == 0
    assert rg.from_blocks(np.array([0, 1, 3]), 4096, 3 * 4096 + 512).tolist() == [[0, 8192], [12288, 12800]]
    assert list(rg.pieces(np.array([[0, 10]]), 4)) == [(0, 4), (4, 4), (8, 2)]
    blocks = np.zeros(11_000 // 64 + 1, dtype=bool)
    for a, b in u.tolist():
        blocks[a // 64:(b - 1) // 64 + 1] = True
    assert rg.blocks(u, 64) == int(blocks.sum())


def _log(key: str, epoch: int, first: int, last: int) -> AcceptedLog:
    return AcceptedLog(key=key, epoch=epoch, first_seq=first, last_seq=last, rows=last - first + 1, data_bytes=0,
                       covered_bytes=0, size=0)


def _put_log(st, machine: str, disk: str, epoch: int, first: int, extents: list[tuple[int, bytes]], size: int) -> str:
    sink = io.BytesIO()
    w = LogWriter(sink, machine=machine, disk=disk, epoch=epoch, disk_size=size)
    for i, (off, data) in enumerate(extents):
        w.add(Extent(seq=first + i, offset=off, length=len(data), data=data))
    w.close()
    key = layout.log_key(machine, disk, epoch, first, first + len(extents) - 1)
    st.put(key, sink.getvalue())
    return key


def test_replica_changes_reads_extents_and_knows_when_the_chain_is_gone(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    size = 8 * MIB
    a = _put_log(st, "m", "d", 1, 0, [(0, b"x" * 4096), (MIB, b"y" * 512)], size)
    b = _put_log(st, "m", "d", 1, 2, [(4096, b"z" * 4096)], size)
    cat = Catalog(machine="m", disk="d", version=3, disk_size=size, epoch=1,
                  logs=[_log(a, 1, 0, 1), _log(b, 1, 2, 2)])
    assert replica_changes(st, cat, (0, 9), (1, 2)).tolist() == [[0, 8192], [MIB, MIB + 512]]
    assert replica_changes(st, cat, (1, 1), (1, 2)).tolist() == [[4096, 8192]]
    assert rg.total(replica_changes(st, cat, (1, 2), (1, 2))) == 0
    folded = cat.model_copy(update={"tail": [_log(b, 1, 2, 2)], "folded": {1: 1}})
    assert replica_changes(st, folded, (0, 9), (1, 2)) is None, "logs folded into the base: unknown, compare all"


def test_divergence_past_the_disk_end_is_refused(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    spec = parse_disk_arg(f"d={_image(tmp_path, 1)}")
    st.put("div.npy", hashes_bytes(np.array([3, 99], dtype=np.uint64)))
    with pytest.raises(InvalidObject, match=r"div\.npy: names block 99, past the end of disk d"):
        divergence_ranges(st, spec, DiskDivergence(blocks=2, key="div.npy"))
    st.put("bad.npy", b"not numpy")
    with pytest.raises(InvalidObject, match=r"bad\.npy: not a hash map"):
        divergence_ranges(st, spec, DiskDivergence(blocks=2, key="bad.npy"))
    assert divergence_ranges(st, spec, DiskDivergence(error="disk unreadable")) is None


def _image(tmp_path: Path, mib: int) -> Path:
    p = tmp_path / "disk.img"
    random_image(p, mib * MIB, fill=0.5)
    return p


def _failed_over(tmp_path: Path):
    """A machine that shipped once, then failed over (fence of epoch 0, VM epoch 1)."""
    st = open_store(str(tmp_path / "store"))
    image = _image(tmp_path, 4)
    cfg = MachineConfig(name="m", disks=[parse_disk_arg(f"root={image}")])
    save_machine(st, cfg, create_only=True)
    with Agent(st, cfg, tmp_path / "agent", tracker="scan") as ag:
        ag.cycle()
    fence_disk(st, "m", cfg.disks[0], 0, "test")
    commit_state(st, load_state(st, "m").next(state="failed-over", epoch=1))
    return st, cfg, image


def test_restore_mode_refuses_a_machine_that_never_failed_over(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    cfg = MachineConfig(name="m", disks=[parse_disk_arg(f"root={_image(tmp_path, 1)}")])
    save_machine(st, cfg, create_only=True)
    with pytest.raises(UsageError, match="machine m is protected in epoch 0: nothing to restore"):
        Restorer(st, cfg, tmp_path / "agent").start()


def test_restore_reports_divergence_and_never_applies_a_corrupt_data_log(tmp_path: Path) -> None:
    st, cfg, image = _failed_over(tmp_path)
    with open(image, "r+b") as f:  # written after the last shipment: divergence
        f.seek(3 * MIB)
        f.write(b"\xee" * 100)
    with pytest.raises(Fenced, match="--restore"):
        with Agent(st, cfg, tmp_path / "agent", tracker="scan") as ag:
            ag.cycle()
    size = cfg.disks[0].size
    key = layout.failback_data_key("m", 1, 0, "root", 0)
    data = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()  # incompressible
    good = io.BytesIO()
    w = LogWriter(good, machine="m", disk="root", epoch=1, disk_size=size)
    w.add(Extent(seq=0, offset=MIB, length=4096, data=data))
    w.close()
    raw = bytearray(good.getvalue())
    raw[raw.index(data[100:164]) + 10] ^= 0xFF  # one flipped data byte
    st.put(key, bytes(raw))
    commit_order(st, Order(machine="m", vm_epoch=1, version=0, label="phase-1", kind="apply",
                           disks={"root": DiskOrder(logs=[key], bytes=4096, upto=(1, 0))}))
    before = image.read_bytes()
    shipped = list(st.list(layout.logs_prefix("m", "root", 0)))
    r = Restorer(st, cfg, tmp_path / "agent")
    assert r.run(interval=0.1, once=True) is False
    assert image.read_bytes() == before, "nothing of a corrupt data log reaches the disk"
    hb = json.loads(st.get(layout.heartbeat_key("m")))
    assert hb["mode"] == "restore" and hb["epoch"] == 0
    assert hb["restore"]["divergence"]["root"]["blocks"] == 1, "the block written after the last shipment"
    assert key in hb["restore"]["error"] and "checksum" in hb["restore"]["error"]
    assert list(st.list(layout.logs_prefix("m", "root", 0))) == shipped, "restore mode ships nothing"
    st.put(key, good.getvalue())  # a re-run of the flow rewrites the data log
    Restorer(st, cfg, tmp_path / "agent").run(interval=0.1, once=True)
    with open(image, "rb") as f:
        f.seek(MIB)
        assert f.read(4096) == data
    hb = json.loads(st.get(layout.heartbeat_key("m")))
    assert (hb["restore"]["done"], hb["restore"]["error"]) == (0, None)


def test_cli_refuses_bad_failback_arguments_in_one_line(tmp_path: Path) -> None:
    from tests.helpers import cli

    env = {"HOTSPARE_STORE": str(tmp_path / "store")}
    r = cli("failback", "m", "--target-disk", "root", env=env, check=False)
    assert r.returncode == 2 and "--target-disk 'root': use NAME=PATH" in r.stderr
    r = cli("failback", env=env, check=False)
    assert r.returncode == 2 and "Missing" in r.stderr and "Traceback" not in r.stderr
    r = cli("agent", "m", "--restore", env=env, check=False)
    assert r.returncode == 1 and "machine 'm' is not protected" in r.stderr and "Traceback" not in r.stderr


def test_failback_fences_the_vm_epoch_at_the_verified_seq(tmp_path: Path) -> None:
    from hotspare.catalog import commit_catalog, load_catalog
    from hotspare.fence import ReplicaMoved

    st = open_store(str(tmp_path / "store"))
    spec = parse_disk_arg(f"root={_image(tmp_path, 1)}")
    commit_catalog(st, Catalog(machine="m", disk="root", version=1, disk_size=spec.size, epoch=1, applied={0: 9, 1: 5}))
    _put_log(st, "m", "root", 1, 6, [(0, b"late" * 128)], spec.size)  # shipped after the verified seq 5
    with pytest.raises(ReplicaMoved, match="epoch 1 is applied up to seq 5, past seq 3"):
        fence_disk(st, "m", spec, 1, "failback", after_seq=3)
    cat = fence_disk(st, "m", spec, 1, "failback", after_seq=5)
    assert (cat.epoch, cat.fence_of(1).after_seq) == (2, 5), "the late log's seq 6 is refused from now on"
    assert load_catalog(st, "m", "root", spec.size).fence_of(1).after_seq == 5


def test_the_restore_agents_kept_map_rehashes_only_the_blocks_it_wrote(tmp_path) -> None:
    """After a full scan the agent keeps its map; the blocks a data log wrote are marked, and
    the next scan reads only those (here 2 of 16 blocks), with their hashes right."""
    import io
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    from hotspare.failback.known import KnownHashes
    from hotspare.machine import DiskSpec

    img = tmp_path / "disk"
    img.write_bytes(os.urandom(1 << 20))
    spec = DiskSpec(name="root", path=str(img), size=1 << 20, block_size=65536)
    known = KnownHashes(tmp_path, 1, spec, str(img))
    assert known.known() is None and known.rescan(os.open(img, os.O_RDONLY)) is None, "no map: a full scan"
    stale = np.arange(16, dtype=np.uint64)
    known.keep(stale)
    log = io.BytesIO()
    pq.write_table(pa.table({"offset": pa.array([70000, 0], pa.uint64()), "length": pa.array([1000, 512], pa.uint32())}),
                   log)
    known.mark_log(log.getvalue())
    fd = os.open(img, os.O_RDONLY)
    try:
        hashes, read = known.rescan(fd)
    finally:
        os.close(fd)
    data = img.read_bytes()
    assert read == 2 * 65536
    assert hashes[0] == xxhash.xxh3_64_intdigest(data[:65536]) and hashes[1] == xxhash.xxh3_64_intdigest(data[65536:131072])
    assert (hashes[2:] == stale[2:]).all(), "blocks no log wrote are not read again"
    assert KnownHashes(tmp_path, 1, spec, "/other/disk").known() is None, "a map of another target is not used"
    # Something else writes the image: its stamp changes, and the next scan reads it all,
    # even after the agent's own next write.
    known.keep(hashes)
    time.sleep(0.01)
    with open(img, "r+b") as f:
        f.write(b"x")
    assert known.known() is None
    known.before_write()
    known.mark_log(log.getvalue())
    assert known.known() is None, "the agent's later write does not hide the other one"
