"""An EBS snapshot of a recovery point made straight from its chunks, with no local image.

Terms (the others are :mod:`hotspare.vm.ec2.ebs`'s and :mod:`hotspare.replica`'s):
- geometry: how a point's chunks lie in EBS blocks. Chunk sizes are powers of two (the
  machine's block size, 4 KiB to 16 MiB), so several chunks make one 512 KiB block
  (64 KiB chunks: 8) or one chunk spans several blocks; the index's ``chunk_size`` says which.
- plan: the EBS blocks to put, ascending, found page by page from the index with numpy.
  Without a parent: the blocks with a non-zero entry. Over a parent point (the one the parent
  snapshot holds): the blocks where an entry's digest or zero-ness differs, zero blocks
  included, since a block left out keeps the parent's data. Pages the two roots share (the
  same page object) are not even read.

Cost: index pages read are the stored pages (no parent) or those not shared with the parent;
chunks read and blocks put are those blocks. Nothing grows with the disk's size but the loop
over the root's page table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hotspare.errors import HotspareError, InvalidObject, UsageError
from hotspare.replica.index import IndexRoot, read_page
from hotspare.replica.reader import ChunkReader
from hotspare.store.base import Store
from hotspare.vm.ec2.ebs import EBS_BLOCK, UploadResult, block_count, build_snapshot

log = logging.getLogger(__name__)

# Adjacent blocks are read from the chunks in runs of up to this many (4 MiB): one ranged
# read per run where the chunks lie back to back in a pack.
RUN_BLOCKS = 8


class ParentUnreadable(HotspareError):
    """A page of the parent's point could not be read (its index was collected meanwhile)."""


@dataclass(frozen=True)
class ParentPoint:
    """A completed snapshot and the point it holds, whose index the new point is diffed against."""

    snapshot_id: str
    root: IndexRoot


def check_geometry(root: IndexRoot) -> None:
    cs = root.chunk_size
    if EBS_BLOCK % cs and cs % EBS_BLOCK:
        raise InvalidObject(f"{root.machine}/{root.disk} point {root.point}", f"chunk size {cs} neither divides "
                            f"nor is a multiple of the {EBS_BLOCK}-byte EBS block")


def blocks_of_chunks(root: IndexRoot, chunks: np.ndarray) -> np.ndarray:
    """The EBS blocks (ascending, unique, inside the disk) that the chunks numbered
    ``chunks`` lie in."""
    check_geometry(root)
    cs = root.chunk_size
    # Where each EBS block a chunk touches starts, as byte offsets: one per chunk when chunks
    # are smaller than a block, cs / 512 KiB per chunk when larger.
    starts = chunks.astype(np.int64)[:, None] * cs + np.arange(0, cs, min(cs, EBS_BLOCK), dtype=np.int64)[None, :]
    blocks = np.unique(starts.ravel() // EBS_BLOCK)
    return blocks[blocks < block_count(root.disk_size)]


def differing(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Positions where two pages' entries differ: another chunk (digest) or zero on one side only."""
    return np.flatnonzero((new["digest"] != old["digest"]) | ((new["length"] == 0) != (old["length"] == 0)))


def check_parent(root: IndexRoot, parent: IndexRoot) -> str | None:
    """Why ``parent``'s index cannot be diffed against ``root``'s, or None when it can."""
    for field in ("disk_size", "chunk_size", "page_chunks"):
        if getattr(root, field) != getattr(parent, field):
            return f"its {field} is {getattr(parent, field)}, the point's {getattr(root, field)}"
    return None


@dataclass
class Plan:
    """The blocks to put, found lazily; ``pages_read`` counts the index pages fetched so far."""

    reader: ChunkReader
    parent: IndexRoot | None
    pages_read: int = 0

    def blocks(self) -> Iterator[int]:
        root = self.reader.root
        pc = root.page_chunks
        last = -1
        for p in range(root.page_count):
            changed = self._page(p)
            if changed is None or not len(changed):
                continue
            blocks = blocks_of_chunks(root, changed + p * pc)
            blocks = blocks[blocks > last]  # a block that straddles two pages is put once
            if len(blocks):
                last = int(blocks[-1])
                yield from blocks.tolist()

    def _page(self, p: int) -> np.ndarray | None:
        """The positions in page ``p`` whose blocks must be put; None: the page needs nothing."""
        ref = self.reader.root.pages.get(p)
        if self.parent is None:
            if ref is None:
                return None  # zeros, and a snapshot that does not hold a block reads zeros
            self.pages_read += 1
            return np.flatnonzero(self.reader.page(p)["length"])
        old_ref = self.parent.pages.get(p)
        if ref == old_ref:
            return None  # the same page object (or zeros in both): unchanged
        new = self.reader.page(p)  # the reader's cache keeps it for the chunk reads that follow
        try:
            old = read_page(self.reader.store, self.parent, p)
        except InvalidObject as err:
            raise ParentUnreadable(f"page {p} of parent point {self.parent.point}: {err}") from err
        self.pages_read += (ref is not None) + (old_ref is not None)
        return differing(new, old)


def runs(indices: Iterable[int], longest: int = RUN_BLOCKS) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive indices (ascending), at most ``longest`` long."""
    first = prev = -2
    for i in indices:
        if i == prev + 1 and i - first < longest:
            prev = i
            continue
        if first >= 0:
            yield first, prev - first + 1
        first = prev = i
    if first >= 0:
        yield first, prev - first + 1


def block_data(reader: ChunkReader, indices: Iterable[int]) -> Iterator[tuple[int, bytes]]:
    """``(index, 512 KiB)`` of each block, read from the chunks a run at a time; the last
    block is padded with zeros past the disk's end."""
    size = reader.size
    for first, n in runs(indices):
        offset = first * EBS_BLOCK
        data = reader.read(offset, min(n * EBS_BLOCK, size - offset))
        data += bytes(n * EBS_BLOCK - len(data))
        for j in range(n):
            yield first + j, data[j * EBS_BLOCK:(j + 1) * EBS_BLOCK]


@dataclass(frozen=True)
class PointUpload(UploadResult):
    pages_read: int = 0
    parent_snapshot_id: str | None = None


def snapshot_of_point(ebs: Any, ec2: Any, store: Store, root: IndexRoot, *, parent: ParentPoint | None = None,
                      tags: dict[str, str] | None = None, description: str = "", workers: int = 8,
                      timeout: float = 3600.0, poll_interval: float = 5.0, pending_minutes: int = 1440,
                      cache_bytes: int = 64 << 20) -> PointUpload:
    """A completed EBS snapshot of the point ``root`` indexes, its blocks read from the chunks:
    every non-zero block, or over ``parent`` only the blocks that differ from the parent's
    point. Raises :class:`ParentUnreadable` (the snapshot deleted) when a page of the
    parent's index is gone; any other failure also deletes the snapshot."""
    if parent is not None and (why := check_parent(root, parent.root)) is not None:
        raise UsageError(f"point {root.point} cannot be diffed against point {parent.root.point} of snapshot "
                         f"{parent.snapshot_id}: {why}")
    check_geometry(root)  # before a snapshot exists
    # No readahead: over a parent the next blocks are mostly unchanged ones, never read.
    reader = ChunkReader(store, root, cache_bytes=cache_bytes, readahead=0)
    plan = Plan(reader, None if parent is None else parent.root)
    what = f"{root.machine}/{root.disk} point {root.point}"
    result = build_snapshot(ebs, ec2, what, root.disk_size, block_data(reader, plan.blocks()),
                            parent_snapshot_id=None if parent is None else parent.snapshot_id, tags=tags,
                            description=description, workers=workers, timeout=timeout,
                            poll_interval=poll_interval, pending_minutes=pending_minutes)
    log.info("%s: snapshot %s holds it (%d blocks put, %d index pages and %d chunk bytes read%s)", what,
             result.snapshot_id, result.blocks_put, plan.pages_read, reader.fetched,
             "" if parent is None else f", over parent {parent.snapshot_id}")
    return PointUpload(snapshot_id=result.snapshot_id, volume_gib=result.volume_gib, blocks_put=result.blocks_put,
                       pages_read=plan.pages_read, parent_snapshot_id=None if parent is None else parent.snapshot_id)
