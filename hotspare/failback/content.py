"""The replica's side of failback: its content and its block hashes at any position of the
VM epoch, at a cost that follows the changed bytes, not the disk's size.

The replica at position P is the newest consolidated point at or before P (the *base*,
read from its chunks) plus the accepted logs after it. ``materialise`` writes into a sparse scratch file
the base's content for the ranges asked and for every block those logs touch, then replays
the logs over it in seq order: those ranges then hold the replica's content at P. So the
rounds after phase one, phase two included, need no new consolidation while the VM is
stopped. The base's hashes are its index's (each entry holds the xxh3-64 of its block, as the
agent hashes it), so no data is read for them; the hashes at P re-hash only the blocks the
logs touch.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import xxhash

from hotspare import layout
from hotspare.catalog import AcceptedLog, Catalog, RecoveryPoint, catalog_logs
from hotspare.errors import HotspareError
from hotspare.extentlog import Extent, LogWriter
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.failback import ranges as rg
from hotspare.failback.plan import Position, replica_changes
from hotspare.machine import DiskSpec
from hotspare.replay import apply_logs
from hotspare.store.base import Store
from hotspare.consolidate.export import point_reader

LOG_TARGET = 64 << 20


@dataclass
class ReplicaAt:
    """The replica of a disk at ``upto``: ``base`` plus ``logs``, which wrote ``touched``."""

    catalog: Catalog
    upto: Position
    base: RecoveryPoint
    logs: list[AcceptedLog]
    touched: rg.Ranges


def replica_at(store: Store, catalog: Catalog, upto: Position) -> ReplicaAt:
    base = catalog.point("current")
    where = f"{catalog.machine}/{catalog.disk}"
    if base is None or base.position > upto:
        raise HotspareError(f"{where} has no consolidated point at or before {upto}")
    touched = replica_changes(store, catalog, base.position, upto)
    if touched is None:
        raise HotspareError(f"{where}: the logs from point {base.id} to {upto} are not all in the catalog")
    logs = catalog_logs(store, catalog, after=base.position, upto=upto)
    return ReplicaAt(catalog, upto, base, logs, touched)


def _whole_blocks(r: rg.Ranges, block_size: int, disk_size: int) -> rg.Ranges:
    if not len(r):
        return r
    return rg.union(np.stack([r[:, 0] // block_size * block_size,
                              np.minimum(-(-r[:, 1] // block_size) * block_size, disk_size)], axis=1))


@contextmanager
def materialise(store: Store, rep: ReplicaAt, ranges: rg.Ranges, block_size: int) -> Iterator[int]:
    """A sparse scratch file (its descriptor) whose ``ranges``, and every block the logs
    after the base touch, hold the replica's content at ``rep.upto``."""
    size = rep.catalog.disk_size
    need = rg.union(ranges, _whole_blocks(rep.touched, block_size, size))
    with tempfile.TemporaryFile(prefix="hotspare-replica-") as f:
        f.truncate(size)
        fd = f.fileno()
        reader = point_reader(store, rep.catalog, rep.base)
        for off, n in rg.pieces(need, MAX_EXTENT):
            os.pwrite(fd, reader.read(off, n), off)
        apply_logs(store, [lg.key for lg in rep.logs], fd)
        yield fd


def write_data_logs(store: Store, read: Callable[[int, int], bytes], ranges: rg.Ranges, *, machine: str, disk: str,
                    disk_size: int, vm_epoch: int, order: int, log_target: int = LOG_TARGET) -> tuple[list[str], int]:
    """Write the content ``read`` gives for ``ranges`` as data logs of order ``order``;
    returns their keys and the data bytes they carry (zeros travel as null extents)."""
    keys: list[str] = []
    data_bytes = 0
    writer: LogWriter | None = None
    sink = io.BytesIO()
    seq = 0
    ts = datetime.now(timezone.utc)

    def flush() -> None:
        nonlocal writer, sink
        assert writer is not None
        writer.close()
        key = layout.failback_data_key(machine, vm_epoch, order, disk, len(keys))
        # Overwriting is safe: no order names these keys until it is committed.
        store.put(key, sink.getvalue())
        keys.append(key)
        writer, sink = None, io.BytesIO()

    for off, length in rg.pieces(ranges, MAX_EXTENT):
        data = read(off, length)
        zero = not np.frombuffer(data, dtype=np.uint8).any()
        if writer is None:
            writer = LogWriter(sink, machine=machine, disk=disk, epoch=vm_epoch, disk_size=disk_size)
        writer.add(Extent(seq=seq, offset=off, length=length, data=None if zero else data, ts=ts))
        seq += 1
        data_bytes += 0 if zero else length
        if writer.data_bytes + writer.rows * 64 >= log_target:
            flush()
    if writer is not None:
        flush()
    return keys, data_bytes


def point_hashes(store: Store, catalog: Catalog, point: RecoveryPoint, block_size: int) -> np.ndarray:
    """xxh3-64 of every ``block_size`` block of a consolidated point, as the agent hashes
    its disk, from the point's index alone (its chunks are blocks of the same size)."""
    reader = point_reader(store, catalog, point)
    if reader.root.chunk_size != block_size:
        raise HotspareError(f"{catalog.machine}/{catalog.disk}: point {point.id} has chunks of {reader.root.chunk_size} "
                            f"bytes, the disk's blocks are {block_size}")
    return reader.block_hashes()


def hashes_at(store: Store, rep: ReplicaAt, disk: DiskSpec, base_hashes: np.ndarray) -> np.ndarray:
    """The replica's block hashes at ``rep.upto``: the base's, with the blocks the later
    logs touched hashed again from their replayed content."""
    hashes = base_hashes.copy()
    if not len(rep.touched):
        return hashes
    h = xxhash.xxh3_64_intdigest
    bs = disk.block_size
    with materialise(store, rep, rg.EMPTY, bs) as fd:
        for off, n in rg.pieces(_whole_blocks(rep.touched, bs, disk.size), MAX_EXTENT - MAX_EXTENT % bs):
            mv = memoryview(os.pread(fd, n, off))
            hashes[off // bs:off // bs + -(-n // bs)] = [h(mv[i:i + bs]) for i in range(0, n, bs)]
    return hashes


def differing_ranges(disk_hashes: np.ndarray, replica: np.ndarray, block_size: int, disk_size: int) -> rg.Ranges:
    return rg.from_blocks(np.flatnonzero(disk_hashes != replica), block_size, disk_size)
