"""Microsoft VHD (Virtual Hard Disk), fixed and dynamic: read, validate, write.

References: Microsoft "Virtual Hard Disk Image Format Specification" (version 1.0);
qemu's block/vpc.c.

Terms:
- sector: 512 bytes, the unit of every size and offset in the format.
- footer: the 512-byte record at the end of every VHD (cookie ``conectix``): disk type,
  current_size (the virtual disk size), geometry, unique_id, checksum. A dynamic disk also
  keeps a copy at offset 0.
- fixed disk: the disk's bytes as they are, then the footer.
- dynamic disk: a sparse VHD. The footer's data_offset points to the dynamic header.
- dynamic header: 1024 bytes (cookie ``cxsparse``) saying where the BAT is
  (table_offset), how many entries it has (max_table_entries) and the block_size.
- block: a 2 MiB piece of the virtual disk (block_size); block i covers bytes
  ``[i * block_size, (i + 1) * block_size)``.
- BAT (block allocation table): one big-endian uint32 per block, the sector number in the
  file where the block's slot starts, or UNUSED (0xFFFFFFFF): the block reads as zeros.
- sector bitmap: the bits stored in front of each allocated block's data, one per sector
  of the block (most significant bit first); a clear bit means the sector reads as zeros.
- checksum: the one's complement of the byte sum of a footer or dynamic header, its own
  field counted as zero.

Modules: :mod:`.spec` (layout and constants), :mod:`.layout` (where each byte of a VHD
hotspare writes goes), :mod:`.reader`, :mod:`.writer`, :mod:`.errors`.
"""

from hotspare.vhd.errors import InvalidVhd
from hotspare.vhd.layout import (
    DynamicLayout,
    bat_bytes,
    dynamic_header_bytes,
    footer_bytes,
    sector_bitmap_bytes,
)
from hotspare.vhd.reader import VhdReader
from hotspare.vhd.spec import BLOCK_SIZE, SECTOR_SIZE, UNUSED, VHD_EPOCH, Kind
from hotspare.vhd.writer import convert, write_dynamic, write_fixed, write_raw

__all__ = [
    "BLOCK_SIZE",
    "SECTOR_SIZE",
    "UNUSED",
    "VHD_EPOCH",
    "DynamicLayout",
    "InvalidVhd",
    "Kind",
    "VhdReader",
    "bat_bytes",
    "convert",
    "dynamic_header_bytes",
    "footer_bytes",
    "sector_bitmap_bytes",
    "write_dynamic",
    "write_fixed",
    "write_raw",
]
