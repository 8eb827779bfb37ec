"""Ec2Host and Ec2DeltaCapture against moto's EC2 and EBS (``mock_aws``, in-process).

moto stands in for EC2 and EBS only, the calls it implements: EBS direct snapshots
(start, put, complete, list, get), DescribeSnapshots, RegisterImage, RunInstances,
DescribeInstances, GetConsoleOutput, StopInstances, TerminateInstances and the clean-up
calls. Not here, because moto does not implement them or does them wrongly: ImportSnapshot
(only its error is checked), a real boot, GetConsoleScreenshot (only its error),
ListChangedBlocks (the capture's listing comparison is tested instead). See README "EC2
host: what is tested and what is not". S3 is never mocked: nothing here uses S3.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moto")

from hotspare import layout  # noqa: E402
from hotspare.errors import HotspareError, UsageError  # noqa: E402
from hotspare.extentlog import iter_extents, validate_log  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from hotspare.vhd import write_dynamic  # noqa: E402
from hotspare.vm import VmHandle, VmSpec, load_handle  # noqa: E402
from hotspare.vm.ec2 import capture as ec2_capture  # noqa: E402
from hotspare.vm.ec2.aws import Ec2Error  # noqa: E402
from tests.helpers import replay_over  # noqa: E402
from hotspare.vm.ec2.capture import Ec2DeltaCapture  # noqa: E402
from hotspare.vm.ec2.ebs import (  # noqa: E402
    EBS_BLOCK,
    block_checksum,
    blocks_of_ranges,
    read_block,
    snapshot_blocks,
    upload_snapshot,
)
from hotspare.vm.ec2.ebs_points import PointSnapshot  # noqa: E402
from hotspare.vm.ec2.host import Ec2Host, Ec2HostConfig  # noqa: E402
from hotspare.vm.ec2.resources import TAG_VM  # noqa: E402
from tests.fixtures_aws import REGION  # noqa: E402

# 10.125 blocks: the last 512 KiB block is partial, as a disk's size need not be a multiple.
SIZE = 10 * EBS_BLOCK + 64 * 1024
DATA_BLOCKS = [0, 3, 4, 7, 10]


@pytest.fixture
def host(ec2_host: Ec2Host) -> Ec2Host:
    return ec2_host  # tests/fixtures_aws.py: moto's EC2 and EBS, dummy credentials


def write_image(path: Path, blocks: dict[int, bytes], size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for index, data in blocks.items():
            f.seek(index * EBS_BLOCK)
            f.write(data[: size - index * EBS_BLOCK])
    return path


def random_blocks(indices: list[int], seed: int) -> dict[int, bytes]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 256, EBS_BLOCK, dtype=np.uint8).tobytes() for i in indices}


def padded_block(path: Path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * EBS_BLOCK)
        data = f.read(EBS_BLOCK)
    return data + bytes(EBS_BLOCK - len(data))


def tagged(host: Ec2Host, vm_id: str) -> dict[str, list[str]]:
    """What EC2 still holds with the VM's tag (terminated instances excluded)."""
    f = [{"Name": f"tag:{TAG_VM}", "Values": [vm_id]}]
    ec2 = host.ec2
    return {
        "images": [i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=f)["Images"]],
        "snapshots": [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"], Filters=f)["Snapshots"]],
        "volumes": [v["VolumeId"] for v in ec2.describe_volumes(Filters=f)["Volumes"]],
        "instances": [i["InstanceId"] for r in ec2.describe_instances(Filters=f)["Reservations"]
                      for i in r["Instances"] if i["State"]["Name"] != "terminated"],
    }


# ------------------------------------------------------------------------------ launch and end


def test_launch_uploads_the_disk_runs_adopts_and_stops(host: Ec2Host, tmp_path: Path) -> None:
    image = write_image(tmp_path / "boot.img", random_blocks(DATA_BLOCKS, seed=1))
    spec = VmSpec(machine="web1", boot_disk=image, workdir=tmp_path / "vm")
    handle = host.launch(spec)
    assert handle.host == "ec2" and handle.accel == "kvm" and handle.container_id.startswith("i-")
    assert load_handle(spec.workdir) == handle

    # The boot snapshot holds exactly the image's non-zero blocks, byte for byte.
    snap = host.boot_snapshot_id(handle)
    blocks = snapshot_blocks(host.ebs, snap)
    assert sorted(blocks) == DATA_BLOCKS
    for index, token in blocks.items():
        assert read_block(host.ebs, snap, index, token) == padded_block(image, index)
    inst = host.ec2.describe_instances(InstanceIds=[handle.container_id])["Reservations"][0]["Instances"][0]
    held = tagged(host, handle.vm_id)
    assert held["images"] == [inst["ImageId"]] and held["snapshots"] == [snap] and len(held["volumes"]) == 1
    assert host.root_volume_id(handle) == held["volumes"][0]
    assert host.status(handle) == "running" and host.is_alive(handle)
    assert "Linux version" in host.serial_log(handle)  # moto's canned console text
    assert Path(handle.serial_log).read_text() == host.serial_log(handle)
    with pytest.raises(HotspareError, match="no screenshot.*GetConsoleScreenshot"):
        host.screendump(handle, tmp_path / "screen.png")

    # Another process finds it from the work directory; a second launch adopts it.
    other = Ec2Host(host.config)
    assert other.find_running(spec.workdir) == handle
    assert other.launch(spec) == handle
    assert tagged(host, handle.vm_id)["instances"] == [handle.container_id]

    seen = []
    host.stop(handle, before_quit=lambda: seen.append(host.status(handle)))
    assert seen == ["paused"]  # the final capture runs while the instance is stopped
    assert host.status(handle) == "gone" and not host.is_alive(handle)
    assert tagged(host, handle.vm_id) == {"images": [], "snapshots": [], "volumes": [], "instances": []}
    host.stop(handle, before_quit=lambda: pytest.fail("stop of a gone VM ran before_quit"))
    assert host.find_running(spec.workdir) is None
    assert "Linux version" in host.serial_log(handle)  # from the saved copy

    again = host.launch(spec)  # the old VM is gone: a new one starts
    assert again.vm_id != handle.vm_id and host.status(again) == "running"
    host.kill(again)
    host.kill(again)
    assert host.status(again) == "gone"


def test_launch_from_a_dynamic_vhd(host: Ec2Host, tmp_path: Path) -> None:
    raw = write_image(tmp_path / "boot.img", random_blocks([1, 6], seed=2))
    vhd = tmp_path / "boot.vhd"
    with open(raw, "rb") as src, open(vhd, "wb") as out:
        write_dynamic(src, SIZE, out)
    handle = host.launch(VmSpec(machine="web2", boot_disk=vhd, format="vpc", workdir=tmp_path / "vm"))
    snap = host.boot_snapshot_id(handle)
    blocks = snapshot_blocks(host.ebs, snap)
    assert sorted(blocks) == [1, 6]
    assert all(read_block(host.ebs, snap, i, t) == padded_block(raw, i) for i, t in blocks.items())
    host.stop(handle)
    assert host.status(handle) == "gone"


def test_launch_of_a_missing_disk_creates_nothing(host: Ec2Host, tmp_path: Path) -> None:
    with pytest.raises(HotspareError, match="not found"):
        host.launch(VmSpec(machine="web1", boot_disk=tmp_path / "nope.img", workdir=tmp_path / "vm"))
    assert host.ec2.describe_images(Owners=["self"])["Images"] == []


# ------------------------------------------------------------------------------ EBS direct


def test_upload_over_a_parent_puts_only_the_changed_blocks(host: Ec2Host, tmp_path: Path) -> None:
    old = random_blocks(DATA_BLOCKS, seed=3)
    parent_img = write_image(tmp_path / "parent.img", old)
    new = {**old, **random_blocks([4, 8], seed=4)}
    new[3] = bytes(EBS_BLOCK)  # became zero: must be written, or the parent's data would show
    child_img = write_image(tmp_path / "child.img", new)
    parent = upload_snapshot(host.ebs, host.ec2, parent_img, "raw", poll_interval=0.01)
    assert parent.blocks_put == len(DATA_BLOCKS) and parent.volume_gib == 1

    changed = blocks_of_ranges([(3 * EBS_BLOCK + 512, 4096), (4 * EBS_BLOCK, EBS_BLOCK), (8 * EBS_BLOCK - 1, 1)])
    assert changed == {3, 4, 7}
    changed = (changed - {7}) | {8}
    child = upload_snapshot(host.ebs, host.ec2, child_img, "raw", parent_snapshot_id=parent.snapshot_id,
                            changed_blocks=changed, poll_interval=0.01)
    # moto ignores ParentSnapshotId (the child starts empty): the child lists what was put.
    blocks = snapshot_blocks(host.ebs, child.snapshot_id)
    assert sorted(blocks) == [3, 4, 8] and child.blocks_put == 3
    assert read_block(host.ebs, child.snapshot_id, 3, blocks[3]) == bytes(EBS_BLOCK)
    assert read_block(host.ebs, child.snapshot_id, 8, blocks[8]) == padded_block(child_img, 8)

    with pytest.raises(UsageError, match="changed_blocks"):
        upload_snapshot(host.ebs, host.ec2, child_img, "raw", parent_snapshot_id=parent.snapshot_id)
    with pytest.raises(UsageError, match="outside"):
        upload_snapshot(host.ebs, host.ec2, child_img, "raw", parent_snapshot_id=parent.snapshot_id,
                        changed_blocks=[11])


def test_a_block_whose_checksum_does_not_match_is_refused(host: Ec2Host) -> None:
    snap = host.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    data = os.urandom(EBS_BLOCK)
    # moto stores the checksum it is given without checking it: a corrupt block on a get.
    host.ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=2, BlockData=data, DataLength=EBS_BLOCK,
                                Checksum=block_checksum(b"other"), ChecksumAlgorithm="SHA256")
    host.ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=1)
    token = snapshot_blocks(host.ebs, snap)[2]
    with pytest.raises(Ec2Error, match=f"{snap} block 2.*checksum mismatch") as err:
        read_block(host.ebs, snap, 2, token)
    assert err.value.code == "ChecksumMismatch"


def test_import_snapshot_fails_clearly_where_it_is_not_implemented(host: Ec2Host) -> None:
    with pytest.raises(HotspareError, match="s3://dr-bucket/web1.vhd: ImportSnapshot failed.*not implemented"):
        host.import_snapshot("dr-bucket", "web1.vhd")


def test_config_keeps_secrets_out_of_reprs_and_dumps() -> None:
    cfg = Ec2HostConfig(region=REGION, access_key_id="AKIDEXAMPLE", secret_access_key="very-secret-value")
    host = Ec2Host(cfg)
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(host)):
        assert "very-secret-value" not in text
    assert cfg.session().get_credentials().secret_key == "very-secret-value"


# ------------------------------------------------------------------------------ delta capture


def test_delta_capture_by_listings_replays_parent_into_child(host: Ec2Host, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    old = random_blocks(DATA_BLOCKS, seed=5)
    parent_img = write_image(tmp_path / "parent.img", old)
    new = dict(old)
    new.update(random_blocks([0, 5], seed=6))  # 0 rewritten, 5 was zero
    new[3] = bytes(EBS_BLOCK)  # became zero: a null extent
    new[4] = old[4][:4096] + b"\x55" * 512 + old[4][4608:]  # one sector
    new[10] = random_blocks([10], seed=7)[10]  # the partial last block; 7 stays as it was
    child_img = write_image(tmp_path / "child.img", new)
    # moto ignores ParentSnapshotId, so both snapshots are uploaded whole; they share no
    # block token, and only reading both tells that block 7 did not change.
    parent = upload_snapshot(host.ebs, host.ec2, parent_img, "raw", poll_interval=0.01).snapshot_id
    child = upload_snapshot(host.ebs, host.ec2, child_img, "raw", poll_interval=0.01).snapshot_id

    handle = VmHandle(host="ec2", vm_id="web1-0000abcd", machine="web1", workdir=str(tmp_path),
                      boot_disk=str(parent_img), format="raw", accel="kvm",
                      serial_log=str(tmp_path / "serial.log"), container_id="i-00000000000000000")
    store = open_store(str(tmp_path / "store"))
    cap = Ec2DeltaCapture(host, handle, store, disk="root", epoch=3, method="compare-listings")
    keys = cap.ship_delta(parent, child)
    assert len(keys) == 1 and keys[0].endswith("epochs/00000000000000000003/logs/"
                                               "00000000000000000000-00000000000000000004.parquet")
    with store.open(keys[0]) as f:
        rows = [(off, ln, d.as_py()) for offs, lens, data in iter_extents(f, keys[0])
                for off, ln, d in zip(offs.tolist(), lens.tolist(), data)]
    assert [off // EBS_BLOCK for off, _, _ in rows] == [0, 3, 4, 5, 10]
    assert rows[1][2] is None and rows[-1][1] == SIZE - 10 * EBS_BLOCK
    with store.open(keys[0]) as f:
        info = validate_log(f, keys[0], machine="web1", disk="root", epoch=3, disk_size=SIZE)
    assert (info.meta.first_seq, info.meta.last_seq, info.rows) == (0, 4, 5)

    def replay(base: Path, logs: list[str], out: Path) -> bytes:
        return replay_over(store, logs, base, out).read_bytes()

    assert replay(parent_img, keys, tmp_path / "replayed.img") == child_img.read_bytes()

    # The way back, in logs of at most about 1 MiB: seqs continue the epoch's, from a new
    # capture object that reads the state file.
    monkeypatch.setattr(ec2_capture, "LOG_TARGET", 1 << 20)
    back = Ec2DeltaCapture(host, handle, store, disk="root", epoch=3, method="compare-listings")
    keys2 = back.ship_delta(child, parent)
    seqs = []
    for key in keys2:
        with store.open(key) as f:
            meta = validate_log(f, key, machine="web1", disk="root", epoch=3, disk_size=SIZE).meta
        seqs.append((meta.first_seq, meta.last_seq))
    assert seqs == [(5, 6), (7, 9)]  # blocks 0 and 3 fill the first MiB; then 4, 5 (null), 10
    assert replay(child_img, keys2, tmp_path / "back.img") == parent_img.read_bytes()
    assert replay(parent_img, keys + keys2, tmp_path / "both.img") == parent_img.read_bytes()
    assert back.ship_delta(parent, parent) == []  # nothing differs: no log

    with pytest.raises(HotspareError, match="capture state is for .* epoch 3"):
        Ec2DeltaCapture(host, handle, store, disk="root", epoch=4)


def test_a_drill_on_the_ec2_host_boots_the_point_and_releases_everything(host: Ec2Host, tmp_path: Path) -> None:
    """A drill of a machine on the ec2 host: the point becomes an EBS snapshot made from its
    chunks (no local image) and is booted as an instance, its console is read for the boot
    pattern (moto's canned console text here), and the instance, image, capture snapshots and
    volume are gone after; the point's snapshot stays, recorded, as the next one's parent."""
    from hotspare.capture.agent import Agent
    from hotspare.drill import drill
    from hotspare.ingest import ingest_disk
    from hotspare.machine import MachineConfig, Policy, parse_disk_arg, save_machine
    from hotspare.replica.consolidate import consolidate_disk
    from tests.helpers import random_image

    image = tmp_path / "disk.img"
    random_image(image, 4 << 20, seed=5, fill=0.5)
    st = open_store(str(tmp_path / "store"))
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")],
                        policy=Policy(host="ec2", drill_pattern="Linux version"))
    save_machine(st, cfg, create_only=True)
    with Agent(st, cfg, tmp_path / "agent" / "m1", tracker="scan") as agent:
        agent.cycle()
    ingest_disk(st, "m1", cfg.disks[0])
    consolidate_disk(st, "m1", cfg.disks[0], cfg.policy)
    workdir = tmp_path / "vms" / "m1-drill"
    out = drill(st, cfg, host, workdir, timeout=30)
    assert out.verdict.verdict == "verified", out.verdict
    assert out.vm_id and "Linux version" in out.console_tail
    assert tagged(host, out.vm_id) == {"images": [], "snapshots": [], "volumes": [], "instances": []}
    assert {p.suffix for p in workdir.iterdir()} <= {".jpg", ".log", ".png"}, list(workdir.iterdir())  # no image left
    [point] = out.points.values()
    rec = PointSnapshot.model_validate_json(st.get(layout.ebs_snapshot_key("m1", REGION, "root", point)))
    snap = host.ec2.describe_snapshots(SnapshotIds=[rec.snapshot_id])["Snapshots"][0]
    assert snap["State"] == "completed" and rec.blocks_put > 0
    data = image.read_bytes()
    nonzero = [i for i in range(-(-len(data) // EBS_BLOCK)) if data[i * EBS_BLOCK:(i + 1) * EBS_BLOCK].strip(b"\0")]
    assert sorted(snapshot_blocks(host.ebs, rec.snapshot_id)) == nonzero
