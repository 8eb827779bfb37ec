"""Ec2Host: the stand-in VM as an EC2 instance booted from the replica's disks.

Launch, in order, every AWS resource tagged ``hotspare:vm-id`` (and ``hotspare:machine``):

1. disk snapshots: every replica disk of the VmSpec as an EBS snapshot, in the machine's
   order. A failover or drill gives each disk's point's own snapshot (``ebs-snapshot://``
   backing, made by :meth:`Ec2Host.point_disk` before the launch): nothing is uploaded
   here. A local image is uploaded one of two ways (``Ec2HostConfig.disk_source``):
   - ``ebs-direct``: block by block through the EBS direct APIs
     (:func:`hotspare.vm.ec2.ebs.upload_snapshot`), zero blocks skipped;
   - ``import-snapshot``: the image staged in S3 (``import_bucket``/``import_prefix``) and
     converted by EC2 VM Import (``ImportSnapshot``, needs the ``vmimport`` service role),
     or :meth:`Ec2Host.import_snapshot` of a VHD already in S3;
2. image: ``RegisterImage`` of every disk (hvm, legacy BIOS): the first disk's snapshot is
   the root ``/dev/xvda``, the others further block device mappings ``/dev/sdf``,
   ``/dev/sdg``, ... (:data:`hotspare.vm.ec2.resources.DATA_DEVICES`), each volume of the
   whole GiB that hold its disk;
3. instance: ``RunInstances`` of one instance, its ``ClientToken`` derived from the VM id,
   so a retried call never starts a second one; it gets one volume per disk.

The handle is saved (``<workdir>/handle.json``) before step 1, with ``container_id`` empty,
again with every disk's snapshot and device (``ebs_disks``), and once the instance exists.
Why the instance id goes in ``container_id`` and not in ``vm_id``: ``vm_id`` is hotspare's
own name for the launch (``<machine>-<8 hex>``), minted before any AWS resource exists and
written on all of them as a tag, so a launch that crashed half-way is found (and cleaned
up, or adopted) by its tag; the instance id is the provider's id of what runs the VM, which
is what ``container_id`` holds for Docker.

Points on EBS (:meth:`Ec2Host.point_disk`, ``disk_source`` ``ebs-direct``): a point's
snapshot is made straight from its chunks, over the snapshot of an older point of the disk
when one is recorded in the store (only the blocks that differ are put), and recorded for
the next; see :mod:`hotspare.vm.ec2.ebs_points`. It carries no VM id: a VM's release leaves it.

Ending: :meth:`Ec2Host.stop` stops the instance (its disks then no longer change), runs the
final capture, terminates it and releases everything tagged with the VM id (image,
snapshots, every disk's volume). The volumes are kept when an instance ends otherwise
(``DeleteOnTermination`` false), so that the writes of a killed or crashed instance can still
be captured offline (:mod:`hotspare.vm.ec2.capture`); a later ``stop`` of the gone VM, or
:meth:`Ec2Host.release`, deletes them (by their tag, which every volume of the launch has).
Point snapshots are never released: they are the next point's parent.

What is tested where: see README "EC2 host: what is tested and what is not".
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3

from hotspare.errors import HotspareError, UsageError
from hotspare.localfile import file_lock
from hotspare.vm.ec2 import resources
from hotspare.vm.ec2.aws import CLIENT_CONFIG, Ec2Error, aws_call, poll
from hotspare.vm.ec2.config import Ec2HostConfig  # re-exported: the host and its config go together
from hotspare.vm.ec2.ebs import GIB, image_size, upload_snapshot
from hotspare.vm.ec2.ebs_points import point_snapshot
from hotspare.vm.ec2.resources import ROOT_DEVICE, TAG_DISK, TAG_MACHINE, TAG_ROLE, TAG_VM, tag_list
from hotspare.vm.host import (
    EBS_SNAPSHOT_PREFIX,
    EbsDisk,
    VmDisk,
    VmHandle,
    VmHost,
    VmSpec,
    ebs_snapshot_of,
    load_handle,
    save_handle,
)

if TYPE_CHECKING:
    from hotspare.catalog import Catalog, RecoveryPoint
    from hotspare.machine import DiskSpec
    from hotspare.store.base import Store

log = logging.getLogger(__name__)

# EC2 instance states, as the VmHost interface names them. pending counts as running (the
# guest is booting, as a QEMU VM is from its start); a stopped instance keeps its disk and
# can run again, like a paused QEMU.
STATUS = {"pending": "running", "running": "running", "stopping": "paused", "stopped": "paused",
          "shutting-down": "gone", "terminated": "gone"}
ALIVE = {"pending", "running", "stopping", "stopped"}


class Ec2Host(VmHost):
    kind = "ec2"

    def __init__(self, config: Ec2HostConfig, session: boto3.Session | None = None) -> None:
        self.config = config
        self._session = session
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows credentials
        return f"Ec2Host(region={self.config.region!r}, instance_type={self.config.instance_type!r})"

    # Clients are made on first use: boto3 sessions are not thread-safe to build clients
    # from concurrently, and a host object made before the credentials exist still works.
    def _client(self, service: str) -> Any:
        with self._lock:
            if self._session is None:
                self._session = self.config.session()
            return self._session.client(service, region_name=self.config.region,
                                        endpoint_url=self.config.endpoint_url if service != "s3" else None,
                                        config=CLIENT_CONFIG)

    @cached_property
    def ec2(self) -> Any:
        return self._client("ec2")

    @cached_property
    def ebs(self) -> Any:
        return self._client("ebs")

    def resource_tags(self, machine: str, vm_id: str, **extra: str) -> dict[str, str]:
        return {**self.config.tags, "Name": f"hotspare {machine}", TAG_MACHINE: machine, TAG_VM: vm_id, **extra}

    # -- launch --------------------------------------------------------------------------
    def launch(self, spec: VmSpec) -> VmHandle:
        workdir = spec.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with file_lock(workdir / "launch.lock"):
            boot = spec.disks[0].backing  # not spec.boot_disk: a Path would mangle ebs-snapshot://
            backings = [d.backing for d in spec.disks]
            devices = resources.device_names(spec.machine, len(spec.disks))  # refuses before any resource
            previous = load_handle(workdir)
            if previous is not None and previous.host == self.kind:
                inst = self._instance(previous)
                if inst is not None and inst["State"]["Name"] in ALIVE:
                    # A handle from before every disk was recorded names its boot disk only.
                    ran = [d.backing for d in previous.ebs_disks] or [previous.boot_disk]
                    if ran != backings:
                        raise HotspareError(f"{workdir}: VM {previous.vm_id} already runs there from "
                                            f"{', '.join(ran)}, not {', '.join(backings)}")
                    if previous.container_id != inst["InstanceId"]:  # launch crashed before saving it
                        previous.container_id = inst["InstanceId"]
                        save_handle(previous)
                    return previous  # adopt it: a re-run must not boot a second copy of the machine
                kept = resources.volumes(self.ec2, previous.vm_id)
                if kept and (previous.container_id or inst is not None):  # it ran: its disk holds writes
                    raise HotspareError(f"{workdir}: VM {previous.vm_id} ended without a final capture and its "
                                        f"volumes {', '.join(v['VolumeId'] for v in kept)} are kept: ship its last "
                                        "writes (hotspare.vm.ec2.capture.final_capture) or drop them (Ec2Host.stop), then launch")
                self.release(previous, wait=self.config.boot_timeout)  # left by a launch that failed there
            for d in spec.disks:
                if ebs_snapshot_of(d.backing) is None and not Path(d.backing).is_file():
                    raise HotspareError(f"cannot launch VM of {spec.machine}: disk {d.name} image {d.backing} not found")
            vm_id = f"{spec.machine}-{uuid.uuid4().hex[:8]}"
            # accel: EC2 runs the guest with hardware virtualisation (Nitro or Xen HVM),
            # never emulation; the handle field is required, and "kvm" is the closest value.
            handle = VmHandle(host=self.kind, vm_id=vm_id, machine=spec.machine, workdir=str(workdir),
                              boot_disk=boot, format=spec.format, accel="kvm",
                              serial_log=str(workdir / f"serial-{vm_id}.log"), disk_device=ROOT_DEVICE)
            save_handle(handle)  # before any resource exists: their tag leads back to it
            try:
                handle.ebs_disks = [self._disk_snapshot(spec, d, vm_id, device) for d, device in zip(spec.disks, devices)]
                save_handle(handle)  # the capture finds each disk's first base here
                image_id = resources.register_image(
                    self.ec2, handle.ebs_disks, name=f"hotspare-{vm_id}",
                    description=f"hotspare stand-in for {spec.machine}",
                    tags=self.resource_tags(spec.machine, vm_id), boot_mode=self.config.boot_mode,
                    ena_support=self.config.ena_support, volume_type=self.config.volume_type,
                    timeout=self.config.snapshot_timeout, interval=self.config.poll_interval)
                handle.container_id = self._run_instance(spec.machine, vm_id, image_id, handle.ebs_disks)
                save_handle(handle)
                self._wait_running(handle)
            except BaseException:
                try:
                    self.kill(handle)
                    self.release(handle, wait=self.config.boot_timeout)
                except HotspareError as err:  # tagged: the next launch there releases it
                    log.warning("VM %s: cleanup after a failed launch failed too: %s", vm_id, err)
                raise
            log.info("VM %s runs as instance %s (image %s, disks %s)", vm_id, handle.container_id, image_id,
                     ", ".join(f"{d.name}={d.snapshot_id} at {d.device}" for d in handle.ebs_disks))
            return handle

    def _disk_snapshot(self, spec: VmSpec, disk: VmDisk, vm_id: str, device: str) -> EbsDisk:
        """The snapshot ``disk`` is launched from: its point's, or one uploaded now."""
        ready = ebs_snapshot_of(disk.backing)
        if ready is not None:  # a point's snapshot: made before the launch, and not the launch's to release
            size = disk.size or self._snapshot_gib(ready) * GIB
            return EbsDisk(name=disk.name, backing=disk.backing, snapshot_id=ready, device=device, size=size)
        cfg = self.config
        fmt = disk.backing_format
        size = disk.size or image_size(disk.backing, fmt)
        tags = self.resource_tags(spec.machine, vm_id, **{TAG_ROLE: "boot", TAG_DISK: disk.name})
        description = f"hotspare disk {disk.name} of {spec.machine} ({vm_id})"
        if cfg.disk_source == "ebs-direct":
            sid = upload_snapshot(self.ebs, self.ec2, disk.backing, fmt, tags=tags, description=description,
                                  workers=cfg.upload_workers, timeout=cfg.snapshot_timeout,
                                  poll_interval=cfg.poll_interval).snapshot_id
        else:
            if not cfg.import_bucket:
                raise UsageError(f"cannot launch VM of {spec.machine}: disk_source import-snapshot needs "
                                 "import_bucket (the S3 bucket VM Import reads)")
            ext = "vhd" if fmt == "vpc" else "raw"
            sid = resources.import_local_image(  # one import per disk, each under its own key
                self._client("s3"), self.ec2, disk.backing, "VHD" if fmt == "vpc" else "RAW",
                bucket=cfg.import_bucket, key=f"{cfg.import_prefix}{vm_id}-{disk.name}.{ext}",
                description=description, tags=tags, role_name=cfg.import_role_name, timeout=cfg.import_timeout,
                interval=cfg.poll_interval)
        return EbsDisk(name=disk.name, backing=disk.backing, snapshot_id=sid, device=device, size=size)

    def _snapshot_gib(self, snapshot_id: str) -> int:
        with aws_call("DescribeSnapshots", snapshot_id):
            return int(self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["VolumeSize"])

    def point_disk(self, store: Store, catalog: Catalog, disk: DiskSpec, point: RecoveryPoint,
                   workdir: Path) -> VmDisk:
        """The VM disk of ``point``: with ``disk_source`` ``ebs-direct``, the point's EBS
        snapshot, made from its chunks (over an older point's snapshot when there is one)
        or found already made; with ``import-snapshot``, which converts an image VM Import
        reads from S3, the point exported as a local raw image in ``workdir``."""
        cfg = self.config
        if cfg.disk_source == "import-snapshot":
            from hotspare.consolidate.export import export_point

            workdir.mkdir(parents=True, exist_ok=True)
            image = workdir / f"{disk.name}-{point.id}.raw"
            if not image.exists():  # export_point publishes by rename: an existing file is whole
                export_point(store, catalog, point, "raw", image)
            return VmDisk(name=disk.name, backing=str(image), size=disk.size, block_size=disk.block_size)
        rec = point_snapshot(self.ebs, self.ec2, store, catalog, point, region=cfg.region, tags=cfg.tags,
                             workers=cfg.upload_workers, timeout=cfg.snapshot_timeout, poll_interval=cfg.poll_interval)
        return VmDisk(name=disk.name, backing=f"{EBS_SNAPSHOT_PREFIX}{rec.snapshot_id}", size=disk.size,
                      block_size=disk.block_size)

    def import_snapshot(self, bucket: str, key: str, *, fmt: Literal["VHD", "RAW"] = "VHD",
                        description: str = "", tags: dict[str, str] | None = None) -> str:
        """An EBS snapshot of the disk image at ``s3://bucket/key`` by EC2 VM Import, for a
        VHD already in S3 (a consolidated replica, say); returns its id once completed."""
        cfg = self.config
        return resources.import_snapshot(self.ec2, bucket, key, fmt=fmt, description=description, tags=tags,
                                             role_name=cfg.import_role_name, timeout=cfg.import_timeout,
                                             interval=cfg.poll_interval)

    def _run_instance(self, machine: str, vm_id: str, image_id: str, disks: list[EbsDisk]) -> str:
        cfg = self.config
        tags = tag_list(self.resource_tags(machine, vm_id))
        args: dict[str, Any] = dict(
            ImageId=image_id, InstanceType=cfg.instance_type, MinCount=1, MaxCount=1,
            # The image's mappings again: EC2 takes them from the image anyway, but an
            # endpoint that ignores an image's mappings (moto) then still attaches every disk.
            BlockDeviceMappings=resources.block_device_mappings(disks, volume_type=cfg.volume_type,
                                                                    root_snapshot=False),
            ClientToken=hashlib.sha256(vm_id.encode()).hexdigest()[:32],  # at most 64 characters
            # Volume tags go on every volume the launch creates, one per disk: release finds them so.
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags},
                               {"ResourceType": "volume", "Tags": tags}])
        if cfg.subnet_id:
            args["SubnetId"] = cfg.subnet_id
        if cfg.security_group_ids:
            args["SecurityGroupIds"] = cfg.security_group_ids
        with aws_call("RunInstances", image_id):
            return str(self.ec2.run_instances(**args)["Instances"][0]["InstanceId"])

    def _wait_running(self, handle: VmHandle) -> None:
        def probe() -> bool | None:
            inst = self._instance(handle)
            state = inst["State"]["Name"] if inst else "missing"
            if state in ("shutting-down", "terminated", "missing"):
                reason = (inst or {}).get("StateReason", {}).get("Message", "")
                raise HotspareError(f"VM {handle.vm_id}: instance {handle.container_id} is {state} "
                                    f"instead of running {reason}".rstrip())
            return True if state == "running" else None

        poll(f"VM {handle.vm_id}: instance {handle.container_id} start", probe,
             timeout=self.config.boot_timeout, interval=self.config.poll_interval)

    # -- finding and watching ------------------------------------------------------------
    def _instance(self, handle: VmHandle) -> dict[str, Any] | None:
        """The instance as DescribeInstances shows it, or None when EC2 no longer knows it.
        Without an instance id in the handle (a launch that crashed before saving it), the
        newest instance tagged with the VM id."""
        if handle.container_id:
            try:
                with aws_call("DescribeInstances", handle.container_id):
                    r = self.ec2.describe_instances(InstanceIds=[handle.container_id])
            except Ec2Error as err:
                if err.not_found:  # terminated long ago
                    return None
                raise
        else:
            with aws_call("DescribeInstances", f"instances tagged {TAG_VM}={handle.vm_id}"):
                r = self.ec2.describe_instances(Filters=[{"Name": f"tag:{TAG_VM}", "Values": [handle.vm_id]}])
        found = [i for res in r["Reservations"] for i in res["Instances"]]
        found.sort(key=lambda i: (i["State"]["Name"] in ALIVE, i.get("LaunchTime") or 0))
        return found[-1] if found else None

    def find_running(self, workdir: str | os.PathLike[str]) -> VmHandle | None:
        handle = load_handle(workdir)
        if handle is None or handle.host != self.kind:
            return None
        inst = self._instance(handle)
        if inst is None or inst["State"]["Name"] not in ALIVE:
            return None
        return handle.model_copy(update={"container_id": inst["InstanceId"]})

    def is_alive(self, handle: VmHandle) -> bool:
        inst = self._instance(handle)
        return inst is not None and inst["State"]["Name"] in ALIVE

    def status(self, handle: VmHandle) -> str:
        inst = self._instance(handle)
        return STATUS.get(inst["State"]["Name"], inst["State"]["Name"]) if inst else "gone"

    def serial_log(self, handle: VmHandle) -> str:
        """The instance's console output as EC2 keeps it (its last 64 KiB), also saved to
        ``handle.serial_log`` so that it stays readable after the instance is gone."""
        cache = Path(handle.serial_log)
        inst = self._instance(handle)
        if inst is not None and inst["State"]["Name"] != "terminated":
            iid = inst["InstanceId"]
            try:
                with aws_call("GetConsoleOutput", iid):
                    out = self.ec2.get_console_output(InstanceId=iid, Latest=True).get("Output")
            except Ec2Error as err:
                if err.code not in ("UnsupportedOperation", "InvalidParameterValue", "InvalidParameter"):
                    raise
                with aws_call("GetConsoleOutput", iid):  # Latest is for Nitro instances only
                    out = self.ec2.get_console_output(InstanceId=iid).get("Output")
            text = out or ""  # botocore has base64-decoded it (handler decode_console_output)
            if text:
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, cache)
                return text
        try:
            return cache.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def screendump(self, handle: VmHandle, path: str | os.PathLike[str]) -> Path:
        """EC2's console screenshot. EC2 sends a JPEG: saved as is, under ``path`` with the
        suffix ``.jpg`` (returned), since turning it into a PNG needs an image library
        hotspare does not carry. A PNG, should EC2 send one, is saved at ``path``."""
        inst = self._instance(handle)
        if inst is None or inst["State"]["Name"] not in ALIVE:
            raise HotspareError(f"VM {handle.vm_id}: no screenshot, its instance is gone")
        iid = inst["InstanceId"]
        try:
            with aws_call("GetConsoleScreenshot", iid):
                data = base64.b64decode(self.ec2.get_console_screenshot(InstanceId=iid, WakeUp=True)["ImageData"])
        except Ec2Error as err:
            raise HotspareError(f"VM {handle.vm_id}: EC2 gave no screenshot of instance {iid}: {err}") from err
        target = Path(os.path.abspath(path))
        if data.startswith(b"\xff\xd8\xff"):
            target = target.with_suffix(".jpg")
        elif not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise HotspareError(f"VM {handle.vm_id}: screenshot of {iid} is neither JPEG nor PNG ({data[:8]!r})")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    # -- ending --------------------------------------------------------------------------
    def stop(self, handle: VmHandle, timeout: float = 30.0,
             before_quit: Callable[[], object] | None = None) -> None:
        """Stop the instance, run ``before_quit`` while it is stopped, terminate it and
        release its resources. Of a gone VM nothing runs, but what it left (image,
        snapshots, kept volume) is released: to ship its last writes first, use
        :meth:`Ec2DeltaCapture.final_capture <hotspare.vm.ec2.capture.Ec2DeltaCapture.final_capture>`."""
        inst = self._instance(handle)
        if inst is None or inst["State"]["Name"] not in ALIVE:
            # Left by kill, or by a stop that failed after terminating.
            self.release(handle, wait=self.config.boot_timeout)
            return
        iid = inst["InstanceId"]
        if inst["State"]["Name"] != "stopped":
            with aws_call("StopInstances", iid):
                self.ec2.stop_instances(InstanceIds=[iid])
            # A stopped instance's volume no longer changes: the final capture sees its last write.
            try:
                self._wait_state(handle, iid, {"stopped"}, timeout)
            except Ec2Error:
                raise
            except HotspareError:
                # The guest did not shut down in time: a forced stop is a power cut, after
                # which the volume holds what the guest had written, as after a crash.
                log.warning("VM %s: instance %s not stopped in %.0f s; forcing", handle.vm_id, iid, timeout)
                with aws_call("StopInstances", iid):
                    self.ec2.stop_instances(InstanceIds=[iid], Force=True)
                self._wait_state(handle, iid, {"stopped"}, self.config.boot_timeout)
        if before_quit is not None:
            before_quit()  # raising leaves the instance stopped, its disk intact
        self.kill(handle)
        self._wait_state(handle, iid, {"terminated"}, max(timeout, self.config.boot_timeout))
        self.release(handle, wait=self.config.boot_timeout)

    def kill(self, handle: VmHandle) -> None:
        """Terminate the instance at once. Its volumes, image and snapshots stay until
        :meth:`release` (or a ``stop`` of the gone VM), for an offline capture."""
        inst = self._instance(handle)
        if inst is not None and inst["State"]["Name"] in ALIVE:
            with aws_call("TerminateInstances", inst["InstanceId"]):
                self.ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])

    def _wait_state(self, handle: VmHandle, iid: str, want: set[str], timeout: float) -> None:
        def probe() -> bool | None:
            inst = self._instance(handle)
            state = inst["State"]["Name"] if inst else "terminated"
            if state in want:
                return True
            if state in ("shutting-down", "terminated") and "terminated" not in want:
                raise HotspareError(f"VM {handle.vm_id}: instance {iid} is {state}, waiting for {sorted(want)}")
            return None

        poll(f"VM {handle.vm_id}: instance {iid} to be {'/'.join(sorted(want))}", probe,
             timeout=timeout, interval=self.config.poll_interval)

    def release(self, handle: VmHandle, *, wait: float = 0.0) -> None:
        """Delete what the VM's launch made (image, its own snapshots, every disk's volume
        once detached, waiting up to ``wait`` seconds for that), not the point snapshots it
        booted from. Call once its instance is gone; idempotent."""
        resources.release(self.ec2, handle.vm_id, timeout=wait, interval=self.config.poll_interval)

    # -- for the capture -----------------------------------------------------------------
    def ebs_disk(self, handle: VmHandle, disk: str | None = None) -> EbsDisk | None:
        """The VM's ``disk`` (None: its first) as its launch recorded it; None for a handle
        from before the launch recorded its disks (a VM of one disk)."""
        if not handle.ebs_disks:
            return None
        if disk is None:
            return handle.ebs_disks[0]
        for d in handle.ebs_disks:
            if d.name == disk:
                return d
        raise HotspareError(f"VM {handle.vm_id} has no disk {disk!r} (it has {[d.name for d in handle.ebs_disks]})")

    def boot_snapshot_id(self, handle: VmHandle, disk: str | None = None) -> str:
        """The snapshot the VM's ``disk`` (None: the boot disk) started from: its point's,
        or the one its launch uploaded."""
        rec = self.ebs_disk(handle, disk)
        if rec is not None:
            return rec.snapshot_id
        return ebs_snapshot_of(handle.boot_disk) or resources.boot_snapshot_id(self.ec2, handle.vm_id)

    def disk_volume_id(self, handle: VmHandle, disk: str | None = None) -> str:
        """The volume of the VM's ``disk`` (None: the root): by its device name on the
        instance; once the instance is gone, the kept volume made from the disk's snapshot."""
        rec = self.ebs_disk(handle, disk)
        inst = self._instance(handle)
        if inst is not None and inst["State"]["Name"] in ALIVE:
            device = rec.device if rec is not None else inst.get("RootDeviceName", ROOT_DEVICE)
            for m in inst.get("BlockDeviceMappings", []):
                if m.get("DeviceName") == device and "Ebs" in m:
                    return str(m["Ebs"]["VolumeId"])
        vols = resources.volumes(self.ec2, handle.vm_id)
        if rec is not None and len(handle.ebs_disks) > 1:
            # A detached volume keeps the snapshot it was made from, and each disk has its own.
            vols = [v for v in vols if v.get("SnapshotId") == rec.snapshot_id]
        if not vols:
            raise HotspareError(f"VM {handle.vm_id}: no volume of disk {rec.name if rec else 'root'} found "
                                f"(instance {handle.container_id} gone and its volume deleted)")
        return str(vols[0]["VolumeId"])

    def root_volume_id(self, handle: VmHandle) -> str:
        """The instance's root volume (see :meth:`disk_volume_id`)."""
        return self.disk_volume_id(handle)


