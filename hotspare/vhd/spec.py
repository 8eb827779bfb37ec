"""On-disk layout of a Microsoft VHD: constants, the footer and the dynamic header.

References: Microsoft "Virtual Hard Disk Image Format Specification" (version 1.0, 2006);
qemu's block/vpc.c (what qemu writes and what it trusts).

Only the layout lives here: what each byte means, how to pack and unpack it, the checksum
and the CHS geometry. Reading and writing whole files is in :mod:`hotspare.vhd.reader` and
:mod:`hotspare.vhd.writer`. Every integer on disk is big-endian. Field names follow the
specification (``data_offset``, ``table_offset``, ``max_table_entries``, ``block_size``,
``current_size``, ``original_size``, ``creator_app``, ...).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Final, Literal

SECTOR_SIZE: Final = 512
# The block size every common writer (Hyper-V, qemu, Virtual PC) uses for dynamic disks.
BLOCK_SIZE: Final = 2 << 20
# Footer timestamps count seconds from this instant.
VHD_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
# The specification's limit (and qemu's, VHD_MAX_SECTORS): 2040 GiB.
MAX_SIZE: Final = 0xFF000000 * SECTOR_SIZE

FOOTER_SIZE: Final = 512
DYNAMIC_HEADER_SIZE: Final = 1024
FOOTER_COOKIE: Final = b"conectix"
DYNAMIC_HEADER_COOKIE: Final = b"cxsparse"
# Footer "features": bit 1 is reserved and must always be set.
FEATURES_RESERVED: Final = 0x00000002
FILE_FORMAT_VERSION: Final = 0x00010000
HEADER_VERSION: Final = 0x00010000
# "No next structure": the footer's data_offset of a fixed disk, the dynamic header's
# data_offset. The specification says 0xFFFFFFFF but writers set all 64 bits (see vpc.c).
NO_DATA_OFFSET: Final = 0xFFFFFFFFFFFFFFFF
# A BAT entry for a block that has no data in the file (reads as zeros).
UNUSED: Final = 0xFFFFFFFF

# The CHS geometry's largest value, 65535 cylinders x 16 heads x 255 sectors per track.
CHS_MAX_CYLINDERS: Final = 65535
CHS_MAX_HEADS: Final = 16
CHS_MAX_SECTORS_PER_TRACK: Final = 255

Kind = Literal["fixed", "dynamic"]


class DiskType(IntEnum):
    NONE = 0
    FIXED = 2
    DYNAMIC = 3
    DIFFERENCING = 4


# Footer fields in order; ``427x`` is the reserved tail, zero on disk.
_FOOTER = struct.Struct(">8sII Q I 4sI4s QQ HBB I I 16s B 427x")
FOOTER_CHECKSUM_OFFSET: Final = 64
# Dynamic header fields in order; parent fields matter only for differencing disks.
_DYNAMIC_HEADER = struct.Struct(">8s QQ II I I 16s I 4x 512s 192s 256x")
DYNAMIC_HEADER_CHECKSUM_OFFSET: Final = 36
assert _FOOTER.size == FOOTER_SIZE and _DYNAMIC_HEADER.size == DYNAMIC_HEADER_SIZE


def checksum(data: bytes, checksum_offset: int) -> int:
    """The one's complement of the sum of all bytes, the 4-byte checksum field (at
    ``checksum_offset``) counted as zero."""
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def to_timestamp(when: datetime) -> int:
    """Seconds since :data:`VHD_EPOCH`, as the footer stores them."""
    return int((when - VHD_EPOCH).total_seconds()) & 0xFFFFFFFF


def from_timestamp(seconds: int) -> datetime:
    return VHD_EPOCH + timedelta(seconds=seconds)


@dataclass(frozen=True)
class DiskGeometry:
    """Cylinders, heads, sectors per track. Virtual PC sizes a disk by their product;
    Hyper-V, Azure and qemu (for creators it trusts) use the footer's current_size."""

    cylinders: int
    heads: int
    sectors_per_track: int

    @property
    def sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    def pack(self) -> int:
        return (self.cylinders << 16) | (self.heads << 8) | self.sectors_per_track

    @classmethod
    def unpack(cls, value: int) -> DiskGeometry:
        return cls(value >> 16, (value >> 8) & 0xFF, value & 0xFF)


def chs_geometry(size: int) -> DiskGeometry:
    """The specification's CHS algorithm (appendix "CHS Calculation"), for ``size`` bytes.

    It rounds down: the product of the result can be smaller than the disk, which is why a
    reader must be told (by the creator) to use current_size instead.
    """
    total = min(size // SECTOR_SIZE, CHS_MAX_CYLINDERS * CHS_MAX_HEADS * CHS_MAX_SECTORS_PER_TRACK)
    if total >= CHS_MAX_CYLINDERS * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinders_times_heads = total // sectors_per_track
    else:
        sectors_per_track = 17
        cylinders_times_heads = total // sectors_per_track
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinders_times_heads = total // sectors_per_track
        if cylinders_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinders_times_heads = total // sectors_per_track
    return DiskGeometry(cylinders_times_heads // heads, heads, sectors_per_track)


@dataclass(frozen=True)
class Footer:
    """The hard disk footer: the last 512 bytes of every VHD (and a copy at offset 0 of a
    dynamic one). ``checksum`` is the value as stored; :meth:`sealed` recomputes it."""

    cookie: bytes
    features: int
    file_format_version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    disk_geometry: DiskGeometry
    disk_type: int
    checksum: int
    unique_id: uuid.UUID
    saved_state: int

    def pack(self) -> bytes:
        return _FOOTER.pack(
            self.cookie,
            self.features,
            self.file_format_version,
            self.data_offset,
            self.timestamp,
            self.creator_app,
            self.creator_version,
            self.creator_host_os,
            self.original_size,
            self.current_size,
            self.disk_geometry.cylinders,
            self.disk_geometry.heads,
            self.disk_geometry.sectors_per_track,
            self.disk_type,
            self.checksum,
            self.unique_id.bytes,
            self.saved_state,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Footer:
        (cookie, features, version, data_offset, timestamp, app, app_version, host_os,
         original_size, current_size, cylinders, heads, sectors_per_track, disk_type,
         stored_checksum, unique_id, saved_state) = _FOOTER.unpack(data[:FOOTER_SIZE])  # fmt: skip
        return cls(
            cookie, features, version, data_offset, timestamp, app, app_version, host_os,
            original_size, current_size, DiskGeometry(cylinders, heads, sectors_per_track),
            disk_type, stored_checksum, uuid.UUID(bytes=unique_id), saved_state,
        )  # fmt: skip

    def computed_checksum(self) -> int:
        return checksum(self.pack(), FOOTER_CHECKSUM_OFFSET)

    def sealed(self) -> Footer:
        """This footer with its checksum field set to the checksum of its content."""
        return replace(self, checksum=self.computed_checksum())


@dataclass(frozen=True)
class DynamicHeader:
    """The dynamic disk header (1024 bytes, at the footer's data_offset) of a dynamic or
    differencing disk: where the BAT is, how many entries it has, the block size."""

    cookie: bytes
    data_offset: int
    table_offset: int
    header_version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_unique_id: uuid.UUID
    parent_timestamp: int
    parent_unicode_name: bytes
    parent_locators: bytes

    def pack(self) -> bytes:
        return _DYNAMIC_HEADER.pack(
            self.cookie,
            self.data_offset,
            self.table_offset,
            self.header_version,
            self.max_table_entries,
            self.block_size,
            self.checksum,
            self.parent_unique_id.bytes,
            self.parent_timestamp,
            self.parent_unicode_name,
            self.parent_locators,
        )

    @classmethod
    def unpack(cls, data: bytes) -> DynamicHeader:
        (cookie, data_offset, table_offset, version, max_table_entries, block_size,
         stored_checksum, parent_unique_id, parent_timestamp, parent_name,
         parent_locators) = _DYNAMIC_HEADER.unpack(data[:DYNAMIC_HEADER_SIZE])  # fmt: skip
        return cls(
            cookie, data_offset, table_offset, version, max_table_entries, block_size,
            stored_checksum, uuid.UUID(bytes=parent_unique_id), parent_timestamp,
            parent_name, parent_locators,
        )  # fmt: skip

    def computed_checksum(self) -> int:
        return checksum(self.pack(), DYNAMIC_HEADER_CHECKSUM_OFFSET)

    def sealed(self) -> DynamicHeader:
        return replace(self, checksum=self.computed_checksum())


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap before each block's data: one bit per sector, padded to
    a sector (512 bytes for a 2 MiB block)."""
    bits_bytes = block_size // SECTOR_SIZE // 8
    return -(-bits_bytes // SECTOR_SIZE) * SECTOR_SIZE


def block_count(size: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks needed to cover ``size`` bytes; the last one may be partly past the disk end."""
    return -(-size // block_size)
