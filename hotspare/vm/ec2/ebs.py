"""EBS snapshots block by block, through the EBS direct APIs: build one from any source of
blocks (:func:`build_snapshot`; a local disk image, :func:`upload_snapshot`; a recovery
point's chunks, :mod:`hotspare.vm.ec2.ebs_chunks`), list what changed between two, read blocks
back with their checksums verified.

References: AWS "EBS direct APIs" API reference (StartSnapshot, PutSnapshotBlock,
CompleteSnapshot, ListSnapshotBlocks, ListChangedBlocks, GetSnapshotBlock).

Terms:
- block: 512 KiB of the volume (:data:`EBS_BLOCK`, fixed by the API); block ``i`` covers
  bytes ``[i * EBS_BLOCK, (i + 1) * EBS_BLOCK)``. A block a snapshot does not list reads as
  zeros.
- block token: the opaque handle ListSnapshotBlocks / ListChangedBlocks give for a block of
  a snapshot; GetSnapshotBlock needs it. Tokens expire (hours), so they are used at once.
- checksum: base64 of the SHA-256 of the block's 512 KiB, sent with every put and checked
  on every get.
- parent snapshot: a snapshot started with ``ParentSnapshotId`` begins with all of its
  parent's blocks, so only blocks that differ are uploaded; a block that became zero must
  then be written as zeros (leaving it out would keep the parent's data).

Volume sizes are whole GiB: an image that is not a GiB multiple is padded with zeros,
and its last block too when the image is not a 512 KiB multiple.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from hotspare.errors import UsageError
from hotspare.vhd import VhdReader
from hotspare.vm.ec2.aws import Ec2Error, aws_call, poll
from hotspare.vm.host import DiskFormat

log = logging.getLogger(__name__)

EBS_BLOCK = 512 << 10
GIB = 1 << 30
ZERO_BLOCK = bytes(EBS_BLOCK)
# ListSnapshotBlocks / ListChangedBlocks page size: the API's maximum (minimum is 100).
PAGE = 10_000


def volume_gib(size: int) -> int:
    """The smallest whole-GiB volume that holds ``size`` bytes (at least 1)."""
    return max(1, -(-size // GIB))


def block_count(size: int) -> int:
    return -(-size // EBS_BLOCK)


def block_checksum(data: bytes | memoryview) -> str:
    """The checksum the EBS direct APIs use: base64 of the SHA-256 of the block."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def blocks_of_ranges(ranges: Iterable[tuple[int, int]]) -> set[int]:
    """The EBS block indices that byte ranges ``(offset, length)`` touch: what a caller
    knowing the changed extents of a disk passes as ``changed_blocks``."""
    out: set[int] = set()
    for offset, length in ranges:
        if length > 0:
            out.update(range(offset // EBS_BLOCK, (offset + length - 1) // EBS_BLOCK + 1))
    return out


class DiskImage:
    """A local raw or VHD image, read by byte range (VHD through hotspare's strict reader)."""

    def __init__(self, path: str | os.PathLike[str], fmt: DiskFormat) -> None:
        self.path = os.fspath(path)
        self._vhd: VhdReader | None = None
        self._fd = -1
        if fmt == "vpc":
            self._vhd = VhdReader.open(self.path)
            self.size = self._vhd.size
        else:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        if self._vhd is not None:
            return self._vhd.read(offset, length)
        parts, end = [], min(offset + length, self.size)
        while offset < end:  # pread may return short counts
            chunk = os.pread(self._fd, end - offset, offset)
            if not chunk:
                raise UsageError(f"{self.path}: file ended at byte {offset}, expected {self.size}")
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def block(self, index: int) -> bytes:
        """Block ``index``, zero-padded to 512 KiB past the image's end."""
        data = self.read(index * EBS_BLOCK, EBS_BLOCK)
        return data if len(data) == EBS_BLOCK else data + bytes(EBS_BLOCK - len(data))

    def data_blocks(self) -> Iterator[int]:
        """Indices of the blocks that may hold data, ascending: those of a dynamic VHD's
        allocated blocks, those a sparse raw file has data in (SEEK_DATA), else all. The
        rest read as zeros without being read."""
        count = block_count(self.size)
        if self._vhd is not None:
            if self._vhd.kind != "dynamic":
                yield from range(count)
                return
            per = self._vhd.block_size // EBS_BLOCK  # 2 MiB VHD blocks hold 4 EBS blocks
            for b in self._vhd.allocated_blocks().tolist():
                yield from range(b * per, min((b + 1) * per, count))
            return
        if not hasattr(os, "SEEK_DATA"):
            yield from range(count)
            return
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data past pos
                    return
                raise
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            last = min(count, -(-end // EBS_BLOCK))
            yield from range(start // EBS_BLOCK, last)
            pos = last * EBS_BLOCK  # past every block yielded, so none is yielded twice

    def close(self) -> None:
        if self._vhd is not None:
            self._vhd.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def image_size(path: str | os.PathLike[str], fmt: DiskFormat) -> int:
    """The virtual size of a raw or VHD image (a VHD's footer current_size)."""
    with DiskImage(path, fmt) as image:
        return image.size


# -- writing a snapshot ------------------------------------------------------------------


@dataclass(frozen=True)
class UploadResult:
    snapshot_id: str
    volume_gib: int
    blocks_put: int


def upload_snapshot(
    ebs: Any, ec2: Any, path: str | os.PathLike[str], fmt: DiskFormat, *,
    parent_snapshot_id: str | None = None, changed_blocks: Iterable[int] | None = None,
    tags: dict[str, str] | None = None, description: str = "", workers: int = 8,
    timeout: float = 3600.0, poll_interval: float = 5.0, pending_minutes: int = 1440,
) -> UploadResult:
    """Build a completed EBS snapshot of a local raw or VHD image.

    Without a parent every non-zero block is put. With ``parent_snapshot_id`` the caller
    says which blocks differ from the parent (``changed_blocks``, indices of 512 KiB
    blocks, see :func:`blocks_of_ranges`) and only those are put, zeros included.
    Puts run ``workers`` at a time (the API allows concurrent puts to one snapshot).
    ``timeout`` bounds the wait for ``completed`` after the last put; ``pending_minutes``
    is StartSnapshot's Timeout: a snapshot left pending that long (by a crashed upload)
    goes to state error, so it must cover the whole upload.
    """
    if parent_snapshot_id is not None and changed_blocks is None:
        raise UsageError(f"uploading {path} over parent snapshot {parent_snapshot_id}: say which blocks "
                         "changed (changed_blocks), or upload without a parent")
    with DiskImage(path, fmt) as image:
        count = block_count(image.size)
        if changed_blocks is None:
            indices: Iterable[int] = image.data_blocks()
        else:
            indices = sorted(set(changed_blocks))
            bad = [i for i in indices if not 0 <= i < count]
            if bad:
                raise UsageError(f"{path}: changed block {bad[0]} is outside the image's {count} blocks")
        skip_zero = parent_snapshot_id is None  # over a parent, a zero block overrides the parent's data

        def blocks() -> Iterator[tuple[int, bytes]]:
            for index in indices:
                data = image.block(index)
                if not (skip_zero and data == ZERO_BLOCK):  # a block a snapshot does not hold reads as zeros
                    yield index, data

        return build_snapshot(ebs, ec2, os.fspath(path), image.size, blocks(), parent_snapshot_id=parent_snapshot_id,
                              tags=tags, description=description, workers=workers, timeout=timeout,
                              poll_interval=poll_interval, pending_minutes=pending_minutes)


def build_snapshot(
    ebs: Any, ec2: Any, what: str, size: int, blocks: Iterable[tuple[int, bytes]], *,
    parent_snapshot_id: str | None = None, tags: dict[str, str] | None = None, description: str = "",
    workers: int = 8, timeout: float = 3600.0, poll_interval: float = 5.0, pending_minutes: int = 1440,
) -> UploadResult:
    """A completed snapshot of a ``size``-byte disk (``what`` names it in messages) holding
    ``blocks``, ``(index, 512 KiB of data)`` pairs pulled one at a time as the puts go
    (over ``parent_snapshot_id``, on top of the parent's blocks). A snapshot whose build
    fails is deleted. See :func:`upload_snapshot` for the timing arguments."""
    gib = volume_gib(size)
    args: dict[str, Any] = dict(VolumeSize=gib, Description=description, Timeout=max(10, min(4320, pending_minutes)))
    if tags:
        args["Tags"] = [{"Key": k, "Value": v} for k, v in tags.items()]
    if parent_snapshot_id is not None:
        args["ParentSnapshotId"] = parent_snapshot_id
    with aws_call("StartSnapshot", f"{what} ({gib} GiB)"):
        snapshot_id = ebs.start_snapshot(**args)["SnapshotId"]
    log.info("snapshot %s started for %s (%d GiB, parent %s)", snapshot_id, what, gib, parent_snapshot_id)
    try:
        put = _put_blocks(ebs, snapshot_id, blocks, workers=workers)
        with aws_call("CompleteSnapshot", snapshot_id):
            status = ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=put)["Status"]
        if status == "error":
            raise Ec2Error("CompleteSnapshot", snapshot_id, "snapshot status is error", code="SnapshotError")
        wait_snapshot(ec2, snapshot_id, timeout=timeout, interval=poll_interval)
    except BaseException:
        discard_snapshot(ec2, snapshot_id)
        raise
    log.info("snapshot %s completed: %d blocks of %d put", snapshot_id, put, block_count(size))
    return UploadResult(snapshot_id=snapshot_id, volume_gib=gib, blocks_put=put)


def _put_blocks(ebs: Any, snapshot_id: str, blocks: Iterable[tuple[int, bytes]], *, workers: int) -> int:
    """Put the blocks; returns how many. Blocks are pulled from ``blocks`` here, one
    thread, and sent by ``workers`` threads; at most 2 x workers blocks wait in memory."""
    put = 0
    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ebs-put") as pool:
        try:
            for index, data in blocks:
                pending.add(pool.submit(_put_block, ebs, snapshot_id, index, data))
                put += 1
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return put


def _put_block(ebs: Any, snapshot_id: str, index: int, data: bytes) -> None:
    checksum = block_checksum(data)
    with aws_call("PutSnapshotBlock", f"{snapshot_id} block {index}"):
        ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data,
                               DataLength=len(data), Checksum=checksum, ChecksumAlgorithm="SHA256")


def wait_snapshot(ec2: Any, snapshot_id: str, *, timeout: float, interval: float) -> None:
    """Wait for ``completed``; a snapshot in state ``error`` raises at once."""

    def probe() -> bool | None:
        with aws_call("DescribeSnapshots", snapshot_id):
            snap = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
        if snap["State"] == "error":
            raise Ec2Error("DescribeSnapshots", snapshot_id,
                           f"snapshot is in state error: {snap.get('StateMessage') or 'no message'}",
                           code="SnapshotError")
        return True if snap["State"] == "completed" else None

    poll(f"snapshot {snapshot_id}", probe, timeout=timeout, interval=interval)


def discard_snapshot(ec2: Any, snapshot_id: str) -> None:
    """Best effort: a snapshot whose upload failed is useless. (A pending one that AWS
    refuses to delete ends in state error when its StartSnapshot timeout runs out.)"""
    try:
        with aws_call("DeleteSnapshot", snapshot_id):
            ec2.delete_snapshot(SnapshotId=snapshot_id)
    except Ec2Error as err:
        log.warning("could not delete failed snapshot: %s", err)


# -- reading snapshots -------------------------------------------------------------------


@dataclass(frozen=True)
class ChangedBlock:
    """A block that differs between two snapshots; a missing token means the snapshot
    does not hold the block (it reads as zeros there)."""

    index: int
    first_token: str | None
    second_token: str | None


def snapshot_blocks(ebs: Any, snapshot_id: str) -> dict[int, str]:
    """Every block the snapshot holds: index -> block token (ListSnapshotBlocks, all pages)."""
    out: dict[int, str] = {}
    token: str | None = None
    while True:
        args: dict[str, Any] = dict(SnapshotId=snapshot_id, MaxResults=PAGE)
        if token:
            args["NextToken"] = token
        with aws_call("ListSnapshotBlocks", snapshot_id):
            page = ebs.list_snapshot_blocks(**args)
        for b in page.get("Blocks", []):
            out[int(b["BlockIndex"])] = b["BlockToken"]
        token = page.get("NextToken")
        if not token:  # a page may be empty and still not be the last one
            return out


def changed_blocks(ebs: Any, first: str, second: str) -> list[ChangedBlock]:
    """The blocks that differ between two snapshots of one lineage, as AWS computes them
    (ListChangedBlocks, all pages), by index."""
    out: list[ChangedBlock] = []
    token: str | None = None
    while True:
        args: dict[str, Any] = dict(FirstSnapshotId=first, SecondSnapshotId=second, MaxResults=PAGE)
        if token:
            args["NextToken"] = token
        with aws_call("ListChangedBlocks", f"{first}..{second}"):
            page = ebs.list_changed_blocks(**args)
        out += [ChangedBlock(int(b["BlockIndex"]), b.get("FirstBlockToken"), b.get("SecondBlockToken"))
                for b in page.get("ChangedBlocks", [])]
        token = page.get("NextToken")
        if not token:
            return sorted(out, key=lambda c: c.index)


def changed_blocks_by_listing(ebs: Any, first: str, second: str) -> list[ChangedBlock]:
    """Candidate changed blocks from the two snapshots' full listings: blocks held by one
    only, or by both under different tokens. A token says nothing about the data (two
    snapshots may hold equal data under different tokens, as moto always does), so a
    candidate held by both may turn out unchanged once read: the caller compares the data."""
    a, b = snapshot_blocks(ebs, first), snapshot_blocks(ebs, second)
    return [ChangedBlock(i, a.get(i), b.get(i)) for i in sorted(a.keys() | b.keys()) if a.get(i) != b.get(i)]


def read_block(ebs: Any, snapshot_id: str, index: int, token: str) -> bytes:
    """One block's 512 KiB, its SHA-256 checked against the checksum EBS sends with it."""
    what = f"{snapshot_id} block {index}"
    with aws_call("GetSnapshotBlock", what):
        resp = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        data = resp["BlockData"].read()
    if resp.get("ChecksumAlgorithm") != "SHA256" or len(data) != EBS_BLOCK:
        raise Ec2Error("GetSnapshotBlock", what, f"unexpected block: {len(data)} bytes, checksum algorithm "
                       f"{resp.get('ChecksumAlgorithm')!r} (want {EBS_BLOCK} bytes, SHA256)", code="BadBlock")
    got = block_checksum(data)
    if got != resp.get("Checksum"):
        raise Ec2Error("GetSnapshotBlock", what, f"checksum mismatch: EBS says {resp.get('Checksum')}, "
                       f"the data has {got}", code="ChecksumMismatch", transient=True)
    return data
