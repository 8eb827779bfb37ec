"""VHD objects: a point written as a real VHD under ``vhd/`` in the store, for hypervisors
and cloud imports (AWS VM Import reads a VHD from S3). Dynamic (sparse) or fixed, never
differencing (qemu reads those back wrong without an error; DESIGN.md).

The VHD is written to a local temporary file from the point's chunks, uploaded create-only
under a key of the catalog version that names it, then committed; a crash leaves an object
no catalog names, which garbage collection removes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from hotspare import layout
from hotspare.catalog import Catalog, RecoveryPoint, commit_catalog, load_catalog
from hotspare.consolidate.export import ExportFormat, export_point
from hotspare.errors import AlreadyExists, HotspareError, UsageError
from hotspare.faults import crash_point
from hotspare.machine import DiskSpec
from hotspare.store.base import Store

MAX_RACES = 5


def make_vhd_object(store: Store, machine: str, disk: DiskSpec, point_id: str | None = None, *,
                    fmt: ExportFormat = "vhd", keep_others: bool = True,
                    progress: Callable[[int], None] | None = None,
                    commit: Callable[[Store, Catalog], Catalog] = commit_catalog) -> tuple[RecoveryPoint, str, bool]:
    """Make the VHD object of ``point_id`` (default: the newest point) and name it in the
    catalog; returns (point, key, made). ``keep_others=False`` stops naming the VHD
    objects of other points (the scheduled refresh keeps the newest only)."""
    from hotspare.consolidate.export import find_point

    if fmt not in ("vhd", "vhd-fixed"):
        raise UsageError(f"--format {fmt!r}: a VHD object is vhd (dynamic) or vhd-fixed")
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        point = find_point(catalog, point_id)
        name = f"{point.id}-{'dynamic' if fmt == 'vhd' else 'fixed'}"
        key = catalog.vhd_objects.get(point.id)
        if key and key.endswith(f"-{name}.vhd") and (keep_others or len(catalog.vhd_objects) == 1):
            return point, key, False
        key = layout.vhd_object_key(machine, disk.name, catalog.version + 1, name)
        with tempfile.TemporaryDirectory(prefix="hotspare-vhd-") as d:
            local = Path(d) / "point.vhd"
            export_point(store, catalog, point, fmt, local, progress)
            try:
                store.put_staged(key, str(local), create_only=True)
            except AlreadyExists:
                continue  # a racing run of this catalog version: re-plan from the next
        crash_point("vhd-before-commit")
        named = dict(catalog.vhd_objects) if keep_others else {}
        named[point.id] = key
        try:
            commit(store, catalog.next(vhd_objects=named))
        except AlreadyExists:
            continue
        return point, key, True
    raise HotspareError(f"VHD object of {machine}/{disk.name} lost {MAX_RACES} catalog races in a row")
