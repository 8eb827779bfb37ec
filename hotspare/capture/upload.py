"""Shipping a finished extent log: close it, upload it create-only under its seq range.

Every capture (the agent's scan tracker, a QEMU VM's overlays, an EC2 instance's
snapshots) ends a log this way, so the rule is in one place: the key is the log's own seq
range, and a key that exists already means another capture ships the same disk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from hotspare import layout
from hotspare.errors import AlreadyExists, HotspareError, StagingError
from hotspare.extentlog import Extent, LogMeta, LogWriter
from hotspare.store.base import Store

# Logs close at about this many data bytes, in every capture.
DEFAULT_LOG_TARGET = 64 << 20


def upload_log(store: Store, writer: LogWriter, path: str, *, machine: str, disk: str, epoch: int,
               who: str = "capture", cut: bool = False, consistent: bool = False) -> tuple[str, LogMeta]:
    """Close ``writer`` (writing to the local file ``path``; ``cut`` and ``consistent`` as
    :meth:`LogWriter.close` takes them), upload it, remove the file; returns the log's key
    and metadata."""
    try:
        with staging(Path(path).parent):
            meta = writer.close(cut=cut, consistent=consistent)
        key = layout.log_key(machine, disk, epoch, meta.first_seq, meta.last_seq)
        try:
            store.put_staged(key, path, create_only=True)
        except AlreadyExists:
            # A retried upload whose first try landed (its answer was lost) finds its own
            # bytes there: that is success, not a second shipper.
            if not _same_object(store, key, path):
                raise HotspareError(f"{key} already exists with other content: is another {who} shipping "
                                    f"{machine} disk {disk}?") from None
    finally:
        Path(path).unlink(missing_ok=True)
    return key, meta


@contextmanager
def staging(where: str | os.PathLike) -> Iterator[None]:
    """Local writes of a log being staged in ``where``: an OSError (no space, a read-only
    file system) becomes a :class:`StagingError` naming the directory."""
    try:
        yield
    except OSError as err:
        raise StagingError(str(where), err) from err


def _same_object(store: Store, key: str, path: str) -> bool:
    try:
        if store.size(key) != os.path.getsize(path):
            return False
        with open(path, "rb") as f:
            return store.get(key) == f.read()
    except HotspareError:
        return False


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


def ship_cycle(store: Store, extents: Iterable[tuple[int, int, bytes | memoryview | None]], *, machine: str,
               disk: str, epoch: int, disk_size: int, last_seq: int, workdir: str | os.PathLike, consistent: bool,
               log_target: int = DEFAULT_LOG_TARGET, resync_from: int | None = None, who: str = "capture",
               on_upload: Callable[[str, LogMeta], None] | None = None,
               before_upload: Callable[[], None] | None = None,
               ends_cycle: Callable[[], bool] = lambda: True) -> list[str]:
    """Ship one capture cycle: ``extents`` ((offset, length, data or None for zeros)) become
    logs of about ``log_target`` data bytes whose seqs follow ``last_seq``, written in
    ``workdir`` and uploaded create-only in order; the last one is marked as the cycle's cut
    (``consistent`` when the cycle read a frozen view). ``on_upload(key, meta)`` runs after
    each upload, before the next log starts, and ``before_upload()`` before each; when
    ``ends_cycle()`` says the extents stopped short of the cycle's end, no log is a cut. Returns the keys (none for no extents)."""
    keys: list[str] = []
    writer: LogWriter | None = None
    tmp = ""
    ts = datetime.now(timezone.utc)

    def upload(cut: bool) -> None:
        nonlocal writer, tmp, last_seq, resync_from
        assert writer is not None
        if before_upload:
            before_upload()
        key, meta = upload_log(store, writer, tmp, machine=machine, disk=disk, epoch=epoch, who=who,
                               cut=cut, consistent=consistent)
        writer, tmp, resync_from, last_seq = None, "", None, meta.last_seq
        keys.append(key)
        if on_upload:
            on_upload(key, meta)

    try:
        for offset, length, data in extents:
            if writer is not None and writer.data_bytes + writer.rows * 64 >= log_target:
                upload(cut=False)  # full, and more follows: only the cycle's last log is its cut
            with staging(workdir):
                if writer is None:
                    fd, tmp = tempfile.mkstemp(prefix=f".{disk}-", suffix=".parquet", dir=workdir)
                    os.close(fd)
                    writer = LogWriter(tmp, machine=machine, disk=disk, epoch=epoch, disk_size=disk_size,
                                       resync_from=resync_from)
                writer.add(Extent(seq=last_seq + 1 + writer.rows, offset=offset, length=length, data=data, ts=ts))
        if writer is not None:
            upload(cut=ends_cycle())
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return keys
