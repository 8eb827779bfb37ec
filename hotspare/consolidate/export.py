"""Exporting a recovery point as a local disk image (raw, dynamic VHD or fixed VHD), read
from its chunks through :class:`~hotspare.replica.reader.ChunkReader`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

from hotspare.catalog import Catalog, RecoveryPoint
from hotspare.errors import HotspareError, UsageError
from hotspare.replica.index import read_root
from hotspare.replica.reader import ChunkReader
from hotspare.store.base import Store
from hotspare.vhd import VhdReader, write_dynamic, write_fixed, write_raw

ExportFormat = Literal["raw", "vhd", "vhd-fixed"]


def disk_uuid(machine: str, disk: str) -> uuid.UUID:
    """The VHD unique id of a disk: stable across its points, so hypervisors see one disk."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"hotspare:{machine}/{disk}")


def point_reader(store: Store, catalog: Catalog, point: RecoveryPoint) -> ChunkReader:
    """The reader of ``point``'s bytes; a UsageError for a point of the layout before chunks."""
    if not point.root:
        raise UsageError(f"{catalog.machine}/{catalog.disk} point {point.id} is in the layout before chunks (VHD "
                         f"points): run `hotspare consolidate {catalog.machine}` once to convert the disk")
    return ChunkReader(store, read_root(store, point.root))


def parse_at(at: str | None) -> datetime | None:
    """An ``--at`` argument (ISO time, ``Z`` allowed) as a datetime; UsageError when it is not one."""
    if not at:
        return None
    try:
        return datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {at!r}: not an ISO time such as 2026-11-25T13:00:00Z") from None


def find_point(catalog: Catalog, point_id: str | None = None, at: datetime | None = None, *,
               prefer_consistent: bool = False) -> RecoveryPoint:
    """The point named ``point_id``, or the newest at or before ``at``, or the newest; with
    ``prefer_consistent``, the newest crash-consistent one when there is one (a fuzzy point
    of a scanned live disk may not boot)."""
    pts = sorted(catalog.points, key=lambda p: p.position)
    if not pts:
        raise UsageError(f"{catalog.machine}/{catalog.disk} has no recovery point yet (run: hotspare consolidate {catalog.machine})")
    if point_id is not None:
        for p in pts:
            if p.id == point_id:
                return p
        raise UsageError(f"{catalog.machine}/{catalog.disk} has no point {point_id!r} (points: {', '.join(p.id for p in pts)})")
    if at is not None:
        if at.tzinfo is None:
            raise UsageError(f"--at {at.isoformat()}: give a time zone, e.g. {at.isoformat()}Z")
        before = [p for p in pts if p.time <= at]
        if not before:
            raise UsageError(f"no point at or before {at.isoformat()}: the oldest is {pts[0].id} at {pts[0].time.isoformat()}")
        return before[-1]
    consistent = [p for p in pts if p.consistent] if prefer_consistent else []
    return (consistent or pts)[-1]


def _write(source, size: int, fmt: ExportFormat, out: Path, uid) -> None:
    """Write the image beside ``out`` and rename it into place: ``out`` is either the whole
    new image or untouched, and a failed write (a full file system) leaves no temp file."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if fmt == "raw":
                write_raw(source, size, f)
            elif fmt == "vhd":
                write_dynamic(source, size, f, unique_id=uid)
            else:
                write_fixed(source, size, f, unique_id=uid)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _local_error(out: Path, err: OSError) -> HotspareError:
    return HotspareError(f"{out}: cannot write the export ({err.strerror or err}); nothing was written there, "
                         "free some space or choose another --out")


def export_point(store: Store, catalog: Catalog, point: RecoveryPoint, fmt: ExportFormat, out: Path,
                 progress: Callable[[int], None] | None = None) -> int:
    """Write ``point`` to ``out`` in ``fmt``; returns the disk size. A local write fault (a
    full file system, a file-size limit) is a HotspareError naming ``out``."""
    try:
        return _export_point(store, catalog, point, fmt, out, progress)
    except OSError as err:
        raise _local_error(out, err) from err


def _export_point(store: Store, catalog: Catalog, point: RecoveryPoint, fmt: ExportFormat, out: Path,
                  progress: Callable[[int], None] | None) -> int:
    size = catalog.disk_size
    uid = disk_uuid(catalog.machine, catalog.disk)

    def counted(read_at):
        def read(offset: int, length: int) -> bytes:
            data = read_at(offset, length)
            if progress:
                progress(len(data))
            return data
        return read

    if not point.root and point.vhd:  # not converted yet: its VHD object reads as well
        with store.open(point.vhd, buffer_size=4 << 20) as f:
            _write(counted(VhdReader(f, point.vhd).read), size, fmt, out, uid)
        return size
    _write(counted(point_reader(store, catalog, point).read), size, fmt, out, uid)
    return size
