"""Writing extent logs: rows are buffered up to a row group's worth of bytes, then encoded
and written on a thread of the log's own while the next row group fills, so memory stays
bounded (two row groups) however large the log grows. Each extent's bytes are copied once,
into the row group's buffer, which becomes the data column as it is (no per-row objects)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from hotspare.extentlog.schema import (
    FORMAT_VERSION,
    MAX_EXTENT,
    META_KEY,
    ROW_GROUP_BYTES,
    SCHEMA,
    SECTOR,
    LogMeta,
    zero_checksum,
)

_DATA = SCHEMA.names.index("data")


@dataclass
class Extent:
    """One write: ``data`` is None for a range that reads as zeros."""

    seq: int
    offset: int
    length: int
    data: bytes | memoryview | None
    ts: datetime | None = None


class LogWriter:
    """Writes one log to ``sink`` (a path or a binary file). Call :meth:`add` with extents
    in seq order, then :meth:`close`, which returns the metadata written to the footer."""

    def __init__(
        self, sink: str | BinaryIO, *, machine: str, disk: str, epoch: int, disk_size: int,
        resync_from: int | None = None,
    ) -> None:
        self._meta = dict(machine=machine, disk=disk, epoch=epoch, disk_size=disk_size,
                          resync_from=resync_from)
        # zstd's fastest regular level: the agent compresses on the protected machine, whose
        # CPU belongs to its workload. On incompressible blocks -1 takes about 60% of level
        # 1's time, and it still squeezes text and sparse data.
        self._writer = pq.ParquetWriter(sink, SCHEMA, compression="zstd", compression_level=-1,
                                        use_dictionary=False, write_statistics=["seq", "offset", "ts"])
        self._cols: dict[str, list] = {name: [] for name in SCHEMA.names if name != "data"}
        # Two buffers in turn: one fills while the encoder thread writes the other. Made
        # when first needed and never zeroed: a log of one small extent touches a page.
        self._room = ROW_GROUP_BYTES + MAX_EXTENT
        self._bufs: list[memoryview | None] = [None, None]
        self._ends: list[int] = []  # each row's end in the buffer (a null row ends where it starts)
        self._nulls: list[bool] = []
        self._buffered = 0
        self._encoder: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.rows = 0
        self.data_bytes = 0

    def add(self, extent: Extent) -> None:
        if extent.offset % SECTOR or extent.length % SECTOR or extent.length <= 0:
            raise ValueError(f"extent at {extent.offset}+{extent.length} is not sector aligned")
        if self.last_seq is not None and extent.seq != self.last_seq + 1:
            raise ValueError(f"seq {extent.seq} does not follow {self.last_seq}")
        data = extent.data
        if data is not None:
            if len(data) != extent.length:
                raise ValueError(f"extent length {extent.length} but {len(data)} data bytes")
            checksum = xxhash.xxh3_64_intdigest(data)
            if self._buffered + len(data) > self._room:
                self._flush()
            if len(data) > self._room:  # only a writer that does not split its extents
                self._room, self._bufs = len(data), [None, None]
            if self._bufs[0] is None:
                self._bufs[0] = memoryview(np.empty(self._room, np.uint8))
            self._bufs[0][self._buffered:self._buffered + len(data)] = data
            self._buffered += len(data)
        else:
            checksum = zero_checksum(extent.length)
        c = self._cols
        c["seq"].append(extent.seq)
        c["offset"].append(extent.offset)
        c["length"].append(extent.length)
        c["checksum"].append(checksum)
        self._ends.append(self._buffered)
        self._nulls.append(data is None)
        c["ts"].append(extent.ts or datetime.now(timezone.utc))
        if self.first_seq is None:
            self.first_seq = extent.seq
        self.last_seq = extent.seq
        self.rows += 1
        if data is not None:
            self.data_bytes += extent.length
        if self._buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _table(self) -> pa.Table:
        """The buffered rows; the data column is a view of the filling buffer."""
        n, used = len(self._ends), self._buffered
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = self._ends
        nulls = np.array(self._nulls)
        validity = pa.py_buffer(np.packbits(~nulls, bitorder="little")) if nulls.any() else None
        data = pa.Array.from_buffers(pa.large_binary(), n, [validity, pa.py_buffer(offsets),
                                                           pa.py_buffer(self._bufs[0][:used] if used else b"")],
                                     null_count=int(nulls.sum()))
        cols = [pa.array(self._cols[f.name], f.type) if i != _DATA else data for i, f in enumerate(SCHEMA)]
        return pa.Table.from_arrays(cols, schema=SCHEMA)

    def _flush(self) -> None:
        if not self._ends:
            return
        table = self._table()
        self._wait()  # the other buffer is free again once its row group is written
        # Encoded and compressed on a thread of its own (pyarrow lets go of the GIL), while
        # the capture reads the next row group's blocks: a view lives that much less.
        if self._encoder is None:  # one thread per log, so its row groups stay in order
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="hotspare-log-encoder")
        self._pending = self._encoder.submit(self._writer.write_table, table, row_group_size=len(table))
        self._cols = {name: [] for name in self._cols}
        self._ends, self._nulls, self._buffered = [], [], 0
        self._bufs.reverse()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _stop_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.shutdown(wait=True)
            self._encoder = None

    def close(self, *, cut: bool = False, consistent: bool = False) -> LogMeta:
        """Finish the file. ``cut``: this log ends a capture cycle; ``consistent``: that
        cycle read a frozen view of the disk."""
        if self.first_seq is None or self.last_seq is None:
            self._writer.close()
            raise ValueError("an extent log needs at least one extent")
        try:
            self._flush()
            self._wait()
        finally:
            self._stop_encoder()
        meta = LogMeta(format_version=FORMAT_VERSION, first_seq=self.first_seq,
                       last_seq=self.last_seq, cut=cut, consistent=consistent and cut, **self._meta)
        self._writer.add_key_value_metadata({META_KEY: meta.model_dump_json().encode()})
        self._writer.close()
        return meta


def write_log(sink: str | BinaryIO, extents: list[Extent], *, cut: bool = True, consistent: bool = True,
              **meta) -> LogMeta:
    """One whole log at once; by default a whole crash-consistent capture cycle."""
    w = LogWriter(sink, **meta)
    for e in extents:
        w.add(e)
    return w.close(cut=cut, consistent=consistent)


