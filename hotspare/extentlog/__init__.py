"""Extent logs: the Parquet files that carry a disk's writes to the store.

Terms:
- extent: one write, ``length`` bytes at byte ``offset`` of the disk; its ``data`` is the
  bytes, or null for a range that reads as zeros (a trim, or a block that became zero).
- seq: the write sequence number, strictly increasing within a disk's epoch, so a later
  extent supersedes an earlier one over the bytes they share.
- log: one Parquet file of extents with consecutive seqs ``first_seq..last_seq``, stored at
  ``machines/<m>/disks/<d>/epochs/<e>/logs/<first_seq>-<last_seq>.parquet``.

The schema and the rules a reader enforces are DESIGN.md's; :mod:`.schema` holds them.
"""

from hotspare.extentlog.reader import LogInfo, read_log_info, validate_log, iter_extents
from hotspare.extentlog.schema import FORMAT_VERSION, LogMeta, SCHEMA
from hotspare.extentlog.writer import Extent, LogWriter, write_log

__all__ = [
    "FORMAT_VERSION",
    "SCHEMA",
    "Extent",
    "LogInfo",
    "LogMeta",
    "LogWriter",
    "iter_extents",
    "read_log_info",
    "validate_log",
    "write_log",
]
