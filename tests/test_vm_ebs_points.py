"""A recovery point's EBS snapshot made from its chunks (hotspare.vm.ec2.ebs_chunks, ebs_points),
against moto's EC2 and EBS as in test_vm_ec2.py (the same fixtures, tests/fixtures_aws.py).

Points are made the way the agent makes them: extent logs shipped (ship_cycle), ingested and
consolidated into a local-directory store. moto ignores ParentSnapshotId (a child starts
empty), so a child snapshot lists exactly the blocks put on it, and the disk it stands for is
its parent's blocks overlaid with its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hotspare import layout
from hotspare.capture.upload import ship_cycle
from hotspare.catalog import Catalog, RecoveryPoint, load_catalog
from hotspare.ingest import ingest_disk
from hotspare.machine import DiskSpec, MachineConfig, Policy, save_machine
from hotspare.store.local import LocalStore
from hotspare.replica.consolidate import consolidate_disk
from hotspare.replica.index import read_root
from hotspare.replica.reader import ChunkReader
from hotspare.vm.ec2.ebs import EBS_BLOCK, read_block, snapshot_blocks
from hotspare.vm.ec2.ebs_points import PointSnapshot
from hotspare.vm.ec2.host import Ec2Host
from hotspare.vm.host import ebs_snapshot_of
from tests.fixtures_aws import REGION

KIB = 1024
CHUNK = 64 * KIB
# 12.25 EBS blocks: the last one is partial.
SIZE = 12 * EBS_BLOCK + 128 * KIB

Extent = tuple[int, int, "bytes | None"]


class CountingStore(LocalStore):
    """The local store, noting the key of every whole-object read (index pages are read so)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get(key)

    def page_gets(self) -> int:
        return sum(k.endswith(".page") for k in self.gets)


class Disk:
    """A protected disk whose points are made from extents; ``model`` (small disks) holds
    the bytes the newest point must have."""

    def __init__(self, tmp: Path, size: int, *, model: bool = True) -> None:
        self.store = CountingStore(str(tmp / "store"))
        self.spec = DiskSpec(name="root", path="/dev/null", size=size)
        self.cfg = MachineConfig(name="m1", disks=[self.spec], policy=Policy(host="ec2"))
        save_machine(self.store, self.cfg, create_only=True)
        self.tmp, self.size, self.last_seq = tmp, size, -1
        self.model = bytearray(size) if model else None

    def write(self, extents: list[Extent]) -> tuple[Catalog, RecoveryPoint]:
        """Ship ``extents`` ((offset, length, data or None for zeros)) as one cycle and
        consolidate: returns the catalog and its new point."""
        ship_cycle(self.store, extents, machine="m1", disk="root", epoch=0, disk_size=self.size,
                   last_seq=self.last_seq, workdir=self.tmp, consistent=True)
        self.last_seq += len(extents)
        ingest_disk(self.store, "m1", self.spec)
        consolidate_disk(self.store, "m1", self.spec, self.cfg.policy)
        if self.model is not None:
            for off, n, data in extents:
                self.model[off:off + n] = data if data is not None else bytes(n)
        cat = load_catalog(self.store, "m1", "root", self.size)
        point = cat.point("current")
        assert point is not None and point.seq == self.last_seq
        return cat, point

    def snapshot(self, host: Ec2Host, cat: Catalog, point: RecoveryPoint, workdir: Path) -> str:
        vd = host.point_disk(self.store, cat, self.spec, point, workdir)
        sid = ebs_snapshot_of(vd.backing)
        assert sid is not None and vd.name == "root" and vd.size == self.size, vd
        return sid

    def padded(self) -> bytes:
        assert self.model is not None
        return bytes(self.model) + bytes(-len(self.model) % EBS_BLOCK)


def rand(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class Calls:
    """What hotspare asked of moto's EBS, seen through botocore's own event hooks."""

    def __init__(self, host: Ec2Host) -> None:
        self.starts: list[dict[str, Any]] = []
        self.puts: list[int] = []
        events = host.ebs.meta.events
        events.register("before-parameter-build.ebs.StartSnapshot", lambda params, **_: self.starts.append(dict(params)))
        events.register("before-parameter-build.ebs.PutSnapshotBlock",
                        lambda params, **_: self.puts.append(params["BlockIndex"]))

    def reset(self) -> None:
        self.starts.clear()
        self.puts.clear()


def contents(host: Ec2Host, snapshot_id: str) -> dict[int, bytes]:
    """Every block the snapshot holds, read back (checksums verified)."""
    return {i: read_block(host.ebs, snapshot_id, i, t) for i, t in snapshot_blocks(host.ebs, snapshot_id).items()}


def record(store: LocalStore, point: str) -> PointSnapshot:
    return PointSnapshot.model_validate_json(store.get(layout.ebs_snapshot_key("m1", REGION, "root", point)))


def gone(host: Ec2Host, snapshot_id: str) -> bool:
    return not host.ec2.describe_snapshots(Filters=[{"Name": "snapshot-id", "Values": [snapshot_id]}])["Snapshots"]


def test_a_point_snapshot_holds_its_blocks_and_the_next_only_what_differs(ec2_host: Ec2Host, tmp_path: Path) -> None:
    disk = Disk(tmp_path, SIZE)
    calls = Calls(ec2_host)
    cat, p1 = disk.write([
        (0, EBS_BLOCK, rand(EBS_BLOCK, 1)),
        (3 * EBS_BLOCK + 2 * CHUNK, CHUNK, rand(CHUNK, 2)),  # one chunk of block 3
        (4 * EBS_BLOCK + 100 * KIB, 4 * KIB, rand(4 * KIB, 3)),  # part of one chunk of block 4
        (7 * EBS_BLOCK, EBS_BLOCK, rand(EBS_BLOCK, 4)),
        (12 * EBS_BLOCK, 128 * KIB, rand(128 * KIB, 5)),  # the partial last block, whole
    ])
    first = disk.snapshot(ec2_host, cat, p1, tmp_path / "vm")

    # (a) exactly the non-zero blocks, each the point's bytes (padded past the disk's end).
    held = contents(ec2_host, first)
    assert sorted(held) == sorted(calls.puts) == [0, 3, 4, 7, 12]
    assert "ParentSnapshotId" not in calls.starts[0]
    image = disk.padded()
    reader = ChunkReader(disk.store, read_root(disk.store, p1.root))
    for i, data in held.items():
        assert data == image[i * EBS_BLOCK:(i + 1) * EBS_BLOCK]
        assert data[:SIZE - i * EBS_BLOCK] == reader.read(i * EBS_BLOCK, min(EBS_BLOCK, SIZE - i * EBS_BLOCK))
    rec = record(disk.store, p1.id)
    assert (rec.snapshot_id, rec.point, rec.root, rec.region, rec.parent_snapshot_id) == (first, p1.id, p1.root,
                                                                                           REGION, None)
    # Asked again (a re-run, a drill after a failover of the same point): the same snapshot, nothing put.
    calls.reset()
    assert disk.snapshot(ec2_host, cat, p1, tmp_path / "vm") == first and calls.starts == calls.puts == []

    # (b) more writes, a new point: a child of the first, with exactly the blocks that differ.
    cat, p2 = disk.write([
        (0, CHUNK, image[:CHUNK]),  # rewritten with the same bytes: the same chunk, not put
        (3 * EBS_BLOCK + 5 * CHUNK, CHUNK, rand(CHUNK, 6)),
        (7 * EBS_BLOCK, EBS_BLOCK, None),  # became zero: must be put, as zeros
        (9 * EBS_BLOCK + 8 * KIB, 8 * KIB, rand(8 * KIB, 7)),  # was zero
        (12 * EBS_BLOCK, CHUNK, None),  # half of the last block zeroed, the rest stays
    ])
    calls.reset()
    second = disk.snapshot(ec2_host, cat, p2, tmp_path / "vm")
    assert [s.get("ParentSnapshotId") for s in calls.starts] == [first]
    child = contents(ec2_host, second)  # moto: the child holds only what was put on it
    assert sorted(child) == sorted(calls.puts) == [3, 7, 9, 12]
    assert child[7] == bytes(EBS_BLOCK)
    overlay = {**held, **child}
    whole = b"".join(overlay.get(i, bytes(EBS_BLOCK)) for i in range(len(disk.padded()) // EBS_BLOCK))
    assert whole == disk.padded()
    assert record(disk.store, p2.id).parent_snapshot_id == first

    # A third point: over the second; the first, neither the newest nor its parent, is deleted.
    cat, p3 = disk.write([(EBS_BLOCK, CHUNK, rand(CHUNK, 8))])
    calls.reset()
    third = disk.snapshot(ec2_host, cat, p3, tmp_path / "vm")
    assert [s.get("ParentSnapshotId") for s in calls.starts] == [second] and calls.puts == [1]
    assert gone(ec2_host, first) and not gone(ec2_host, second) and not gone(ec2_host, third)
    assert not disk.store.exists(layout.ebs_snapshot_key("m1", REGION, "root", p1.id))
    assert record(disk.store, p2.id).snapshot_id == second


def test_a_record_of_a_deleted_snapshot_means_a_full_upload(ec2_host: Ec2Host, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    disk = Disk(tmp_path, SIZE)
    calls = Calls(ec2_host)
    cat, p1 = disk.write([(0, EBS_BLOCK, rand(EBS_BLOCK, 1)), (5 * EBS_BLOCK, CHUNK, rand(CHUNK, 2))])
    first = disk.snapshot(ec2_host, cat, p1, tmp_path / "vm")
    ec2_host.ec2.delete_snapshot(SnapshotId=first)  # by hand, say: the record still names it
    cat, p2 = disk.write([(8 * EBS_BLOCK, CHUNK, rand(CHUNK, 3))])
    calls.reset()
    with caplog.at_level(logging.INFO, logger="hotspare"):
        second = disk.snapshot(ec2_host, cat, p2, tmp_path / "vm")
    assert [s.get("ParentSnapshotId") for s in calls.starts] == [None]
    assert sorted(contents(ec2_host, second)) == sorted(calls.puts) == [0, 5, 8]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    key = layout.ebs_snapshot_key("m1", REGION, "root", p1.id)
    assert warned[0] == (f"m1/root point {p2.id}: parent record {key} names snapshot {first}, which is gone: "
                         "no parent, full upload")
    assert not disk.store.exists(key)  # pruned with the snapshot it named
    assert record(disk.store, p2.id).parent_snapshot_id is None

    # The point's own record naming a gone snapshot: made again, and recorded anew.
    ec2_host.ec2.delete_snapshot(SnapshotId=second)
    again = disk.snapshot(ec2_host, cat, p2, tmp_path / "vm")
    assert again != second and record(disk.store, p2.id).snapshot_id == again
    assert sorted(contents(ec2_host, again)) == [0, 5, 8]


def test_on_a_disk_of_several_gib_the_cost_follows_the_changed_data(ec2_host: Ec2Host, tmp_path: Path) -> None:
    """4 GiB disk (64 index pages), a few MiB of data: blocks put and index pages read follow
    what is stored, then what changed, never the disk's size."""
    gib = 1 << 30
    disk = Disk(tmp_path, 4 * gib, model=False)
    calls = Calls(ec2_host)
    cat, p1 = disk.write([
        (0, 3 << 20, rand(3 << 20, 1)),  # blocks 0-5, page 0
        (gib + CHUNK, 1 << 20, rand(1 << 20, 2)),  # blocks 2048-2050, page 16
        (3 * gib + EBS_BLOCK, 256 * KIB, rand(256 * KIB, 3)),  # block 6145, page 48
        (4 * gib - CHUNK, CHUNK, rand(CHUNK, 4)),  # block 8191, page 63
    ])
    assert read_root(disk.store, p1.root).page_count == 64
    disk.store.gets.clear()
    first = disk.snapshot(ec2_host, cat, p1, tmp_path / "vm")
    assert len(calls.puts) == 11 and disk.store.page_gets() == 4  # the stored pages, once each

    cat, p2 = disk.write([
        (gib + 200 * KIB, 4 * KIB, rand(4 * KIB, 5)),  # block 2048, page 16
        (2 * gib, CHUNK, rand(CHUNK, 6)),  # block 4096, page 32: new
        (0, CHUNK, None),  # block 0, still holding data elsewhere
    ])
    calls.reset()
    disk.store.gets.clear()
    second = disk.snapshot(ec2_host, cat, p2, tmp_path / "vm")
    assert [s.get("ParentSnapshotId") for s in calls.starts] == [first]
    assert sorted(calls.puts) == [0, 2048, 4096]
    # Pages 0 and 16 of both points, page 32 of the new one only; the 61 others not at all.
    assert disk.store.page_gets() == 5
    assert sorted(snapshot_blocks(ec2_host.ebs, second)) == [0, 2048, 4096]


def test_a_damaged_record_is_quarantined_and_import_snapshot_still_exports(ec2_host: Ec2Host, tmp_path: Path) -> None:
    disk = Disk(tmp_path, SIZE)
    cat, p1 = disk.write([(0, CHUNK, rand(CHUNK, 1))])
    key = layout.ebs_snapshot_key("m1", REGION, "root", p1.id)
    disk.store.put(key, b'{"format_version": 1, "snapshot_id": "snap-0"}', create_only=True)
    calls = Calls(ec2_host)
    first = disk.snapshot(ec2_host, cat, p1, tmp_path / "vm")  # not believed: a new snapshot, recorded
    assert record(disk.store, p1.id).snapshot_id == first and len(calls.starts) == 1
    assert disk.store.exists(layout.quarantine_key(key))

    # VM Import reads an image from S3: with import-snapshot, the point is exported locally.
    other = Ec2Host(ec2_host.config.model_copy(update={"disk_source": "import-snapshot", "import_bucket": "b"}))
    vd = other.point_disk(disk.store, cat, disk.spec, p1, tmp_path / "vm2")
    assert Path(vd.backing).read_bytes() == bytes(disk.model)
