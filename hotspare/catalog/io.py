"""Loading and committing catalogs through the store."""

from __future__ import annotations

from hotspare import layout
from hotspare.catalog.model import Catalog
from hotspare.catalog.segments import seal
from hotspare.errors import AlreadyExists, InvalidObject
from hotspare.faults import crash_point
from hotspare.store.base import Store
from hotspare.versioned import commit, latest_version, load_latest


def load_catalog(store: Store, machine: str, disk: str, disk_size: int) -> Catalog:
    """The newest catalog of a disk; version 0 (nothing applied) when none was committed."""
    prefix = layout.catalog_prefix(machine, disk)
    cat = load_latest(store, prefix, Catalog)
    if cat is None:
        return Catalog(machine=machine, disk=disk, version=0, disk_size=disk_size)
    if (cat.machine, cat.disk) != (machine, disk):
        raise InvalidObject(layout.catalog_key(machine, disk, cat.version),
                            f"belongs to {cat.machine}/{cat.disk}, not {machine}/{disk}")
    return cat


def commit_catalog(store: Store, catalog: Catalog) -> Catalog:
    """Commit ``catalog`` as its version, create-only (AlreadyExists if another won), and
    return it as committed: first its long tail goes into new manifests (see
    :mod:`hotspare.catalog.segments`), so callers must use the returned catalog."""
    prefix = layout.catalog_prefix(catalog.machine, catalog.disk)
    try:
        sealed = seal(store, catalog)
    except InvalidObject as err:
        # A manifest to merge is gone: a newer commit dropped it and its sweep deleted it.
        if (latest_version(store, prefix) or 0) >= catalog.version:
            raise AlreadyExists(layout.catalog_key(catalog.machine, catalog.disk, catalog.version),
                                f"a newer catalog was committed while this one was sealed ({err})") from err
        raise
    crash_point("catalog-before-commit")
    commit(store, prefix, sealed)
    return sealed
