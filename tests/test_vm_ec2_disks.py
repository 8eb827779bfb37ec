"""A machine of several disks on the EC2 host (moto, as in test_vm_ec2.py): every disk of the
VmSpec is mapped on the instance, in the machine's order, each from its snapshot and on a
volume that covers it; release leaves nothing the launch made, and keeps the point snapshots.

moto ignores RegisterImage's block device mappings (DescribeImages shows a canned root of its
own), so the registered image's mappings are read from the request hotspare made (botocore's
event hooks, as test_vm_ebs_points.py reads the EBS calls); the instance's volumes are read
back from DescribeInstances and DescribeVolumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto")

from hotspare.capture.upload import ship_cycle  # noqa: E402
from hotspare.errors import HotspareError, UsageError  # noqa: E402
from hotspare.failover import disk_backing  # noqa: E402
from hotspare.ingest import ingest_disk  # noqa: E402
from hotspare.machine import DiskSpec, MachineConfig, Policy, save_machine  # noqa: E402
from hotspare.replica.consolidate import consolidate_disk  # noqa: E402
from hotspare.store.local import LocalStore  # noqa: E402
from hotspare.vm import VmSpec  # noqa: E402
from hotspare.vm.ec2.capture import Ec2DeltaCapture, final_capture  # noqa: E402
from hotspare.vm.ec2.ebs import EBS_BLOCK, GIB  # noqa: E402
from hotspare.vm.ec2.host import Ec2Host  # noqa: E402
from hotspare.vm.ec2.resources import TAG_MACHINE  # noqa: E402
from hotspare.vm.host import VmDisk, ebs_snapshot_of  # noqa: E402
from tests.test_vm_ebs_points import contents, rand  # noqa: E402
from tests.test_vm_ec2 import random_blocks, tagged, write_image  # noqa: E402

KIB = 1024
ROOT_SIZE = 3 * EBS_BLOCK + 128 * KIB  # 1 GiB volume
DATA_SIZE = GIB + 2 * EBS_BLOCK  # past 1 GiB: a 2 GiB volume


class RegisterCalls:
    """The BlockDeviceMappings of every RegisterImage request hotspare made."""

    def __init__(self, host: Ec2Host) -> None:
        self.mappings: list[list[dict[str, Any]]] = []
        host.ec2.meta.events.register("before-parameter-build.ec2.RegisterImage",
                                      lambda params, **_: self.mappings.append(params["BlockDeviceMappings"]))


def instance_volumes(host: Ec2Host, instance_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(device name, volume) of every EBS volume on the instance, in device order."""
    inst = host.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    ids = {m["Ebs"]["VolumeId"]: m["DeviceName"] for m in inst["BlockDeviceMappings"] if "Ebs" in m}
    vols = host.ec2.describe_volumes(VolumeIds=list(ids))["Volumes"]
    return sorted(((ids[v["VolumeId"]], v) for v in vols), key=lambda dv: (dv[0] != "/dev/xvda", dv[0]))


def two_disk_machine(tmp: Path) -> tuple[LocalStore, MachineConfig, dict[str, dict[int, bytes]]]:
    """Machine m2 with disks root and data (different sizes and bytes), one point each;
    returns the store, the machine and each disk's non-zero EBS blocks as written."""
    store = LocalStore(str(tmp / "store"))
    cfg = MachineConfig(name="m2", disks=[DiskSpec(name="root", path="/dev/null", size=ROOT_SIZE),
                                          DiskSpec(name="data", path="/dev/null", size=DATA_SIZE)],
                        policy=Policy(host="ec2"))
    save_machine(store, cfg, create_only=True)
    written = {
        "root": {0: rand(EBS_BLOCK, 1), 2: rand(EBS_BLOCK, 2)},
        # the data disk's last block lies past 1 GiB: only a 2 GiB volume holds it
        "data": {1: rand(EBS_BLOCK, 3), DATA_SIZE // EBS_BLOCK - 1: rand(EBS_BLOCK, 4)},
    }
    for disk in cfg.disks:
        extents = [(i * EBS_BLOCK, EBS_BLOCK, data) for i, data in written[disk.name].items()]
        ship_cycle(store, extents, machine="m2", disk=disk.name, epoch=0, disk_size=disk.size, last_seq=-1,
                   workdir=tmp, consistent=True)
        ingest_disk(store, "m2", disk)
        consolidate_disk(store, "m2", disk, cfg.policy)
    return store, cfg, written


def test_failover_of_two_disks_maps_both_in_order_and_release_keeps_the_points(ec2_host: Ec2Host,
                                                                               tmp_path: Path) -> None:
    host = ec2_host
    store, cfg, written = two_disk_machine(tmp_path)
    workdir = tmp_path / "vm"
    # As the failover and the drill make each disk: the point's EBS snapshot, from its chunks.
    disks = [disk_backing(store, "m2", d, workdir, host=host)[1] for d in cfg.disks]
    snaps = [ebs_snapshot_of(d.backing) for d in disks]
    assert None not in snaps and len(set(snaps)) == 2
    for name, sid in zip(["root", "data"], snaps):
        assert contents(host, sid) == written[name]  # different bytes on each disk

    registered = RegisterCalls(host)
    spec = VmSpec(machine="m2", disks=disks, workdir=workdir)
    handle = host.launch(spec)
    assert Ec2Host(host.config).launch(spec) == handle  # a re-run adopts the VM of both disks
    with pytest.raises(HotspareError, match="already runs there from"):  # not one of the root alone
        host.launch(VmSpec(machine="m2", disks=disks[:1], workdir=workdir))

    # The image: the root from the first disk's snapshot, the data disk next, each sized to hold its disk.
    [mappings] = registered.mappings
    assert [(m["DeviceName"], m["Ebs"]["SnapshotId"]) for m in mappings] == [("/dev/xvda", snaps[0]),
                                                                            ("/dev/sdf", snaps[1])]
    assert [m["Ebs"]["VolumeSize"] for m in mappings] == [1, 2]
    # The instance: one volume per disk, the data disk's made from its snapshot, none too small.
    vols = instance_volumes(host, handle.container_id)
    assert [dev for dev, _ in vols] == ["/dev/xvda", "/dev/sdf"]
    for (_, vol), disk in zip(vols, cfg.disks):
        assert vol["Size"] * GIB >= disk.size
    assert [v["Size"] for _, v in vols] == [1, 2] and vols[1][1]["SnapshotId"] == snaps[1]
    assert host.disk_volume_id(handle, "data") == vols[1][1]["VolumeId"]
    assert host.root_volume_id(handle) == vols[0][1]["VolumeId"]
    held = tagged(host, handle.vm_id)
    assert sorted(held["volumes"]) == sorted(v["VolumeId"] for _, v in vols)

    # Each disk is captured on its own, sized from the launch; ending the VM with a disk left
    # out is refused (its last writes would be lost) and leaves the VM running.
    caps = [Ec2DeltaCapture(host, handle, store, disk=d.name, epoch=1, method="compare-listings") for d in cfg.disks]
    assert [c.state.disk_size for c in caps] == [ROOT_SIZE, DATA_SIZE]
    with pytest.raises(UsageError, match=r"final capture of VM m2-\w+ \(m2\) misses disk\(s\) data"):
        final_capture(caps[:1])
    assert host.status(handle) == "running"

    image_id = held["images"][0]
    host.stop(handle)
    assert tagged(host, handle.vm_id) == {"images": [], "snapshots": [], "volumes": [], "instances": []}
    assert host.ec2.describe_images(Filters=[{"Name": "image-id", "Values": [image_id]}])["Images"] == []
    left = host.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [v["VolumeId"] for _, v in vols]}])
    assert left["Volumes"] == []
    inst = host.ec2.describe_instances(InstanceIds=[handle.container_id])["Reservations"][0]["Instances"][0]
    assert inst["State"]["Name"] == "terminated"
    # The point snapshots stay, whole: the next points' parents.
    kept = host.ec2.describe_snapshots(SnapshotIds=snaps)["Snapshots"]
    assert sorted(s["SnapshotId"] for s in kept) == sorted(snaps) and {s["State"] for s in kept} == {"completed"}
    assert [contents(host, sid) for sid in snaps] == [written["root"], written["data"]]


def test_two_local_images_are_uploaded_each_and_released(ec2_host: Ec2Host, tmp_path: Path) -> None:
    host = ec2_host
    boot = write_image(tmp_path / "boot.img", random_blocks([0, 3], seed=11))
    data_blocks = random_blocks([1, 5], seed=12)
    data = write_image(tmp_path / "data.img", data_blocks, size=8 * EBS_BLOCK)
    spec = VmSpec(machine="web3", workdir=tmp_path / "vm",
                  disks=[VmDisk(name="root", backing=str(boot)), VmDisk(name="data", backing=str(data))])
    registered = RegisterCalls(host)
    handle = host.launch(spec)
    [mappings] = registered.mappings
    assert [m["DeviceName"] for m in mappings] == ["/dev/xvda", "/dev/sdf"]
    root_snap, data_snap = (m["Ebs"]["SnapshotId"] for m in mappings)
    assert (host.boot_snapshot_id(handle, "root"), host.boot_snapshot_id(handle, "data")) == (root_snap, data_snap)
    assert contents(host, data_snap) == data_blocks
    assert sorted(contents(host, root_snap)) == [0, 3]
    assert [dev for dev, _ in instance_volumes(host, handle.container_id)] == ["/dev/xvda", "/dev/sdf"]
    held = tagged(host, handle.vm_id)
    assert sorted(held["snapshots"]) == sorted([root_snap, data_snap]) and len(held["volumes"]) == 2

    host.kill(handle)  # a killed VM keeps its volumes (for an offline capture) until release
    assert len(tagged(host, handle.vm_id)["volumes"]) == 2
    host.release(handle, wait=10)
    assert tagged(host, handle.vm_id) == {"images": [], "snapshots": [], "volumes": [], "instances": []}


def test_more_disks_than_device_names_are_refused_before_anything_is_made(ec2_host: Ec2Host,
                                                                          tmp_path: Path) -> None:
    img = write_image(tmp_path / "d.img", {}, size=EBS_BLOCK)
    spec = VmSpec(machine="big", workdir=tmp_path / "vm",
                  disks=[VmDisk(name=f"d{i}", backing=str(img)) for i in range(23)])
    with pytest.raises(HotspareError, match=r"cannot launch VM of big on EC2: it has 23 disks, .* at most 22"):
        ec2_host.launch(spec)
    mine = [{"Name": f"tag:{TAG_MACHINE}", "Values": ["big"]}]
    assert ec2_host.ec2.describe_snapshots(OwnerIds=["self"], Filters=mine)["Snapshots"] == []
    assert ec2_host.ec2.describe_images(Owners=["self"])["Images"] == []
    assert not (tmp_path / "vm" / "handle.json").exists()
