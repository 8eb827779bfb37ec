"""Loading and committing catalogs through the store."""

from __future__ import annotations

from hotspare import layout
from hotspare.catalog.model import Catalog
from hotspare.errors import InvalidObject
from hotspare.store.base import Store
from hotspare.versioned import commit, load_latest


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


def commit_catalog(store: Store, catalog: Catalog) -> None:
    """Commit ``catalog`` as its version, create-only (AlreadyExists if another won)."""
    commit(store, layout.catalog_prefix(catalog.machine, catalog.disk), catalog)
