"""Writing extent logs: rows are buffered up to a row group's worth of bytes, then encoded
and written on a thread of the log's own while the next row group fills, so memory stays
bounded (two row groups) however large the log grows."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from hotspare.extentlog.schema import (
    FORMAT_VERSION,
    META_KEY,
    ROW_GROUP_BYTES,
    SCHEMA,
    SECTOR,
    LogMeta,
    zero_checksum,
)


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
        self._cols: dict[str, list] = {name: [] for name in SCHEMA.names}
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
            data = bytes(data)
        else:
            checksum = zero_checksum(extent.length)
        c = self._cols
        c["seq"].append(extent.seq)
        c["offset"].append(extent.offset)
        c["length"].append(extent.length)
        c["data"].append(data)
        c["checksum"].append(checksum)
        c["ts"].append(extent.ts or datetime.now(timezone.utc))
        if self.first_seq is None:
            self.first_seq = extent.seq
        self.last_seq = extent.seq
        self.rows += 1
        if data is not None:
            self.data_bytes += extent.length
            self._buffered += extent.length
        if self._buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._cols["seq"]:
            return
        table = pa.Table.from_pydict(self._cols, schema=SCHEMA)
        self._wait()
        # Encoded and compressed on a thread of its own (pyarrow lets go of the GIL), while
        # the capture reads the next row group's blocks: a view lives that much less.
        if self._encoder is None:  # one thread per log, so its row groups stay in order
            self._encoder = ThreadPoolExecutor(1, thread_name_prefix="hotspare-log-encoder")
        self._pending = self._encoder.submit(self._writer.write_table, table, row_group_size=len(table))
        self._cols = {name: [] for name in SCHEMA.names}
        self._buffered = 0

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


