"""The extent-log format: round trip, streaming reads, and one test per validation rule."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from hotspare.errors import InvalidLog
from hotspare.extentlog import Extent, LogWriter, iter_extents, read_log_info, validate_log, write_log
from hotspare.extentlog.schema import META_KEY, ROW_GROUP_BYTES, SCHEMA

DISK = 64 << 20
META = dict(machine="m1", disk="root", epoch=0, disk_size=DISK)
CHECK = dict(machine="m1", disk="root", epoch=0, disk_size=DISK)


def extents(n: int = 4, first_seq: int = 0) -> list[Extent]:
    out = []
    for i in range(n):
        data = None if i % 3 == 2 else bytes([i + 1]) * 4096
        out.append(Extent(seq=first_seq + i, offset=i * 1 << 20, length=4096, data=data))
    return out


def write(path: Path, exts: list[Extent] | None = None, **meta) -> Path:
    write_log(str(path), exts if exts is not None else extents(), **{**META, **meta})
    return path


def validate(path: Path, **check):
    with open(path, "rb") as f:
        return validate_log(f, path.name, **{**CHECK, **check})


def rewrite(path: Path, mutate_table=None, mutate_meta=None) -> None:
    """Rewrite a log with its table or metadata changed (checksums left as they were)."""
    pf = pq.ParquetFile(path)
    table = pf.read()
    meta = json.loads(pf.metadata.metadata[META_KEY])
    if mutate_table:
        table = mutate_table(table)
        if table.schema.names == SCHEMA.names:
            table = pa.Table.from_arrays(table.columns, schema=SCHEMA)
    if mutate_meta:
        mutate_meta(meta)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path, compression="zstd")


def test_round_trip(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    info = validate(p)
    assert (info.meta.first_seq, info.meta.last_seq, info.rows) == (0, 3, 4)
    assert info.data_bytes == 3 * 4096 and info.covered_bytes == 4 * 4096
    got = []
    with open(p, "rb") as f:
        for offsets, lengths, data in iter_extents(f, p.name):
            got += list(zip(offsets.tolist(), lengths.tolist(), (d.as_py() for d in data)))
    assert got == [(e.offset, e.length, None if e.data is None else bytes(e.data)) for e in extents()]
    assert pq.ParquetFile(p).schema_arrow.equals(SCHEMA)
    assert pq.ParquetFile(p).metadata.row_group(0).column(3).compression == "ZSTD"


def test_row_groups_are_bounded_and_metadata_read_is_footer_only(tmp_path: Path) -> None:
    big = [Extent(seq=i, offset=i << 20, length=1 << 20, data=bytes([i % 251]) * (1 << 20)) for i in range(40)]
    p = write(tmp_path / "big.parquet", big)
    pf = pq.ParquetFile(p)
    assert pf.num_row_groups >= 2
    for g in range(pf.num_row_groups):
        assert pf.metadata.row_group(g).num_rows * (1 << 20) <= ROW_GROUP_BYTES + (1 << 20)

    class Counting(io.FileIO):
        read_bytes = 0

        def readinto(self, b):  # type: ignore[override]
            n = super().readinto(b)
            Counting.read_bytes += n or 0
            return n

    with Counting(p, "rb") as f:
        meta = read_log_info(f, "big.parquet")
    assert meta.last_seq == 39
    assert Counting.read_bytes < 256 << 10, "reading the metadata must not read the data"


def test_rows_keep_their_bytes_across_row_groups_and_reused_buffers(tmp_path: Path) -> None:
    """The writer copies each extent into one of two row-group buffers it reuses in turn:
    five row groups of distinct bytes, zeros between them, an extent bigger than a row
    group, and a caller that reuses its own buffer after each add all read back exactly."""
    class Slow(io.FileIO):  # a slow sink: the encoder still reads a buffer while rows fill the other
        def write(self, b):  # type: ignore[override]
            time.sleep(0.002)
            return super().write(b)

    rng = np.random.default_rng(7)
    mine = bytearray(3 << 20)  # the caller's buffer, overwritten after every add
    want: list[tuple[int, int, bytes | None]] = []
    sink = Slow(tmp_path / "groups.parquet", "wb")
    w = LogWriter(sink, **{**META, "disk_size": 1 << 40})
    for i in range(30):
        off = i << 22
        if i % 4 == 3:
            w.add(Extent(seq=i, offset=off, length=1 << 20, data=None))
            want.append((off, 1 << 20, None))
            continue
        n = (ROW_GROUP_BYTES + (8 << 20)) if i == 17 else len(mine)
        data = rng.bytes(n)
        if n == len(mine):
            mine[:] = data
            w.add(Extent(seq=i, offset=off, length=n, data=memoryview(mine)))
            mine[:] = bytes(n)
        else:
            w.add(Extent(seq=i, offset=off, length=n, data=data))
        want.append((off, n, data))
    w.close(cut=True, consistent=True)
    sink.close()
    p = tmp_path / "groups.parquet"
    assert pq.ParquetFile(p).num_row_groups >= 5
    got = []
    with open(p, "rb") as f:
        for offsets, lengths, data in iter_extents(f, p.name):
            got += list(zip(offsets.tolist(), lengths.tolist(), (d.as_py() for d in data)))
    assert got == want
    assert validate(p, disk_size=1 << 40).rows == 30


def test_flipped_data_byte_is_a_checksum_error_naming_the_row(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")

    def flip(t: pa.Table) -> pa.Table:
        data = t.column("data").to_pylist()
        data[1] = bytes([data[1][0] ^ 0xFF]) + data[1][1:]
        return t.set_column(3, "data", pa.array(data, pa.large_binary()))

    rewrite(p, flip)
    with pytest.raises(InvalidLog, match=r"a\.parquet: row 1: checksum mismatch") as e:
        validate(p)
    assert e.value.row == 1


def test_null_data_checksum_must_be_of_zeros(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(4, "checksum", pa.array([1, 2, 3, 4], pa.uint64())))
    with pytest.raises(InvalidLog, match="row 0: checksum mismatch"):
        validate(p)


def test_truncated_file(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(InvalidLog, match=r"a\.parquet: not a readable Parquet file \(truncated or corrupt\)"):
        validate(p)


def test_extent_past_the_disk_end(tmp_path: Path) -> None:
    exts = extents(2) + [Extent(seq=2, offset=DISK - 512, length=1024, data=b"x" * 1024)]
    p = write(tmp_path / "a.parquet", exts)
    with pytest.raises(InvalidLog, match=rf"row 2: extent {DISK - 512}\+1024 ends past the disk's end"):
        validate(p)


def test_huge_offset_does_not_wrap(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(1, "offset", pa.array([0, 2**64 - 512, 0, 0], pa.uint64())))
    with pytest.raises(InvalidLog, match="row 1: .* ends past the disk's end"):
        validate(p)


def test_unaligned_extent(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(1, "offset", pa.array([0, 100, 0, 0], pa.uint64())))
    with pytest.raises(InvalidLog, match="row 1: extent 100\\+4096 is not a positive multiple of 512"):
        validate(p)


def test_zero_length_extent(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(2, "length", pa.array([4096, 0, 4096, 4096], pa.uint32())))
    with pytest.raises(InvalidLog, match="row 1: extent .*\\+0 is not a positive multiple"):
        validate(p)


def test_length_disagrees_with_data(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(2, "length", pa.array([4096, 8192, 4096, 4096], pa.uint32())))
    with pytest.raises(InvalidLog, match="row 1: data has 4096 bytes, length says 8192"):
        validate(p)


def test_seqs_must_be_consecutive(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, lambda t: t.set_column(0, "seq", pa.array([0, 1, 3, 2], pa.uint64())))
    with pytest.raises(InvalidLog, match="row 2: seq 3, expected 2"):
        validate(p)


def test_rows_disagree_with_metadata_seqs(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, mutate_meta=lambda m: m.update(last_seq=9))
    with pytest.raises(InvalidLog, match="4 rows for seqs 0..9"):
        validate(p)


def test_unknown_format_version(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, mutate_meta=lambda m: m.update(format_version=99))
    with pytest.raises(InvalidLog, match="unknown format version 99 \\(this reader knows 1\\)"):
        validate(p)


@pytest.mark.parametrize("field,value", [("machine", "other"), ("disk", "data"), ("epoch", 1), ("disk_size", 1 << 30)])
def test_metadata_must_match_the_disk(tmp_path: Path, field: str, value) -> None:
    p = write(tmp_path / "a.parquet")
    with pytest.raises(InvalidLog, match=f"metadata {field} is .*, expected {value!r}"):
        validate(p, **{field: value})


def test_missing_metadata_and_foreign_schema(tmp_path: Path) -> None:
    p = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), p)
    with pytest.raises(InvalidLog, match="no hotspare metadata"):
        validate(p)
    q = write(tmp_path / "a.parquet")
    rewrite(q, lambda t: t.drop_columns(["ts"]))
    with pytest.raises(InvalidLog, match="schema differs"):
        validate(q)


def test_bad_metadata_json(tmp_path: Path) -> None:
    p = write(tmp_path / "a.parquet")
    rewrite(p, mutate_meta=lambda m: m.update(epoch=-3))
    with pytest.raises(InvalidLog, match="bad metadata field epoch"):
        validate(p)


def test_writer_refuses_bad_extents(tmp_path: Path) -> None:
    w = LogWriter(str(tmp_path / "w.parquet"), **META)
    with pytest.raises(ValueError, match="not sector aligned"):
        w.add(Extent(seq=0, offset=1, length=512, data=b"x" * 512))
    w.add(Extent(seq=0, offset=0, length=512, data=b"x" * 512))
    with pytest.raises(ValueError, match="does not follow"):
        w.add(Extent(seq=5, offset=0, length=512, data=b"x" * 512))
    assert w.close().last_seq == 0
    assert xxhash.xxh3_64_intdigest(b"x" * 512) == pq.read_table(tmp_path / "w.parquet")["checksum"][0].as_py()
