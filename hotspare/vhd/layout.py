"""Where every byte of a VHD that hotspare writes goes, as pure functions of the disk size.

References: Microsoft "Virtual Hard Disk Image Format Specification"; qemu's block/vpc.c.

The writers (:mod:`hotspare.vhd.writer`) and any code that builds a VHD by composing byte
ranges (an S3 multipart upload copying unchanged blocks server-side) use these helpers, so
there is one source of truth for the layout. Nothing here does I/O.

A fixed VHD is the disk's bytes followed by the footer. A dynamic VHD written by hotspare is
laid out like qemu's::

    0                      footer copy (512)
    512                    dynamic header (1024)
    1536                   BAT (max_table_entries x 4 bytes, padded to a sector with 0xFF)
    first_block_offset     slot 0: sector bitmap (512) + block data (2 MiB)
    ...                    slot k holds the k-th allocated block, in the order given
    footer_offset          footer (512)

Terms: a *slot* is the place in the file of one allocated block (its sector bitmap then its
data); slots follow each other without gaps, in the order of ``DynamicLayout.allocated``.

Creator: the footer says ``creator_app = "qem2"``. qemu sizes a disk by its CHS geometry,
which rounds (64 MiB becomes 67,125,248 bytes), unless the creator is one it trusts for
current_size (``vpc_open`` in block/vpc.c): qemu 2.6 to 9.x trust ``qem2`` (what qemu itself
writes with ``force_size=on``), ``win `` (Hyper-V), ``d2v ``, ``CTXS`` and ``tap\\0``; qemu 10
trusts every creator except ``vpc `` and ``qemu``. ``qem2`` is the one value every qemu in use
reads as "exact size" without claiming to be Hyper-V. libvhdi (and Microsoft's readers,
per the specification) use current_size whatever the creator. Checked with Debian's
qemu-img 7.2 (``info -f vpc``) and libvhdi 20210425 (``vhdiinfo``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import numpy as np

from hotspare.errors import UsageError
from hotspare.vhd.spec import (
    BLOCK_SIZE,
    DYNAMIC_HEADER_COOKIE,
    DYNAMIC_HEADER_SIZE,
    FEATURES_RESERVED,
    FILE_FORMAT_VERSION,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_VERSION,
    MAX_SIZE,
    NO_DATA_OFFSET,
    SECTOR_SIZE,
    UNUSED,
    DiskType,
    DynamicHeader,
    Footer,
    Kind,
    bitmap_size,
    block_count,
    chs_geometry,
    to_timestamp,
)

CREATOR_APP: Final = b"qem2"
# What qemu writes with "qem2" (the Virtual PC 2007 version, 5.3), so our footers look like
# the exact-size footers qemu itself makes.
CREATOR_VERSION: Final = 0x00050003
CREATOR_HOST_OS: Final = b"Wi2k"
HEADER_OFFSET: Final = FOOTER_SIZE
TABLE_OFFSET: Final = HEADER_OFFSET + DYNAMIC_HEADER_SIZE


def check_size(size: int, what: str = "VHD") -> None:
    """Refuse a virtual size the writers cannot represent exactly."""
    if size <= 0 or size % SECTOR_SIZE:
        raise UsageError(f"{what}: size {size} is not a positive multiple of {SECTOR_SIZE} bytes")
    if size > MAX_SIZE:
        raise UsageError(
            f"{what}: size {size} exceeds the VHD maximum of {MAX_SIZE} bytes (2040 GiB)"
        )


def footer(size: int, kind: Kind, unique_id: uuid.UUID, timestamp: datetime | int) -> Footer:
    """The sealed footer hotspare writes for a disk of ``size`` bytes.

    ``timestamp`` is a datetime or already seconds since VHD_EPOCH.
    """
    check_size(size)
    seconds = timestamp if isinstance(timestamp, int) else to_timestamp(timestamp)
    disk_type = {"fixed": DiskType.FIXED, "dynamic": DiskType.DYNAMIC}[kind]
    return Footer(
        cookie=FOOTER_COOKIE,
        features=FEATURES_RESERVED,
        file_format_version=FILE_FORMAT_VERSION,
        data_offset=HEADER_OFFSET if kind == "dynamic" else NO_DATA_OFFSET,
        timestamp=seconds,
        creator_app=CREATOR_APP,
        creator_version=CREATOR_VERSION,
        creator_host_os=CREATOR_HOST_OS,
        original_size=size,
        current_size=size,
        # The specification's geometry (it rounds down); readers that matter use current_size.
        disk_geometry=chs_geometry(size),
        disk_type=disk_type,
        checksum=0,
        unique_id=unique_id,
        saved_state=0,
    ).sealed()


def footer_bytes(size: int, kind: Kind, unique_id: uuid.UUID, timestamp: datetime | int) -> bytes:
    """The 512 footer bytes (also the copy at offset 0 of a dynamic disk)."""
    return footer(size, kind, unique_id, timestamp).pack()


def dynamic_header_bytes(
    size: int, table_offset: int = TABLE_OFFSET, block_size: int = BLOCK_SIZE
) -> bytes:
    """The 1024 dynamic header bytes for a disk of ``size`` bytes whose BAT is at
    ``table_offset``."""
    check_size(size)
    return (
        DynamicHeader(
            cookie=DYNAMIC_HEADER_COOKIE,
            data_offset=NO_DATA_OFFSET,
            table_offset=table_offset,
            header_version=HEADER_VERSION,
            max_table_entries=block_count(size, block_size),
            block_size=block_size,
            checksum=0,
            parent_unique_id=uuid.UUID(int=0),
            parent_timestamp=0,
            parent_unicode_name=b"",
            parent_locators=b"",
        )
        .sealed()
        .pack()
    )


def bat_bytes(entries: np.ndarray) -> bytes:
    """The BAT as stored: big-endian uint32 sector numbers, padded to a sector multiple with
    UNUSED entries (0xFF bytes, as qemu pads)."""
    table = np.asarray(entries, dtype=np.uint32).astype(">u4").tobytes()
    pad = -len(table) % SECTOR_SIZE
    return table + b"\xff" * pad


def sector_bitmap_bytes(block_size: int = BLOCK_SIZE) -> bytes:
    """A full sector bitmap: every sector of the block holds data. Writers set every bit, as
    qemu does: a clear bit would make a reader return zeros for that sector, and marking
    zero sectors is an optimisation no reader needs."""
    return b"\xff" * bitmap_size(block_size)


@dataclass(frozen=True, eq=False)
class DynamicLayout:
    """The layout of a dynamic VHD of ``size`` bytes holding the blocks ``allocated`` (block
    indices, in the order their slots follow each other in the file).

    ``allocated`` may be any sequence of ints; it is kept as a read-only uint32 array.
    ``DynamicLayout(size)`` with no blocks already answers :meth:`slot_offset`, which does not
    depend on which blocks are allocated: a streaming writer places block k before it knows
    the rest, then builds the full layout for the BAT.
    """

    size: int
    allocated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        check_size(self.size)
        blocks = np.asarray(self.allocated, dtype=np.int64)
        if blocks.ndim != 1:
            raise ValueError(f"allocated must be a flat list of block indices, not {blocks.shape}")
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.max_table_entries):
            bad = int(blocks[(blocks < 0) | (blocks >= self.max_table_entries)][0])
            raise ValueError(f"block index {bad} outside 0..{self.max_table_entries - 1}")
        if np.unique(blocks).size != blocks.size:
            raise ValueError("allocated lists a block more than once")
        frozen = blocks.astype(np.uint32)
        frozen.flags.writeable = False
        object.__setattr__(self, "allocated", frozen)

    @property
    def max_table_entries(self) -> int:
        return block_count(self.size, self.block_size)

    @property
    def header_offset(self) -> int:
        return HEADER_OFFSET

    @property
    def table_offset(self) -> int:
        return TABLE_OFFSET

    @property
    def table_size(self) -> int:
        """BAT bytes on disk, padded to a sector."""
        return -(-self.max_table_entries * 4 // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.block_size)

    @property
    def slot_size(self) -> int:
        """Bytes of one slot: sector bitmap plus a whole block (the last block of a disk
        whose size is not a block multiple is stored whole, zero-padded: qemu refuses a file
        whose BAT points at a block that does not fit)."""
        return self.bitmap_size + self.block_size

    @property
    def first_block_offset(self) -> int:
        return self.table_offset + self.table_size

    def slot_offset(self, k: int) -> int:
        """File offset of slot ``k`` (the sector bitmap of the k-th allocated block); its
        data follows at ``slot_offset(k) + bitmap_size``."""
        return self.first_block_offset + k * self.slot_size

    def block_offset(self, index: int) -> int | None:
        """File offset of the slot of block ``index``, or None if it is not allocated."""
        where = np.flatnonzero(self.allocated == index)
        return self.slot_offset(int(where[0])) if where.size else None

    @property
    def footer_offset(self) -> int:
        return self.slot_offset(len(self.allocated))

    @property
    def file_size(self) -> int:
        return self.footer_offset + FOOTER_SIZE

    def bat(self) -> np.ndarray:
        """The BAT entries (uint32 sector numbers of each block's slot, UNUSED elsewhere)."""
        entries = np.full(self.max_table_entries, UNUSED, dtype=np.uint32)
        k = np.arange(len(self.allocated), dtype=np.int64)
        sectors = (self.first_block_offset + k * self.slot_size) // SECTOR_SIZE
        if sectors.size and sectors[-1] >= UNUSED:
            raise ValueError(f"slot at sector {int(sectors[-1])} beyond the BAT's 32-bit reach")
        entries[self.allocated] = sectors.astype(np.uint32)
        return entries

    def head_bytes(self, unique_id: uuid.UUID, timestamp: datetime | int) -> bytes:
        """Everything before slot 0: footer copy, dynamic header, BAT."""
        return (
            footer_bytes(self.size, "dynamic", unique_id, timestamp)
            + dynamic_header_bytes(self.size, self.table_offset, self.block_size)
            + bat_bytes(self.bat())
        )

    def tail_bytes(self, unique_id: uuid.UUID, timestamp: datetime | int) -> bytes:
        """The footer, at :attr:`footer_offset`."""
        return footer_bytes(self.size, "dynamic", unique_id, timestamp)
