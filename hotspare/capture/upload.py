"""Shipping a finished extent log: close it, upload it create-only under its seq range.

Every capture (the agent's scan tracker, a QEMU VM's overlays, an EC2 instance's
snapshots) ends a log this way, so the rule is in one place: the key is the log's own seq
range, and a key that exists already means another capture ships the same disk.
"""

from __future__ import annotations

from pathlib import Path

# Logs close at about this many data bytes, in every capture.
DEFAULT_LOG_TARGET = 64 << 20

from hotspare import layout
from hotspare.errors import AlreadyExists, HotspareError
from hotspare.extentlog import LogMeta, LogWriter
from hotspare.store.base import Store


def upload_log(store: Store, writer: LogWriter, path: str, *, machine: str, disk: str, epoch: int,
               who: str = "capture", cut: bool = False, consistent: bool = False) -> tuple[str, LogMeta]:
    """Close ``writer`` (writing to the local file ``path``; ``cut`` and ``consistent`` as
    :meth:`LogWriter.close` takes them), upload it, remove the file; returns the log's key
    and metadata."""
    try:
        meta = writer.close(cut=cut, consistent=consistent)
        key = layout.log_key(machine, disk, epoch, meta.first_seq, meta.last_seq)
        try:
            store.put_file(key, path, create_only=True)
        except AlreadyExists:
            raise HotspareError(f"{key} already exists: is another {who} shipping {machine} disk {disk}?") from None
    finally:
        Path(path).unlink(missing_ok=True)
    return key, meta


def last_seq_in_store(store: Store, machine: str, disk: str, epoch: int, known: int) -> int:
    """The highest seq of the epoch in the store, at least ``known`` (the last one the
    capture persisted): a crash after an upload but before the capture saved its state
    leaves such a log, and new logs must not reuse its seqs."""
    prefix = layout.logs_prefix(machine, disk, epoch)
    after = f"{prefix}{layout.num(known)}-~" if known >= 0 else None
    last = known
    for info in store.list(prefix, start_after=after):
        seqs = layout.parse_log_name(info.key)
        if seqs and seqs[1] > last:
            last = seqs[1]
    return last
