"""The extent-log schema and file metadata, as fixed by DESIGN.md."""

from __future__ import annotations

import pyarrow as pa
import xxhash
from pydantic import BaseModel, Field

FORMAT_VERSION = 1
SECTOR = 512
META_KEY = b"hotspare"

SCHEMA = pa.schema(
    [
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("offset", pa.uint64(), nullable=False),
        pa.field("length", pa.uint32(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=True),
        pa.field("checksum", pa.uint64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# A row group holds at most this many data bytes, so a reader that wants one range
# never decodes more than this (and memory stays bounded while writing).
ROW_GROUP_BYTES = 16 << 20
# A single extent is split at this size, which bounds a row (and a row group) too.
MAX_EXTENT = 4 << 20


class LogMeta(BaseModel):
    """The file-level metadata of a log, stored as JSON under the ``hotspare`` key."""

    format_version: int = Field(description="extent-log format version")
    machine: str
    disk: str
    epoch: int = Field(ge=0)
    disk_size: int = Field(gt=0)
    sector_size: int = SECTOR
    first_seq: int = Field(ge=0)
    last_seq: int = Field(ge=0)
    # Set by an agent that re-sends a disk's content after a log was rejected: this log
    # replaces every seq from ``resync_from`` up to its own first seq.
    resync_from: int | None = None
    # The last log of a capture cycle: the disk's state after its last seq is a *cut*, the
    # only places recovery points are made. ``consistent`` says whether the cycle read a
    # frozen view (a crash-consistent cut) or a live disk (a fuzzy one, never trusted first).
    cut: bool = False
    consistent: bool = False


_ZERO_SUMS: dict[int, int] = {}


def zero_checksum(length: int) -> int:
    """xxh3-64 of ``length`` zero bytes (the checksum of a null-data row), memoised."""
    s = _ZERO_SUMS.get(length)
    if s is None:
        s = _ZERO_SUMS[length] = xxhash.xxh3_64_intdigest(bytes(length))
    return s
