"""Write VHDs (fixed and dynamic) and raw images, streaming from a source, with the disk's
exact virtual size.

References: Microsoft "Virtual Hard Disk Image Format Specification"; qemu's block/vpc.c.

Terms:
- source: where the disk's bytes come from, either a ``read_at(offset, length) -> bytes``
  callable (e.g. :meth:`VhdReader.read <hotspare.vhd.reader.VhdReader.read>`) or a binary
  file positioned anywhere (read with ``pread`` when it has a file descriptor).
- zero block: a 2 MiB block whose bytes are all zero. A dynamic VHD leaves it out (its BAT
  entry stays UNUSED); a fixed VHD or raw image written to a seekable file leaves a hole.

Every byte position comes from :mod:`hotspare.vhd.layout`, which a composing writer (S3
multipart copy) uses too. The source is read once, block by block, so memory stays at a
few blocks whatever the disk size.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from hotspare.errors import UsageError
from hotspare.vhd.layout import (
    DynamicLayout,
    bat_bytes,
    check_size,
    dynamic_header_bytes,
    footer_bytes,
    sector_bitmap_bytes,
)
from hotspare.vhd.reader import VhdReader
from hotspare.vhd.spec import BLOCK_SIZE, FOOTER_COOKIE, FOOTER_SIZE

__all__ = [
    "DynamicLayout",
    "ReadAt",
    "Source",
    "bat_bytes",
    "convert",
    "dynamic_header_bytes",
    "footer_bytes",
    "write_dynamic",
    "write_fixed",
    "write_raw",
]

ReadAt = Callable[[int, int], bytes]
Source = ReadAt | BinaryIO
Format = Literal["raw", "vhd", "vhd-fixed"]


def write_fixed(
    source: Source,
    size: int,
    out: BinaryIO,
    *,
    unique_id: uuid.UUID | None = None,
    timestamp: datetime | int | None = None,
) -> int:
    """Write a fixed VHD of ``size`` bytes to ``out`` from its position; returns the bytes
    the VHD occupies (``size + 512``). Zero blocks become holes when ``out`` is seekable."""
    name = _name(out)
    check_size(size, name)
    _write_data(source, size, out)
    out.write(footer_bytes(size, "fixed", unique_id or uuid.uuid4(), _when(timestamp)))
    return size + FOOTER_SIZE


def write_dynamic(
    source: Source,
    size: int,
    out: BinaryIO,
    *,
    unique_id: uuid.UUID | None = None,
    timestamp: datetime | int | None = None,
) -> DynamicLayout:
    """Write a dynamic VHD of ``size`` bytes to the seekable ``out`` from its position, in
    one pass over the source; returns its layout (which blocks are allocated, where).

    Zero blocks are not allocated; each allocated block gets a full sector bitmap and is
    stored whole (the disk's last block zero-padded when ``size`` is not a block multiple).
    The BAT is known only at the end, so it is written last, over a placeholder.
    """
    name = _name(out)
    check_size(size, name)
    if not out.seekable():
        raise UsageError(f"{name}: a dynamic VHD needs a seekable output (its BAT is written last)")
    uid, when = unique_id or uuid.uuid4(), _when(timestamp)
    base = out.tell()
    _clear_after(out)
    empty = DynamicLayout(size)
    # Footer copy and dynamic header are final already; the BAT is all UNUSED for now.
    out.write(empty.head_bytes(uid, when))
    bitmap = sector_bitmap_bytes()
    allocated: list[int] = []
    for offset, data in _blocks(source, size):
        if _is_zero(data):
            continue
        # Slots follow each other in allocation order, so the k-th sits where the empty
        # layout says slot k is (it does not depend on the other blocks).
        assert out.tell() - base == empty.slot_offset(len(allocated))
        out.write(bitmap)
        out.write(data)
        if len(data) < BLOCK_SIZE:
            out.write(bytes(BLOCK_SIZE - len(data)))
        allocated.append(offset // BLOCK_SIZE)
    layout = DynamicLayout(size, np.asarray(allocated, dtype=np.int64))
    out.write(layout.tail_bytes(uid, when))
    out.seek(base + layout.table_offset)
    out.write(bat_bytes(layout.bat()))
    out.seek(base + layout.file_size)
    return layout


def write_raw(source: Source, size: int, out: BinaryIO) -> int:
    """Write the ``size`` bytes of a disk as a raw image; zero blocks become holes when
    ``out`` is seekable. Returns ``size``."""
    name = _name(out)
    if size < 0:
        raise UsageError(f"{name}: negative size {size}")
    _write_data(source, size, out)
    return size


def convert(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    fmt: Format,
    *,
    src_fmt: Literal["auto", "raw", "vhd"] = "auto",
) -> int:
    """Convert a raw image or VHD (either kind) into ``fmt``: ``raw``, ``vhd`` (dynamic) or
    ``vhd-fixed``. ``auto`` takes the source for a VHD when its last 512 bytes start with the
    footer cookie. The destination appears whole or not at all (written beside it, then
    renamed). Returns the virtual size."""
    if fmt not in ("raw", "vhd", "vhd-fixed"):
        raise UsageError(f"{dst_path}: unknown format {fmt!r} (raw, vhd or vhd-fixed)")
    if src_fmt not in ("auto", "raw", "vhd"):
        raise UsageError(f"{src_path}: unknown source format {src_fmt!r} (auto, raw or vhd)")
    dst = Path(dst_path)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    with open(src_path, "rb") as src:
        if src_fmt == "vhd" or (src_fmt == "auto" and _looks_like_vhd(src)):
            reader = VhdReader(src, os.fspath(src_path))
            source: Source = reader.read
            size = reader.size
        else:
            source, size = src, src.seek(0, io.SEEK_END)
        try:
            with open(tmp, "wb") as out:
                if fmt == "raw":
                    write_raw(source, size, out)
                elif fmt == "vhd":
                    write_dynamic(source, size, out)
                else:
                    write_fixed(source, size, out)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return size


# -- helpers ----------------------------------------------------------------------------


def _when(timestamp: datetime | int | None) -> datetime | int:
    return datetime.now(UTC) if timestamp is None else timestamp


def _name(obj: object) -> str:
    """What errors call a file or source: its name, or its owner's (a bound
    ``VhdReader.read``)."""
    owner = getattr(obj, "__self__", obj)
    return str(getattr(owner, "name", None) or getattr(obj, "__qualname__", None) or "<stream>")


def _fileno(source: Source) -> int | None:
    if callable(source):
        return None
    try:
        return source.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None  # a file-like without a descriptor, e.g. a store ranged reader


def _blocks(source: Source, size: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """(offset, data) for each BLOCK_SIZE piece of the source's first ``size`` bytes.

    From a file with a descriptor, ``data`` is a view of one reused buffer, valid until the
    next item: ``preadv`` into it saves allocating (and page-faulting) 2 MiB per block.
    """
    name = _name(source)
    fd = _fileno(source)
    if fd is not None:
        view = memoryview(bytearray(BLOCK_SIZE))
        for offset in range(0, size, BLOCK_SIZE):
            want = min(BLOCK_SIZE, size - offset)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], offset + got)
                if n == 0:
                    raise _short_source(name, offset + got, size)
                got += n
            yield offset, view[:want]
        return
    read_at = source if callable(source) else _seek_read(source)
    for offset in range(0, size, BLOCK_SIZE):
        want = min(BLOCK_SIZE, size - offset)
        data = read_at(offset, want)
        while len(data) < want:
            more = read_at(offset + len(data), want - len(data))
            if not more:
                raise _short_source(name, offset + len(data), size)
            data += more
        yield offset, data


def _short_source(name: str, end: int, size: int) -> UsageError:
    return UsageError(f"{name}: source ends at byte {end}, expected {size} bytes")


def _seek_read(f: BinaryIO) -> ReadAt:
    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    return read_at


def _is_zero(data: bytes | memoryview) -> bool:
    # One vectorised pass (tens of GB/s); sizes here are sector multiples, so 8-byte words
    # fit, but fall back to bytes for any odd tail.
    words = len(data) // 8 * 8
    head = np.frombuffer(data, dtype=np.uint64, count=words // 8)
    return not head.any() and not any(data[words:])


def _write_data(source: Source, size: int, out: BinaryIO) -> None:
    """The disk's bytes, zero blocks skipped as holes when ``out`` can seek."""
    sparse = out.seekable()
    if sparse:
        _clear_after(out)
    for _, data in _blocks(source, size):
        if sparse and _is_zero(data):
            out.seek(len(data), io.SEEK_CUR)
        else:
            out.write(data)
    if sparse:
        # A trailing hole needs the file extended to cover it.
        end = out.tell()
        if out.seek(0, io.SEEK_END) < end:
            out.truncate(end)
        out.seek(end)


def _clear_after(out: BinaryIO) -> None:
    """Drop whatever ``out`` holds past its position: skipped blocks must read as zeros.

    Only when there is something: on ext4, truncating a file to size 0 makes its close
    flush every dirty page (auto_da_alloc), which doubled the time of a 1 GiB write.
    """
    here = out.tell()
    if out.seek(0, io.SEEK_END) > here:
        out.truncate(here)
    out.seek(here)


def _looks_like_vhd(f: BinaryIO) -> bool:
    end = f.seek(0, io.SEEK_END)
    if end < FOOTER_SIZE:
        return False
    f.seek(end - FOOTER_SIZE)
    return f.read(len(FOOTER_COOKIE)) == FOOTER_COOKIE
