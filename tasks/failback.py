"""Tasks of the failback flow: publishing orders (with the replica's content as data logs),
hashing the replica, and waiting for the restoring agent. Store I/O is retried when the
fault may pass; publishing is idempotent (an order of the same label is reused)."""

from __future__ import annotations

import os
import time

import numpy as np
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from hotspare.catalog import load_catalog
from hotspare.errors import AlreadyExists, HotspareError, LostRace
from hotspare.failback import ranges as rg
from hotspare.failback.content import hashes_at, point_hashes, materialise, replica_at, write_data_logs
from hotspare.failback.orders import DiskOrder, Order, RestoreProgress, commit_order, load_orders
from hotspare.failback.plan import Position
from hotspare.heartbeat import load_heartbeat
from hotspare.machine import DiskSpec
from hotspare.store import Store
from tasks.common import retry_transient

STORE_RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
ERROR_GRACE = 15.0  # seconds an agent's error may last (a store blip) before the run fails


def find_order(store: Store, machine: str, vm_epoch: int, label: str) -> Order | None:
    return next((o for o in load_orders(store, machine, vm_epoch) if o.label == label), None)


def _commit(store: Store, order: Order) -> Order:
    try:
        return commit_order(store, order)
    except AlreadyExists:
        raise LostRace(f"failback order {order.version} of {order.machine} was committed by another run") from None


@task(name="publish-apply", **STORE_RETRY)
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


@task(name="publish-order", **STORE_RETRY)
def publish(store: Store, machine: str, vm_epoch: int, label: str, kind: str, disks: list[DiskSpec],
            targets: dict[str, str], **fields) -> Order:
    """A ``scan`` or ``finish`` order (idempotent by label)."""
    if (old := find_order(store, machine, vm_epoch, label)) is not None:
        return old
    version = len(load_orders(store, machine, vm_epoch))
    return _commit(store, Order(machine=machine, vm_epoch=vm_epoch, version=version, label=label, kind=kind,
                                disks={d.name: DiskOrder(target=targets.get(d.name)) for d in disks}, **fields))


@task(name="replica-hashes", **STORE_RETRY)
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


def _resumed(store: Store, machine: str, order: Order) -> bool:
    """The agent adopted the finish order and already beats in normal mode in the new epoch."""
    hb = load_heartbeat(store, machine)
    return hb is not None and hb.mode == "normal" and hb.epoch == order.new_epoch


@task(name="wait-for-agent", cache_policy=NO_CACHE)
def wait_for_agent(store: Store, machine: str, order: Order, timeout: float, silence: float) -> RestoreProgress:
    """Poll the agent's heartbeat until it reports ``order`` done, with a progress artifact
    for apply orders. Fails when the agent stays silent or keeps reporting an error."""
    artifact = None
    if order.kind == "apply" and order.bytes:
        artifact = create_progress_artifact(0.0, description=f"{machine}: {order.label}, {order.bytes} bytes to apply")
    deadline = time.monotonic() + timeout
    silent_since = error_since = None
    while True:
        if order.kind == "finish" and _resumed(store, machine, order):
            return RestoreProgress(vm_epoch=order.vm_epoch, done=order.version)
        p = restore_progress(store, machine, order.vm_epoch, max_age=silence)
        now = time.monotonic()
        if p is not None and p.done >= order.version:
            if artifact:
                update_progress_artifact(artifact, 100.0)
            return p
        if p is None:
            silent_since = silent_since or now
            if now - silent_since > silence:
                raise HotspareError(f"{machine}'s agent stopped reporting in restore mode for {silence:.0f}s during "
                                    f"{order.label}; restart it with --restore and re-run the failback")
        else:
            silent_since = None
            if p.working == order.version and artifact:
                update_progress_artifact(artifact, min(99.9, 100.0 * p.applied_bytes / order.bytes))
            error_since = (error_since or now) if p.error else None
            if error_since and now - error_since > ERROR_GRACE:
                raise HotspareError(f"{machine}'s agent cannot carry out {order.label}: {p.error}")
        if now > deadline:
            raise HotspareError(f"{machine}'s agent did not finish {order.label} within {timeout:.0f}s")
        time.sleep(0.5)
