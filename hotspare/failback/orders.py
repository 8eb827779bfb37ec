"""Failback orders: what the flow asks the restoring agent to do, one create-only version
chain per failback (``failback/<vm epoch>/orders/<version>.json``), carried out in order.

- ``apply``: write the data logs listed per disk (the replica's content at ``upto``);
- ``scan``: hash every block of each disk and upload the hash map (verification, and the
  full comparison when the changed blocks are not known);
- ``finish``: verification passed: adopt the verified hash maps as shipped in ``new_epoch``
  and return to normal protection.

The agent's answer is ``RestoreProgress`` in its heartbeat: the last order it completed,
its position inside the one it works on, and what it measured.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from hotspare import layout
from hotspare.catalog.model import utcnow
from hotspare.store.base import Store
from hotspare.versioned import commit, latest_version, load

OrderKind = Literal["apply", "scan", "finish"]


class DiskOrder(BaseModel):
    logs: list[str] = Field(default_factory=list, description="data log keys, applied in this order")
    bytes: int = Field(0, ge=0, description="bytes the logs cover")
    target: str | None = Field(None, description="write to this disk or image instead of the registered one")
    upto: tuple[int, int] | None = Field(None, description="replica position (epoch, seq) the content is from")


class Order(BaseModel):
    machine: str
    vm_epoch: int = Field(ge=1)
    version: int = Field(ge=0)
    label: str = Field(description="phase-1, catch-up-N, phase-2, verify, repair-N, finish")
    kind: OrderKind
    disks: dict[str, DiskOrder] = Field(default_factory=dict)
    new_epoch: int | None = None
    scans: dict[str, str] = Field(default_factory=dict, description="finish: disk -> verified hash map key")
    created_at: datetime = Field(default_factory=utcnow)

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.disks.values())


class DiskDivergence(BaseModel):
    """Blocks whose content differs from what the agent last shipped; ``key`` names the
    uploaded block indices. ``error`` when the disk could not be read (replacement hardware)."""

    blocks: int = -1
    bytes: int = 0
    key: str | None = None
    error: str | None = None


class RestoreProgress(BaseModel):
    vm_epoch: int
    done: int = Field(-1, description="the last order version completed")
    working: int | None = None
    position: int = Field(0, description="data logs of the working order applied and fsynced")
    applied_bytes: int = Field(0, description="bytes of the working (or last) order applied")
    apply_rate: float | None = Field(None, description="measured apply throughput, bytes/s")
    scan_rate: float | None = Field(None, description="measured hashing throughput, bytes/s")
    divergence: dict[str, DiskDivergence] = Field(default_factory=dict)
    scans: dict[str, str] = Field(default_factory=dict, description="disk -> hash map key of the last scan order")
    last_scan_bytes: dict[str, int] = Field(default_factory=dict,
                                            description="disk -> bytes the last scan read (the dirty blocks only "
                                                        "when the agent kept the previous scan's map)")
    error: str | None = Field(None, description="why the working order cannot be carried out")


def load_orders(store: Store, machine: str, vm_epoch: int, after: int = -1) -> list[Order]:
    """The orders of a failback past version ``after``, in order."""
    prefix = layout.failback_orders_prefix(machine, vm_epoch)
    newest = latest_version(store, prefix)
    if newest is None:
        return []
    return [load(store, prefix, v, Order) for v in range(after + 1, newest + 1)]


def find_order(store: Store, machine: str, vm_epoch: int, label: str) -> Order | None:
    return next((o for o in load_orders(store, machine, vm_epoch) if o.label == label), None)


def commit_order(store: Store, order: Order) -> Order:
    """Commit ``order`` create-only (AlreadyExists when that version exists)."""
    commit(store, layout.failback_orders_prefix(order.machine, order.vm_epoch), order)
    return order


PHASES = {"phase-1": "phase one", "catch-up": "phase one", "phase-2": "phase two", "repair": "repair"}


def bytes_per_phase(orders: list[Order]) -> dict[str, int]:
    """Bytes applied per phase: phase one (with its catch-up rounds), phase two, repair."""
    out: dict[str, int] = {}
    for o in orders:
        group = next((g for prefix, g in PHASES.items() if o.label.startswith(prefix)), None)
        if o.kind == "apply" and group:
            out[group] = out.get(group, 0) + o.bytes
    return out


def applied_upto(orders: list[Order], disk: str) -> tuple[int, int] | None:
    """The replica position of the last apply order's content for ``disk``."""
    ups = [o.disks[disk].upto for o in orders if o.kind == "apply" and disk in o.disks and o.disks[disk].upto]
    return tuple(ups[-1]) if ups else None  # type: ignore[return-value]
