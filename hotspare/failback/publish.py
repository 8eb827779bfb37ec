"""The flow's side of the channel to the restoring agent: publishing orders (with the
replica's content as data logs), hashing the replica, and reading the agent's progress
from its heartbeat. Publishing is idempotent: an order of the same label is reused.
``tasks/failback.py`` gives these retries as Prefect tasks."""

from __future__ import annotations

import os

import numpy as np

from hotspare.catalog import load_catalog
from hotspare.errors import AlreadyExists, LostRace
from hotspare.failback import ranges as rg
from hotspare.failback.content import hashes_at, materialise, point_hashes, replica_at, write_data_logs
from hotspare.failback.orders import DiskOrder, Order, RestoreProgress, commit_order, find_order, load_orders
from hotspare.failback.plan import Position
from hotspare.heartbeat import load_heartbeat
from hotspare.machine import DiskSpec
from hotspare.store.base import Store


def _commit(store: Store, order: Order) -> Order:
    try:
        return commit_order(store, order)
    except AlreadyExists:
        raise LostRace(f"failback order {order.version} of {order.machine} was committed by another run") from None


def publish_apply(store: Store, machine: str, vm_epoch: int, label: str, disks: list[DiskSpec],
                  uptos: dict[str, Position], moves: dict[str, rg.Ranges], targets: dict[str, str]) -> Order:
    """The replica's content (at each disk's position) for the ranges to move, as data
    logs, and the order to apply them; an existing order of that label is returned as is."""
    if (old := find_order(store, machine, vm_epoch, label)) is not None:
        return old
    version = len(load_orders(store, machine, vm_epoch))
    orders = {}
    for d in disks:
        rep = replica_at(store, load_catalog(store, machine, d.name, d.size), uptos[d.name])
        with materialise(store, rep, moves[d.name], d.block_size) as fd:
            keys, _ = write_data_logs(store, lambda off, n: os.pread(fd, n, off), moves[d.name], machine=machine,
                                      disk=d.name, disk_size=d.size, vm_epoch=vm_epoch, order=version)
        orders[d.name] = DiskOrder(logs=keys, bytes=rg.total(moves[d.name]), target=targets.get(d.name),
                                   upto=uptos[d.name])
    return _commit(store, Order(machine=machine, vm_epoch=vm_epoch, version=version, label=label, kind="apply",
                                disks=orders))


def publish(store: Store, machine: str, vm_epoch: int, label: str, kind: str, disks: list[DiskSpec],
            targets: dict[str, str], **fields) -> Order:
    """A ``scan`` or ``finish`` order (idempotent by label)."""
    if (old := find_order(store, machine, vm_epoch, label)) is not None:
        return old
    version = len(load_orders(store, machine, vm_epoch))
    return _commit(store, Order(machine=machine, vm_epoch=vm_epoch, version=version, label=label, kind=kind,
                                disks={d.name: DiskOrder(target=targets.get(d.name)) for d in disks}, **fields))


def hash_replica(store: Store, machine: str, vm_epoch: int, disk: DiskSpec, upto: Position) -> np.ndarray:
    """The replica's block hashes at ``upto``: its base point's from the index, the blocks the
    later logs touch re-hashed."""
    rep = replica_at(store, load_catalog(store, machine, disk.name, disk.size), upto)
    return hashes_at(store, rep, disk, point_hashes(store, rep.catalog, rep.base, disk.block_size))


def restore_progress(store: Store, machine: str, vm_epoch: int, max_age: float) -> RestoreProgress | None:
    """The restoring agent's progress from a fresh restore-mode heartbeat, or None."""
    hb = load_heartbeat(store, machine)
    if hb is None or hb.mode != "restore" or hb.restore is None or hb.age > max_age:
        return None
    return hb.restore if hb.restore.vm_epoch == vm_epoch else None


def resumed(store: Store, order: Order) -> bool:
    """The agent adopted the finish ``order`` and already beats in normal mode in the new epoch."""
    hb = load_heartbeat(store, order.machine)
    return hb is not None and hb.mode == "normal" and hb.epoch == order.new_epoch
