"""Reading and validating extent logs.

A log is read row group by row group from a seekable file (a local file or a store object
opened with ranged reads), so validation holds at most one row group in memory and reading
the metadata touches only the footer. Each rule has its own error, naming the log and,
where a row is at fault, the row's index in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import xxhash
from pydantic import ValidationError

from hotspare.errors import InvalidLog, field_error
from hotspare.extentlog.schema import FORMAT_VERSION, META_KEY, SCHEMA, SECTOR, LogMeta, zero_checksum


@dataclass(frozen=True)
class LogInfo:
    """What validation learned about a good log."""

    key: str
    meta: LogMeta
    rows: int
    data_bytes: int  # bytes carried as data (null rows excluded)
    covered_bytes: int  # bytes the extents cover, zeros included
    captured_at: datetime | None  # the newest extent's capture time
    size: int = 0  # bytes of the file, when known


def open_parquet(f: BinaryIO, key: str) -> pq.ParquetFile:
    """The log as a ParquetFile; InvalidLog when it is not one (truncated, corrupt)."""
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InvalidLog(key, f"not a readable Parquet file (truncated or corrupt): {err}") from err


def _meta(pf: pq.ParquetFile, key: str) -> LogMeta:
    kv = pf.metadata.metadata or {}
    raw = kv.get(META_KEY)
    if raw is None:
        raise InvalidLog(key, "no hotspare metadata in the Parquet footer")
    try:
        meta = LogMeta.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidLog(key, f"bad metadata field {field_error(err)}") from err
    if meta.format_version != FORMAT_VERSION:
        raise InvalidLog(key, f"unknown format version {meta.format_version} (this reader knows {FORMAT_VERSION})")
    if meta.sector_size != SECTOR:
        raise InvalidLog(key, f"sector size {meta.sector_size}, expected {SECTOR}")
    if meta.last_seq < meta.first_seq:
        raise InvalidLog(key, f"last seq {meta.last_seq} before first seq {meta.first_seq}")
    got = pf.schema_arrow
    if not got.equals(SCHEMA, check_metadata=False):
        want = {f.name: f for f in SCHEMA}
        diffs = [f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in got
                 if f.name not in want or not f.equals(want[f.name])]
        diffs += [f"{name}: missing" for name in want if name not in got.names]
        raise InvalidLog(key, f"schema differs from the extent-log schema ({'; '.join(diffs)})")
    return meta


def read_log_info(f: BinaryIO, key: str) -> LogMeta:
    """The log's metadata, from its footer only."""
    return _meta(open_parquet(f, key), key)


def validate_log(f: BinaryIO, key: str, *, machine: str, disk: str, epoch: int, disk_size: int) -> LogInfo:
    """Check every rule of the format on the whole file; raise InvalidLog at the first fault.

    The seq rules relative to the catalog (gap, overlap, fence) are the caller's: it knows
    what was accepted.
    """
    pf = open_parquet(f, key)
    meta = _meta(pf, key)
    for field, want in (("machine", machine), ("disk", disk), ("epoch", epoch), ("disk_size", disk_size)):
        got = getattr(meta, field)
        if got != want:
            raise InvalidLog(key, f"metadata {field} is {got!r}, expected {want!r}")
    rows = pf.metadata.num_rows
    if rows != meta.last_seq - meta.first_seq + 1:
        raise InvalidLog(key, f"{rows} rows for seqs {meta.first_seq}..{meta.last_seq}: seqs must be consecutive")
    next_seq = meta.first_seq
    row0 = 0
    data_bytes = covered = 0
    newest_ts: datetime | None = None
    for batch in _batches(pf, key):
        n = batch.num_rows
        seq = batch.column("seq").to_numpy()
        offset = batch.column("offset").to_numpy()
        length = batch.column("length").to_numpy().astype(np.uint64)
        want = np.arange(next_seq, next_seq + n, dtype=np.uint64)
        _first_bad(key, row0, seq != want, lambda i: f"seq {seq[i]}, expected {want[i]} (seqs are consecutive)")
        _first_bad(key, row0, (offset % SECTOR != 0) | (length % SECTOR != 0) | (length == 0),
                   lambda i: f"extent {offset[i]}+{length[i]} is not a positive multiple of {SECTOR} bytes")
        # Written as a subtraction so that a huge offset cannot wrap around uint64.
        _first_bad(key, row0, (length > disk_size) | (offset > disk_size - length),
                   lambda i: f"extent {offset[i]}+{length[i]} ends past the disk's end ({disk_size} bytes)")
        data_bytes += check_rows(key, row0, length, batch.column("data"), batch.column("checksum").to_numpy())
        covered += int(length.sum())
        ts_max = pa.compute.max(batch.column("ts")).as_py()
        newest_ts = ts_max if newest_ts is None else max(newest_ts, ts_max)
        next_seq += n
        row0 += n
    return LogInfo(key=key, meta=meta, rows=rows, data_bytes=data_bytes, covered_bytes=covered,
                   captured_at=newest_ts)


def check_rows(key: str, row0: int, length: np.ndarray, data: pa.Array, sums: np.ndarray) -> int:
    """Check that each row's data has its length and its xxh3 checksum (null data: the
    checksum of zeros); InvalidLog naming the first bad row (``row0`` is the index of the
    first of these rows in the file). One hash per extent, never per sector; returns the
    bytes carried as data. Every reader of accepted data calls this on the rows it uses."""
    data_bytes = 0
    for i in range(len(length)):
        d = data[i].as_buffer()
        if d is None:
            ok = sums[i] == zero_checksum(int(length[i]))
        else:
            if d.size != length[i]:
                raise InvalidLog(key, f"data has {d.size} bytes, length says {length[i]}", row0 + i)
            ok = sums[i] == xxhash.xxh3_64_intdigest(memoryview(d))
            data_bytes += d.size
        if not ok:
            raise InvalidLog(key, "checksum mismatch: data differs from what was captured", row0 + i)
    return data_bytes


def _batches(pf: pq.ParquetFile, key: str) -> Iterator[pa.RecordBatch]:
    try:
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i).to_batches()
    except (pa.ArrowException, OSError) as err:
        raise InvalidLog(key, f"row group unreadable (truncated or corrupt): {err}") from err


def _first_bad(key: str, row0: int, bad: np.ndarray, why) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidLog(key, why(i), row0 + i)


def iter_extents(f: BinaryIO, key: str) -> Iterator[tuple[np.ndarray, np.ndarray, pa.Array]]:
    """(offsets, lengths, data) per row group, in seq order; data entries may be null. Each
    row group's checksums are verified before it is yielded (InvalidLog naming the row)."""
    pf = open_parquet(f, key)
    row0 = 0
    for batch in _batches(pf, key):
        length, data = batch.column("length").to_numpy(), batch.column("data")
        check_rows(key, row0, length, data, batch.column("checksum").to_numpy())
        row0 += batch.num_rows
        yield (batch.column("offset").to_numpy(), length, data)


def read_row_group(f: BinaryIO | pq.ParquetFile, key: str, group: int, columns: list[str]) -> tuple[pa.Table, int]:
    """One row group's ``columns`` and the file index of its first row; InvalidLog when the
    file or the group does not decode (truncated, corrupt)."""
    pf = f if isinstance(f, pq.ParquetFile) else open_parquet(f, key)
    try:
        row0 = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        return pf.read_row_group(group, columns=columns), row0
    except (pa.ArrowException, OSError, ValueError, IndexError) as err:
        raise InvalidLog(key, f"row group {group} unreadable (truncated or corrupt): {err}") from err
