"""The replica's side of failback: its content for the ranges to move, as data logs in the
store, and its block hashes for the verification.

Both read the recovery point's VHD with ranged reads: the data logs cost the bytes moved;
the hashes read only the VHD blocks that hold data (the rest hash as zeros).
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone

import numpy as np
import xxhash

from hotspare import layout
from hotspare.capture.state import zero_hashes
from hotspare.catalog import RecoveryPoint
from hotspare.extentlog import Extent, LogWriter
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.failback import ranges as rg
from hotspare.store.base import Store
from hotspare.vhd import VhdReader

LOG_TARGET = 64 << 20


def write_data_logs(store: Store, point: RecoveryPoint, ranges: rg.Ranges, *, machine: str, disk: str,
                    disk_size: int, vm_epoch: int, order: int, log_target: int = LOG_TARGET) -> tuple[list[str], int]:
    """Write the point's content of ``ranges`` as data logs of order ``order``; returns
    their keys and the data bytes they carry (zeros travel as null extents)."""
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

    with store.open(point.vhd, buffer_size=4 << 20) as f:
        reader = VhdReader(f, point.vhd)
        for off, length in rg.pieces(ranges, MAX_EXTENT):
            data = reader.read(off, length)
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


def replica_hashes(store: Store, point: RecoveryPoint, disk_size: int, block_size: int) -> np.ndarray:
    """xxh3-64 of every ``block_size`` block of the point, as the agent hashes its disk."""
    hashes = zero_hashes(disk_size, block_size)
    h = xxhash.xxh3_64_intdigest
    with store.open(point.vhd, buffer_size=4 << 20) as f:
        reader = VhdReader(f, point.vhd)
        unit = math.lcm(reader.block_size, block_size)  # whole VHD blocks and whole agent blocks
        for c in np.unique(reader.allocated_blocks() * reader.block_size // unit).tolist():
            off = c * unit
            mv = memoryview(reader.read(off, min(unit, disk_size - off)))
            part = [h(mv[i:i + block_size]) for i in range(0, len(mv), block_size)]
            hashes[off // block_size:off // block_size + len(part)] = part
    return hashes


def differing_ranges(disk_hashes: np.ndarray, replica: np.ndarray, block_size: int, disk_size: int) -> rg.Ranges:
    return rg.from_blocks(np.flatnonzero(disk_hashes != replica), block_size, disk_size)
