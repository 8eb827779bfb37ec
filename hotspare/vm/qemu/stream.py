"""Pulling a running VM's disks local: QMP ``block-stream`` of each backing into its overlay.

A failed-over VM boots at once on disks whose bottom is the replica's served point (NBD) or
a local image (:func:`hotspare.vm.qemu.cmd.disk_blockdevs`); then one ``block-stream`` job
per disk (``stream-<disk>``) copies, in QEMU's background, the backing into the disk's local
layer (``<disk>.local.qcow2``, under the overlay that takes the guest's writes and carries
the capture's bitmaps), while the guest runs and writes. When a job completes QEMU drops
the backing from the local layer (also from its qcow2 header), and :func:`stream_status` deletes the backing node,
which closes the file or the NBD connection: from then on the disk is wholly local and its server may stop. That is recorded
per disk in the handle (``backing_needed = False``, also in ``handle.json``), which the
flow copies into the machine's state.

Guest writes during the stream are never overwritten: they land in the overlay above. The jobs cost QEMU's I/O, proportional to the disk, but nothing
waits for them: the VM serves from its first second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hotspare.errors import HotspareError
from hotspare.vm.host import HandleDisk, VmHandle, save_handle
from hotspare.vm.qemu.cmd import backing_node, local_node, node_names
from hotspare.qmp import QmpClient, QmpError


def job_id(disk: str) -> str:
    return f"stream-{disk}"


@dataclass(frozen=True)
class DiskStream:
    """Where one disk's stream stands."""

    disk: str
    done: bool  # the overlay holds the whole disk; its backing is closed
    offset: int  # bytes of the disk the job has been through
    length: int  # bytes the job goes through (the disk's size)
    running: bool  # a job is in progress

    @property
    def fraction(self) -> float:
        return 1.0 if self.done else (self.offset / self.length if self.length else 0.0)


def _has_backing(q: QmpClient, disk: HandleDisk) -> bool:
    """Whether the disk's local layer still has a backing, from the guest device's chain in
    query-block (by file name: a capture's view may put a filter node on top)."""
    for blk in q.execute("query-block"):
        if blk.get("qdev") not in (disk.device, f"/machine/peripheral/{disk.device}/virtio-backend"):
            continue
        image = (blk.get("inserted") or {}).get("image")
        while image:
            if image.get("filename") == disk.local:
                return bool(image.get("backing-image") or image.get("backing-filename"))
            image = image.get("backing-image")
        return True  # the local layer not found in the chain: not known to be done
    raise HotspareError(f"QMP query-block on {q.path}: no guest disk {disk.device!r} ({disk.name})")


def _close_backing(q: QmpClient, disk: str) -> None:
    """Delete the backing node the stream left without parents: QEMU then closes the file
    or the NBD connection, and the server may stop."""
    name = backing_node(disk)
    if name in node_names(q):
        q.execute("blockdev-del", {"node-name": name})


def start_streams(host, handle: VmHandle, *, speed: int = 0) -> list[str]:
    """Start ``block-stream`` for every disk that still reads its backing and has no job
    running (idempotent: a re-run after a crash starts only what is missing). Returns the
    disks started. ``speed``: bytes per second per disk, 0 for as fast as QEMU can."""
    started = []
    with host.qmp(handle) as q:
        jobs = {j["id"]: j for j in q.execute("query-jobs")}
        for d in handle.disks:
            job = jobs.get(job_id(d.name))
            if job is not None and job["status"] == "concluded":
                q.execute("job-dismiss", id=job["id"])  # ended (with an error, if any: started again)
                job = None
            if job is not None or not _has_backing(q, d):
                continue
            # No base: everything below the overlay comes up, and the backing is dropped at
            # the end. auto-dismiss off, so that an error stays visible to stream_status.
            q.execute("block-stream", {"job-id": job_id(d.name), "device": local_node(d.name), "auto-dismiss": False,
                                       **({"speed": speed} if speed else {})})
            started.append(d.name)
    return started


def stream_status(host, handle: VmHandle) -> list[DiskStream]:
    """Each disk's stream, from QEMU. A disk whose stream completed is marked in ``handle``
    (``backing_needed``) and ``handle.json`` is rewritten; a failed job raises, naming the
    disk and QEMU's error (start_streams starts it again)."""
    out = []
    changed = False
    with host.qmp(handle) as q:
        jobs = {j["id"]: j for j in q.execute("query-jobs")}
        for i, d in enumerate(handle.disks):
            job = jobs.get(job_id(d.name))
            if job is not None and job["status"] == "concluded":
                q.execute("job-dismiss", id=job["id"])
                if job.get("error"):
                    raise HotspareError(f"VM {handle.vm_id}: streaming disk {d.name} from {d.backing} failed: "
                                        f"{job['error']}")
                job = None
            done = job is None and not _has_backing(q, d)
            if done:
                _close_backing(q, d.name)
            if done and d.backing_needed:
                handle.disks[i] = d.model_copy(update={"backing_needed": False})
                changed = True
            offset = int(job.get("current-progress", 0)) if job else (d.size if done else 0)
            length = int(job.get("total-progress", d.size)) if job else d.size
            out.append(DiskStream(d.name, done, offset, length, running=job is not None))
    if changed:
        save_handle(handle)
    return out


def wait_streams(host, handle: VmHandle, *, timeout: float,
                 on_progress: Callable[[list[DiskStream]], object] | None = None,
                 poll: float = 1.0) -> list[DiskStream]:
    """Poll :func:`stream_status` until every disk is local (or ``timeout`` seconds pass:
    then the streams go on in QEMU and the last status is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = stream_status(host, handle)
        except QmpError:
            if not host.is_alive(handle):
                raise HotspareError(f"VM {handle.vm_id} ended while its disks streamed") from None
            raise
        if on_progress is not None:
            on_progress(status)
        if all(s.done for s in status) or time.monotonic() > deadline:
            return status
        time.sleep(poll)
