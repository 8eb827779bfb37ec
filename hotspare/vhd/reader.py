"""Read a VHD (fixed or dynamic) from any seekable binary file, validating it first.

References: Microsoft "Virtual Hard Disk Image Format Specification"; qemu's block/vpc.c.

:class:`VhdReader` works on any file-like with ``seek``/``read`` (a local file, a
``Store.open`` ranged reader over an object), reading only the bytes it needs: the footer,
the dynamic header and BAT at open, then the blocks asked for.

Validation happens at open and is stricter than qemu's or libvhdi's: a footer whose checksum
does not match (say a flipped reserved byte) is refused, as is a footer copy that disagrees
with the footer, a BAT entry whose block does not fit in the file, and a truncated file.
Every refusal is :class:`~hotspare.vhd.errors.InvalidVhd` naming the file and the bad value.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO, NoReturn

import numpy as np

from hotspare.vhd.errors import InvalidVhd
from hotspare.vhd.spec import (
    BLOCK_SIZE,
    DYNAMIC_HEADER_CHECKSUM_OFFSET,
    DYNAMIC_HEADER_COOKIE,
    DYNAMIC_HEADER_SIZE,
    FILE_FORMAT_VERSION,
    FOOTER_CHECKSUM_OFFSET,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_VERSION,
    MAX_SIZE,
    SECTOR_SIZE,
    UNUSED,
    DiskType,
    DynamicHeader,
    Footer,
    Kind,
    bitmap_size,
    block_count,
    checksum,
)


class VhdReader:
    """A validated VHD open for reading. Not thread-safe: it moves the file's position.

    ``name`` is what errors call the file (default: the file's ``name`` attribute).
    The reader does not own ``f`` unless made by :meth:`open`.
    """

    footer: Footer
    dynamic_header: DynamicHeader | None
    bat: np.ndarray | None

    def __init__(self, f: BinaryIO, name: str | None = None) -> None:
        self._f = f
        self._owned = False
        self.name = name if name is not None else str(getattr(f, "name", "<vhd>"))
        self.file_size = f.seek(0, io.SEEK_END)
        self.footer = self._open_footer()
        self.dynamic_header = None
        self.bat = None
        self._bitmap_cache: tuple[int, bytes] | None = None
        if self.footer.disk_type == DiskType.DYNAMIC:
            self._open_dynamic()
        elif self.file_size != self.size + FOOTER_SIZE:
            self._fail(
                f"file is {self.file_size} bytes, a fixed VHD of current_size {self.size} "
                f"must be {self.size + FOOTER_SIZE} bytes (truncated or padded file)"
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> VhdReader:
        """Open a local file; :meth:`close` (or ``with``) closes it."""
        f = open(path, "rb")  # noqa: SIM115 - owned by the reader, closed in close()
        try:
            reader = cls(f, os.fspath(path))
        except BaseException:
            f.close()
            raise
        reader._owned = True
        return reader

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> VhdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the disk is -------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk size in bytes: the footer's current_size."""
        return self.footer.current_size

    @property
    def kind(self) -> Kind:
        return "dynamic" if self.footer.disk_type == DiskType.DYNAMIC else "fixed"

    @property
    def unique_id(self) -> uuid.UUID:
        return self.footer.unique_id

    @property
    def block_size(self) -> int:
        """The dynamic header's block size; for a fixed disk, the unit of
        :meth:`allocated_blocks` (2 MiB)."""
        return self.dynamic_header.block_size if self.dynamic_header else BLOCK_SIZE

    @property
    def bitmap_size(self) -> int:
        """Bytes of the sector bitmap before each block's data (0 for a fixed disk)."""
        return bitmap_size(self.block_size) if self.dynamic_header else 0

    def allocated_blocks(self) -> np.ndarray:
        """Indices of the blocks that have data in the file, ascending. Every block of a
        fixed disk is allocated."""
        if self.bat is None:
            return np.arange(block_count(self.size, self.block_size), dtype=np.int64)
        return np.flatnonzero(self.bat != UNUSED)

    def block_data_offset(self, index: int) -> int | None:
        """File offset of block ``index``'s data (after its sector bitmap), or None if the
        block is not allocated."""
        if self.bat is None:
            return index * self.block_size
        entry = int(self.bat[index])
        return None if entry == UNUSED else entry * SECTOR_SIZE + self.bitmap_size

    # -- content ----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk from ``offset`` (fewer only at its end).
        Unallocated blocks and sectors whose bitmap bit is clear read as zeros."""
        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: bad read offset {offset} length {length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if self.bat is None:
            return self._read_at(offset, end - offset)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            index, in_block = divmod(pos, self.block_size)
            n = min(self.block_size - in_block, end - pos)
            entry = int(self.bat[index])
            if entry == UNUSED:
                parts.append(bytes(n))
            else:
                slot = entry * SECTOR_SIZE
                data = self._read_at(slot + self.bitmap_size + in_block, n)
                parts.append(self._mask(data, self._bitmap(slot), in_block))
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_chunks(self, chunk: int = 4 * BLOCK_SIZE) -> Iterator[bytes]:
        """The whole virtual disk, in pieces of ``chunk`` bytes (the last may be shorter)."""
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        for offset in range(0, self.size, chunk):
            yield self.read(offset, chunk)

    # -- validation at open -----------------------------------------------------------

    def _fail(self, reason: str) -> NoReturn:
        raise InvalidVhd(self.name, reason)

    def _read_at(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(n)
        # A raw file may return short reads; loop until EOF.
        while len(data) < n:
            more = self._f.read(n - len(data))
            if not more:
                self._fail(
                    f"file ends at byte {offset + len(data)}, "
                    f"needed {n} bytes from {offset} (truncated)"
                )
            data += more
        return data

    def _open_footer(self) -> Footer:
        if self.file_size < FOOTER_SIZE:
            self._fail(f"file is {self.file_size} bytes, smaller than a VHD footer ({FOOTER_SIZE})")
        footer_offset = self.file_size - FOOTER_SIZE
        raw = self._read_at(footer_offset, FOOTER_SIZE)
        if raw[:8] != FOOTER_COOKIE:
            # A dynamic disk keeps a footer copy at offset 0: if only that one is there, the
            # end of the file (blocks and footer) is missing.
            if footer_offset and self._read_at(0, 8) == FOOTER_COOKIE:
                self._fail(
                    f"no footer at the end of the file (cookie {raw[:8]!r} at byte "
                    f"{footer_offset}) but a footer copy at offset 0: the file is truncated"
                )
            self._fail(
                f"bad footer cookie {raw[:8]!r} at byte {footer_offset} "
                f"(expected {FOOTER_COOKIE!r}): not a VHD"
            )
        footer = self._check_footer(raw, "footer")
        if footer.disk_type == DiskType.DIFFERENCING:
            self._fail("unsupported disk type 4 (differencing): only fixed and dynamic are read")
        if footer.disk_type not in (DiskType.FIXED, DiskType.DYNAMIC):
            self._fail(f"invalid disk type {footer.disk_type} (expected 2 fixed or 3 dynamic)")
        size = footer.current_size
        if size % SECTOR_SIZE or size > MAX_SIZE:
            self._fail(
                f"current_size {size} is not a multiple of {SECTOR_SIZE} "
                f"up to {MAX_SIZE} (2040 GiB)"
            )
        return footer

    def _check_footer(self, raw: bytes, what: str) -> Footer:
        footer = Footer.unpack(raw)
        # Computed over the raw bytes, so a change in the reserved tail counts too.
        computed = checksum(raw, FOOTER_CHECKSUM_OFFSET)
        if footer.checksum != computed:
            self._fail(
                f"{what} checksum 0x{footer.checksum:08x}, computed 0x{computed:08x} "
                f"(stale or corrupted {what})"
            )
        if footer.file_format_version != FILE_FORMAT_VERSION:
            self._fail(
                f"unsupported {what} file_format_version 0x{footer.file_format_version:08x} "
                f"(expected 0x{FILE_FORMAT_VERSION:08x})"
            )
        return footer

    def _open_dynamic(self) -> None:
        footer_offset = self.file_size - FOOTER_SIZE
        copy = self._read_at(0, FOOTER_SIZE)
        if copy[:8] != FOOTER_COOKIE:
            self._fail(f"dynamic disk without a footer copy at offset 0 (cookie {copy[:8]!r})")
        first = self._check_footer(copy, "footer copy at offset 0")
        for name in ("disk_type", "current_size", "data_offset", "unique_id"):
            mine, theirs = getattr(first, name), getattr(self.footer, name)
            if mine != theirs:
                self._fail(f"footer copy at offset 0 has {name} {mine}, the footer has {theirs}")

        data_offset = self.footer.data_offset
        if data_offset < FOOTER_SIZE or data_offset + DYNAMIC_HEADER_SIZE > footer_offset:
            self._fail(
                f"footer data_offset {data_offset}: the dynamic header must lie between byte "
                f"{FOOTER_SIZE} and the footer at {footer_offset}"
            )
        raw = self._read_at(data_offset, DYNAMIC_HEADER_SIZE)
        if raw[:8] != DYNAMIC_HEADER_COOKIE:
            self._fail(
                f"bad dynamic header cookie {raw[:8]!r} at byte {data_offset} "
                f"(expected {DYNAMIC_HEADER_COOKIE!r})"
            )
        header = DynamicHeader.unpack(raw)
        computed = checksum(raw, DYNAMIC_HEADER_CHECKSUM_OFFSET)
        if header.checksum != computed:
            self._fail(
                f"dynamic header checksum 0x{header.checksum:08x}, computed 0x{computed:08x}"
            )
        if header.header_version != HEADER_VERSION:
            self._fail(f"unsupported dynamic header_version 0x{header.header_version:08x}")
        bs = header.block_size
        if bs < SECTOR_SIZE or bs & (bs - 1):
            self._fail(f"block_size {bs} is not a power of two of at least {SECTOR_SIZE}")
        entries = header.max_table_entries
        if entries * bs < self.size:
            self._fail(
                f"max_table_entries {entries} of block_size {bs} cover {entries * bs} bytes, "
                f"less than current_size {self.size}"
            )
        table_end = header.table_offset + entries * 4
        if header.table_offset < FOOTER_SIZE or table_end > footer_offset:
            self._fail(
                f"BAT at table_offset {header.table_offset} with {entries} entries ends at byte "
                f"{table_end}, outside the file's data (bytes {FOOTER_SIZE}..{footer_offset})"
            )
        self.dynamic_header = header
        table = self._read_at(header.table_offset, entries * 4)
        bat = np.frombuffer(table, dtype=">u4").astype(np.uint32)
        metadata_end = max(table_end, data_offset + DYNAMIC_HEADER_SIZE)
        self._check_bat(bat, footer_offset, metadata_end)
        bat.flags.writeable = False
        self.bat = bat

    def _check_bat(self, bat: np.ndarray, footer_offset: int, metadata_end: int) -> None:
        """Every allocated block's slot (bitmap + whole block) must lie between the headers
        and the footer, and no two slots may overlap."""
        slot_size = self.bitmap_size + self.block_size
        used = np.flatnonzero(bat != UNUSED)
        starts = bat[used].astype(np.int64) * SECTOR_SIZE
        past_end = np.flatnonzero(starts + slot_size > footer_offset)
        if past_end.size:
            i = int(used[past_end[0]])
            self._fail(
                f"BAT entry {i} = sector {int(bat[i])}: block {i} would end at byte "
                f"{int(bat[i]) * SECTOR_SIZE + slot_size}, past the footer at byte {footer_offset} "
                f"(file truncated or BAT corrupted)"
            )
        inside = np.flatnonzero(starts < metadata_end)
        if inside.size:
            i = int(used[inside[0]])
            self._fail(
                f"BAT entry {i} = sector {int(bat[i])} points into the headers and BAT "
                f"(before byte {metadata_end})"
            )
        order = np.argsort(starts, kind="stable")
        overlap = np.flatnonzero(np.diff(starts[order]) < slot_size)
        if overlap.size:
            a, b = (int(used[order[overlap[0] + j]]) for j in (0, 1))
            self._fail(f"BAT entries {a} and {b} (sectors {int(bat[a])}, {int(bat[b])}) overlap")

    # -- sector bitmaps ---------------------------------------------------------------

    def _bitmap(self, slot: int) -> bytes:
        # Sequential reads hit the same block many times: keep the last bitmap.
        if self._bitmap_cache is None or self._bitmap_cache[0] != slot:
            self._bitmap_cache = (slot, self._read_at(slot, self.bitmap_size))
        return self._bitmap_cache[1]

    def _mask(self, data: bytes, bitmap: bytes, in_block: int) -> bytes:
        """``data`` (from ``in_block`` inside a block) with the sectors whose bitmap bit is
        clear set to zeros. Bit order: sector 0 is the most significant bit of byte 0."""
        if bitmap.count(0xFF) == len(bitmap):
            return data
        first = in_block // SECTOR_SIZE
        last = (in_block + len(data) - 1) // SECTOR_SIZE
        bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))[first : last + 1].astype(bool)
        if bits.all():
            return data
        keep = np.repeat(bits, SECTOR_SIZE)[in_block - first * SECTOR_SIZE :][: len(data)]
        out = np.frombuffer(data, dtype=np.uint8).copy()
        out[~keep] = 0
        return out.tobytes()
