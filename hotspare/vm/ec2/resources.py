"""The AWS resources of one EC2 launch: made, found by tag, released.

Every resource a launch makes (disk snapshots of local images, image, instance, one volume
per disk, capture snapshots) carries the tag ``hotspare:vm-id`` = the VM id, minted before the first of
them, so that whatever a crashed launch or stop left behind is found again by that tag alone.
A point's snapshot is not the launch's: it carries no VM id, and :func:`release` leaves it.

Terms:
- disk snapshot: a replica disk as an EBS snapshot, one per disk of the machine (the first,
  the boot disk, is the image's root). Of a recovery point, the point's own snapshot
  (:mod:`hotspare.vm.ec2.ebs_points`, role ``point``), which carries no VM id and outlives the
  VM; of a local image, one made for the launch (role ``boot``, tagged with its disk) by
  the EBS direct APIs (:mod:`hotspare.vm.ec2.ebs`) or by EC2 VM Import (:func:`import_snapshot`,
  from a disk image in S3);
- image: the AMI registered on the disk snapshots (:func:`register_image`): root
  :data:`ROOT_DEVICE`, the other disks at :data:`DATA_DEVICES` in the machine's order;
- kept volumes: the instance's volumes, one per disk, created with ``DeleteOnTermination``
  false so that they outlive the instance until :func:`release`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal

from hotspare.errors import HotspareError
from hotspare.vm.ec2.aws import Ec2Error, aws_call, poll
from hotspare.vm.ec2.ebs import volume_gib
from hotspare.vm.host import EbsDisk

log = logging.getLogger(__name__)

ROOT_DEVICE = "/dev/xvda"
# The other disks, in the machine's order: the names AWS's "Device names for volumes on
# Amazon EC2 instances" recommends for EBS volumes on Linux HVM instances (Xen and Nitro),
# /dev/sd[f-z]. On Nitro the guest sees NVMe devices whatever the name (it is kept in the
# controller's vendor data, where ebsnvme-id/udev rules find it), so the guest should mount
# by UUID or label, as a machine with several disks usually does.
DATA_DEVICES = tuple(f"/dev/sd{c}" for c in "fghijklmnopqrstuvwxyz")
TAG_VM = "hotspare:vm-id"
TAG_MACHINE = "hotspare:machine"
TAG_ROLE = "hotspare:role"  # boot (the launch snapshot), capture, or point (see hotspare.vm.ec2.ebs_points)
TAG_DISK = "hotspare:disk"
TAG_POINT = "hotspare:point"


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def device_names(machine: str, count: int) -> list[str]:
    """The block device names of a machine's ``count`` disks, root first."""
    if count > 1 + len(DATA_DEVICES):
        raise HotspareError(f"cannot launch VM of {machine} on EC2: it has {count} disks, the EC2 host maps at most "
                            f"{1 + len(DATA_DEVICES)} ({ROOT_DEVICE}, {DATA_DEVICES[0]}-{DATA_DEVICES[-1]}); "
                            "fail it over on a QEMU host")
    return [ROOT_DEVICE, *DATA_DEVICES][:count]


def block_device_mappings(disks: list[EbsDisk], *, volume_type: str, root_snapshot: bool = True) -> list[dict[str, Any]]:
    """Every disk's mapping, in the machine's order: a volume from its snapshot, of the whole
    GiB that hold the disk, kept past the instance (``DeleteOnTermination`` false: the
    capture can still read a dead instance's writes; :func:`release` deletes it).
    ``root_snapshot`` False leaves the root's snapshot out, for RunInstances: the image
    fixes the root's snapshot, a launch only sizes it."""
    out = []
    for d in disks:
        ebs: dict[str, Any] = {"VolumeSize": volume_gib(d.size), "VolumeType": volume_type, "DeleteOnTermination": False}
        if root_snapshot or d.device != ROOT_DEVICE:
            ebs["SnapshotId"] = d.snapshot_id
        out.append({"DeviceName": d.device, "Ebs": ebs})
    return out


def _by_vm(vm_id: str) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{TAG_VM}", "Values": [vm_id]}]


def import_snapshot(ec2: Any, bucket: str, key: str, *, fmt: Literal["VHD", "RAW"] = "VHD",
                    description: str = "", tags: dict[str, str] | None = None, role_name: str | None = None,
                    timeout: float = 7200.0, interval: float = 5.0) -> str:
    """An EBS snapshot of the disk image at ``s3://bucket/key`` by EC2 VM Import
    (``ImportSnapshot``, which reads the object with the ``vmimport`` role, or
    ``role_name``); waits for the import task and returns the snapshot id. A task that
    fails or times out is reported with AWS's status message (and cancelled on timeout)."""
    where = f"s3://{bucket}/{key}"
    args: dict[str, Any] = dict(Description=description, DiskContainer={
        "Description": description, "Format": fmt, "UserBucket": {"S3Bucket": bucket, "S3Key": key}})
    if role_name:
        args["RoleName"] = role_name
    with aws_call("ImportSnapshot", where):
        task_id = ec2.import_snapshot(**args)["ImportTaskId"]
    log.info("import task %s converts %s", task_id, where)

    def probe() -> str | None:
        with aws_call("DescribeImportSnapshotTasks", task_id):
            tasks = ec2.describe_import_snapshot_tasks(ImportTaskIds=[task_id])["ImportSnapshotTasks"]
        detail = tasks[0].get("SnapshotTaskDetail", {}) if tasks else {}
        status = detail.get("Status", "missing")
        if status == "completed":
            return str(detail["SnapshotId"])
        if status in ("deleting", "deleted", "missing"):
            # e.g. "ClientError: Disk validation failed", or the role cannot read the object
            raise Ec2Error("ImportSnapshot", f"{where} (task {task_id})",
                           f"import task {status}: {detail.get('StatusMessage') or 'no message'}",
                           code="ImportFailed")
        return None

    try:
        snapshot_id = poll(f"import task {task_id} of {where}", probe, timeout=timeout, interval=interval)
    except Ec2Error:
        raise
    except HotspareError:
        try:
            with aws_call("CancelImportTask", task_id):
                ec2.cancel_import_task(ImportTaskId=task_id)
        except Ec2Error as err:
            log.warning("import task %s not cancelled: %s", task_id, err)
        raise
    if tags:  # an import task's own tags do not pass to the snapshot it makes
        with aws_call("CreateTags", snapshot_id):
            ec2.create_tags(Resources=[snapshot_id], Tags=tag_list(tags))
    return snapshot_id


def import_local_image(s3: Any, ec2: Any, path: str | os.PathLike[str], fmt: Literal["VHD", "RAW"], *,
                       bucket: str, key: str, **import_args: Any) -> str:
    """:func:`import_snapshot` of a local image, staged at ``s3://bucket/key`` for the
    import's duration (VM Import reads only from S3)."""
    where = f"s3://{bucket}/{key}"
    with aws_call("PutObject", where):
        s3.upload_file(os.fspath(path), bucket, key)  # multipart, in parallel, for large images
    try:
        return import_snapshot(ec2, bucket, key, fmt=fmt, **import_args)
    finally:
        try:
            with aws_call("DeleteObject", where):
                s3.delete_object(Bucket=bucket, Key=key)
        except Ec2Error as err:
            log.warning("staged image not deleted: %s", err)


def register_image(ec2: Any, disks: list[EbsDisk], *, name: str, description: str, tags: dict[str, str],
                   boot_mode: str = "legacy-bios", ena_support: bool = True, volume_type: str = "gp3",
                   timeout: float = 3600.0, interval: float = 5.0) -> str:
    """An available x86_64 HVM image of every disk in ``disks`` (their device names given):
    the first is the root device (``/dev/xvda``), each volume is made from the disk's
    snapshot (:func:`block_device_mappings`), and survives its instance, so that a dead
    instance's last writes can still be captured."""
    if not disks or disks[0].device != ROOT_DEVICE:
        raise HotspareError(f"image {name}: the first disk must be the root device {ROOT_DEVICE}")
    tagl = tag_list(tags)
    with aws_call("RegisterImage", ", ".join(d.snapshot_id for d in disks)):
        image_id = str(ec2.register_image(
            Name=name, Description=description, Architecture="x86_64", VirtualizationType="hvm",
            BootMode=boot_mode, EnaSupport=ena_support, RootDeviceName=ROOT_DEVICE,
            BlockDeviceMappings=block_device_mappings(disks, volume_type=volume_type),
            TagSpecifications=[{"ResourceType": "image", "Tags": tagl}])["ImageId"])
    # Tagged again: some endpoints (moto) ignore RegisterImage's TagSpecifications, and an
    # untagged image would never be released.
    with aws_call("CreateTags", image_id):
        ec2.create_tags(Resources=[image_id], Tags=tagl)

    def available() -> bool | None:
        with aws_call("DescribeImages", image_id):
            image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
        if image["State"] in ("failed", "error", "invalid", "deregistered"):
            raise Ec2Error("RegisterImage", image_id, f"image state {image['State']}: "
                           f"{image.get('StateReason', {}).get('Message', '')}", code="ImageFailed")
        return True if image["State"] == "available" else None

    poll(f"image {image_id}", available, timeout=timeout, interval=interval)
    return image_id


def boot_snapshot_id(ec2: Any, vm_id: str, disk: str | None = None) -> str:
    """The snapshot VM ``vm_id``'s launch made of ``disk`` (None: any, for a VM of one disk
    launched before the snapshots were tagged with their disk)."""
    filters = [*_by_vm(vm_id), {"Name": f"tag:{TAG_ROLE}", "Values": ["boot"]}]
    if disk is not None:
        filters.append({"Name": f"tag:{TAG_DISK}", "Values": [disk]})
    with aws_call("DescribeSnapshots", f"launch snapshot of VM {vm_id}"):
        snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
    if not snaps:
        raise HotspareError(f"VM {vm_id}: no launch snapshot tagged {TAG_VM}={vm_id}"
                            f"{f' {TAG_DISK}={disk}' if disk else ''} (released already?)")
    return str(snaps[0]["SnapshotId"])


def volumes(ec2: Any, vm_id: str) -> list[dict[str, Any]]:
    """The VM's volumes that still exist (one per disk, attached or kept)."""
    with aws_call("DescribeVolumes", f"volumes tagged {TAG_VM}={vm_id}"):
        vols = ec2.describe_volumes(Filters=_by_vm(vm_id))["Volumes"]
    return [v for v in vols if v["State"] not in ("deleting", "deleted")]


def release(ec2: Any, vm_id: str, *, timeout: float = 0.0, interval: float = 5.0) -> None:
    """Delete what VM ``vm_id``'s launch made: images, snapshots, and its volumes once
    detached (waiting up to ``timeout`` for a terminated instance's volume to detach; one
    still attached then is an error, so that the caller retries). Idempotent."""
    with aws_call("DescribeImages", f"images tagged {TAG_VM}={vm_id}"):
        images = ec2.describe_images(Owners=["self"], Filters=_by_vm(vm_id))["Images"]
    for image in images:  # first: a registered image holds its snapshot
        _ignore_missing("DeregisterImage", image["ImageId"], lambda i=image["ImageId"]: ec2.deregister_image(ImageId=i))
    with aws_call("DescribeSnapshots", f"snapshots tagged {TAG_VM}={vm_id}"):
        snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=_by_vm(vm_id))["Snapshots"]
    for snap in snapshots:
        _ignore_missing("DeleteSnapshot", snap["SnapshotId"],
                        lambda s=snap["SnapshotId"]: ec2.delete_snapshot(SnapshotId=s))

    def detached() -> list[dict[str, Any]] | None:
        vols = volumes(ec2, vm_id)
        return vols if all(v["State"] == "available" for v in vols) else None

    vols = volumes(ec2, vm_id)
    if timeout > 0 and any(v["State"] != "available" for v in vols):
        vols = poll(f"volumes of VM {vm_id} to detach", detached, timeout=timeout, interval=interval)
    for vol in vols:
        if vol["State"] != "available":
            raise HotspareError(f"VM {vm_id}: volume {vol['VolumeId']} is still {vol['State']}, not deleted")
        _ignore_missing("DeleteVolume", vol["VolumeId"], lambda v=vol["VolumeId"]: ec2.delete_volume(VolumeId=v))


def _ignore_missing(op: str, resource: str, call: Callable[[], object]) -> None:
    try:
        with aws_call(op, resource):
            call()
    except Ec2Error as err:
        if not err.not_found:
            raise
