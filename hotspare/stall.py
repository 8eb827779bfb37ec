"""Stalls: protection that stopped moving without anything failing loudly (issue 11).

A machine is *stalled* when its changes stop reaching its replica. Each kind is found from
the store alone, so ``hotspare status``, the ingest flow and the agent tell the same story:

- ``silent``: the machine is protected, but no heartbeat came for longer than its policy's
  window: the machine is down, or its agent stopped or cannot reach the store.
- ``resync-pending``: a rejected or damaged log left a hole in a disk's seq chain; nothing
  after the hole is accepted until the agent re-sends the disk (it does at its next cycle).
- ``seq-gap``: logs wait behind a missing seq for longer than the heartbeat window. The
  agent uploads a disk's logs in seq order, each after the previous one landed, so a log
  missing that long is lost, not late: ingest turns the gap into a resync request.
- ``not-ingested``: the agent ships, but its oldest log not yet accepted is older than the
  policy's RPO: no ingest runs (or it fails) and the replica falls behind.
- ``agent-stuck``: the agent heartbeats but its cycles fail on a local fault (its state
  directory, where logs are staged, is full): it says so in its heartbeat and an event
  and retries every cycle; nothing it read is lost.
- ``store-unreachable``: the agent could not reach the store for longer than the window;
  it says so in its log and in a Prefect event while it lasts, and in its heartbeat's
  ``last_stall`` once the store answers again.

Ages come from the store's clock (an object's modification time), never from the agent's.
Machines that are failing over, failed over or failing back are not judged: their silence
and their fenced logs are expected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from hotspare import layout
from hotspare.catalog import list_pending, load_catalog
from hotspare.catalog.model import utcnow

if TYPE_CHECKING:
    from hotspare.catalog import Catalog
    from hotspare.heartbeat import Heartbeat
    from hotspare.machine import MachineConfig
    from hotspare.store.base import ObjectInfo, Store

StallReason = Literal["silent", "resync-pending", "seq-gap", "not-ingested", "store-unreachable", "agent-stuck"]
STALLED_EVENT = "hotspare.machine.stalled"
RESUMED_EVENT = "hotspare.machine.resumed"


@dataclass(frozen=True)
class Stall:
    machine: str
    reason: StallReason
    detail: str  # one line: what is stuck, since when, what happens next
    disk: str | None = None
    seconds: float | None = None  # how long it has lasted, when known
    seq: int | None = None  # the seq the chain is stuck at (resync-pending, seq-gap)

    def payload(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        where = self.machine + (f"/{self.disk}" if self.disk else "")
        return f"{where}: stalled ({self.reason}): {self.detail}"


def _parse_time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def _age(when: datetime | None, now: datetime) -> float:
    return 0.0 if when is None else max(0.0, (now - when).total_seconds())


@dataclass(frozen=True)
class Gap:
    """Logs of the current epoch wait after a missing seq."""

    expects: int  # the first missing seq
    next_seq: int  # where the oldest waiting log starts
    waited: float  # seconds the oldest log after the gap has been in the store


def find_gap(catalog: Catalog, pending: list[ObjectInfo], now: datetime | None = None,
             applied: int | None = None) -> Gap | None:
    """The gap in the current epoch's chain that ``pending`` (unaccepted logs, listed by
    :func:`hotspare.catalog.list_pending`) waits on, if any; ``applied``: the last seq
    accepted, when an ingest just accepted more than ``catalog`` says."""
    now = now or utcnow()
    expects = (catalog.applied_seq(catalog.epoch) if applied is None else applied) + 1
    prefix = layout.logs_prefix(catalog.machine, catalog.disk, catalog.epoch)
    current = [(seqs, o) for o in pending if o.key.startswith(prefix) and (seqs := layout.parse_log_name(o.key))]
    if not current or any(first <= expects <= last for (first, last), _ in current):
        return None  # the next log is there (ingest accepts it), or nothing waits
    after = [(first, o) for (first, _), o in current if first > expects]
    if not after:
        return None
    return Gap(expects=expects, next_seq=min(f for f, _ in after),
               waited=max(_age(o.modified, now) for _, o in after))


def disk_stalls(catalog: Catalog, pending: list[ObjectInfo], cfg: MachineConfig,
                now: datetime | None = None) -> list[Stall]:
    """What keeps one disk's replica from moving: a resync asked for, a gap waited on for
    longer than the heartbeat window, or logs left unaccepted for longer than the RPO."""
    now = now or utcnow()
    out = []
    m, d = catalog.machine, catalog.disk
    if catalog.resync_from is not None:
        why = catalog.rejected[-1] if catalog.rejected else None
        out.append(Stall(m, "resync-pending", f"nothing after seq {catalog.resync_from - 1} is accepted until the "
                                             f"agent re-sends the disk (asked for a resync from seq "
                                             f"{catalog.resync_from}" + (f"; {why.key} was rejected: {why.reason}"
                                                                         if why else "") + ")",
                         disk=d, seconds=_age(why.rejected_at, now) if why else None, seq=catalog.resync_from))
        return out  # the gap and the waiting logs are this hole's consequences
    gap = find_gap(catalog, pending, now)
    if gap is not None and gap.waited > cfg.policy.heartbeat_window:
        out.append(Stall(m, "seq-gap", f"seq {gap.expects} never arrived: the log from seq {gap.next_seq} has waited "
                                       f"{gap.waited:.0f}s (heartbeat window {cfg.policy.heartbeat_window}s); the next "
                                       "ingest asks the agent for a resync", disk=d, seconds=gap.waited,
                         seq=gap.expects))
    current = [o for o in pending if o.key.startswith(layout.logs_prefix(m, d, catalog.epoch))]
    if gap is None and current:
        oldest = max(_age(o.modified, now) for o in current)
        if oldest > cfg.policy.rpo:
            out.append(Stall(m, "not-ingested", f"{len(current)} shipped log(s) not accepted, the oldest for "
                                                f"{oldest:.0f}s (RPO {cfg.policy.rpo}s): is the ingest deployment "
                                                "running?", disk=d, seconds=oldest))
    return out


def store_stalls(store: Store, cfg: MachineConfig) -> list[Stall]:
    """Every disk's stalls as the store shows them (a catalog read and a listing per disk)."""
    out = []
    for d in cfg.disks:
        cat = load_catalog(store, cfg.name, d.name, d.size)
        out += disk_stalls(cat, list_pending(store, cfg.name, d.name, cat), cfg)
    return out


def machine_stalls(store: Store, cfg: MachineConfig, state: str, hb: Heartbeat | None,
                   catalogs: dict[str, Catalog]) -> list[Stall]:
    """Every stall of a machine, from its heartbeat and each disk's catalog and pending logs."""
    if state != "protected":
        return []
    out = []
    if hb is not None and hb.mode == "normal" and hb.age > cfg.policy.heartbeat_window:
        out.append(Stall(cfg.name, "silent", f"no heartbeat for {hb.age:.0f}s (window {cfg.policy.heartbeat_window}s): "
                                             "the machine is down, or its agent stopped or cannot reach the store",
                         seconds=hb.age))
    elif hb is not None and hb.mode == "normal" and hb.stuck:
        out.append(Stall(cfg.name, "agent-stuck", str(hb.stuck.get("detail", "")),
                         seconds=_age(_parse_time(hb.stuck.get("since")), hb.time)))
    for disk, cat in catalogs.items():
        out += disk_stalls(cat, list_pending(store, cfg.name, disk, cat), cfg)
    return out
