"""The way back from an object the catalog names that is missing or damaged.

- damaged log: an accepted log that is gone from the store, does not decode, or whose rows
  fail their checksums. It cannot be replayed, so the catalog drops it (recording why, and
  the log goes to quarantine), and asks the agent to re-send the disk (``resync_from``): a
  resync re-sends every block, so it supersedes what the lost log held. Until it arrives no
  point is made past the lost log: the accepted logs after it lose their cut.
- damaged current VHD: the newest point's VHD object is gone or does not parse. When the
  base is another VHD, the damaged point becomes a point between base and current (base
  plus its logs, which are kept) and the next point is rebuilt from the base. When it was
  the only VHD, the disk's points are dropped and the agent is asked to re-send the disk,
  from which the next point is built from nothing.

Points, logs and VHDs that are sound are never touched; older catalog versions keep the
history as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotspare.catalog import AcceptedLog, Catalog, RejectedLog, catalog_logs
from hotspare.errors import HotspareError, InvalidLog
from hotspare.store.base import Store


class _Damaged(HotspareError):
    """An object the catalog names, missing or damaged: ``key`` and ``reason``."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")

    def __reduce__(self):  # picklable with its fields (a task's error crosses to its flow)
        return (type(self), (self.key, self.reason))


class DamagedVhd(_Damaged):
    """A VHD object the catalog names (the layout before chunks) is missing or does not parse."""


class DamagedPoint(_Damaged):
    """An object of the current point's index (its root, a page, a pack it reads) is missing
    or fails its checksum."""


class DamagedObject(HotspareError):
    """Consolidation stopped at a missing or damaged object; the message says how it recovers."""


@dataclass
class Repair:
    catalog: Catalog  # the next catalog version, to commit create-only
    message: str  # what happened and what recovers it
    quarantine: str | None = None  # the damaged log to move to quarantine after the commit
    wait_for_resync: bool = False  # nothing more can be consolidated until the agent re-sends


def repair(store: Store, catalog: Catalog, err: HotspareError) -> Repair | None:
    """The repair of ``catalog`` for ``err``, or None when ``err`` is not damage of an object
    this catalog names (then it is re-raised as it is)."""
    current = catalog.point("current")
    # Only a log past the current point: older ones hold points between base and current,
    # and rebuilding a base without them would be silently wrong.
    after = current.position if current else None
    newer = catalog_logs(store, catalog, after=after) if isinstance(err, InvalidLog) else []
    if any(lg.key == err.key for lg in newer):
        return _drop_log(store, catalog, err, after)  # type: ignore[arg-type]
    if isinstance(err, DamagedVhd) and err.key == catalog.vhd.get("current"):
        return _drop_current(store, catalog, err)
    if isinstance(err, DamagedPoint):
        return _drop_damaged_points(store, catalog, err)
    return None


def _names(store: Store, root_key: str, key: str) -> bool:
    """Whether the index root ``root_key`` names ``key`` (as itself, a page or a pack); an
    unreadable root counts as naming it."""
    from hotspare.replica.index import read_root

    if root_key == key:
        return True
    try:
        root = read_root(store, root_key)
    except HotspareError:
        return True
    return any(r.key == key for r in root.pages.values()) or any(r.key == key for r in root.packs.values())


def _drop_damaged_points(store: Store, catalog: Catalog, err: DamagedPoint) -> Repair:
    """Every point whose index names the damaged object is dropped; the next point is
    rebuilt from the newest sound one plus its logs, or from a resync when none is left."""
    bad = [p for p in catalog.points if p.root and _names(store, p.root, err.key)]
    left = [p for p in catalog.points if p not in bad]
    dropped = ", ".join(p.id for p in bad) or "none"
    if left:
        nxt = catalog.next(points=left)
        return Repair(nxt, f"{err}: point(s) {dropped} read from it and were dropped (catalog v{nxt.version}); the "
                           f"next point is rebuilt from point {left[-1].id} and the logs after it")
    seq = _resync_from(catalog)
    uncut = lambda logs: [lg.model_copy(update={"cut": False}) for lg in logs]  # noqa: E731
    nxt = catalog.next(points=[], vhd={}, **_rewrite(store, catalog, None, uncut), resync_from=seq)
    return Repair(nxt, f"{err}: every point of the disk reads from it. Its points ({dropped}) were dropped (catalog "
                       f"v{nxt.version}; v{catalog.version} keeps them) and the agent is asked to re-send the disk "
                       f"(resync from seq {seq}): run the agent, then consolidate again to build a new point from it",
                  wait_for_resync=True)


def _rewrite(store: Store, catalog: Catalog, after: tuple[int, int] | None, change) -> dict:
    """The catalog changes that pass the accepted logs after ``after`` through ``change``:
    manifests wholly at or before it stay as they are; the rest of the logs go inline, and
    the commit seals them into manifests again."""
    lo = after or (-1, -1)
    keep = [r for r in catalog.manifests if r.last <= lo]
    start = max((r.last for r in keep), default=None)
    logs = catalog_logs(store, catalog, after=start)
    return dict(manifests=keep, tail=[lg for lg in logs if lg.position <= lo] +
                change([lg for lg in logs if lg.position > lo]))


def _resync_from(catalog: Catalog) -> int:
    return catalog.applied_seq(catalog.epoch) + 1


def _drop_log(store: Store, catalog: Catalog, err: InvalidLog, after: tuple[int, int] | None) -> Repair:
    def change(newer: list[AcceptedLog]) -> list[AcceptedLog]:
        bad = next(lg for lg in newer if lg.key == err.key)
        return [lg if lg.position < bad.position else lg.model_copy(update={"cut": False})
                for lg in newer if lg.key != err.key]

    seq = _resync_from(catalog)
    reason = f"accepted, then found damaged by consolidation: {err.detail}"
    nxt = catalog.next(**_rewrite(store, catalog, after, change), resync_from=seq,
                       rejected=catalog.rejected + [RejectedLog(key=err.key, reason=reason)])
    return Repair(nxt, f"{err}: the log cannot be replayed; nothing was consolidated past it. It was dropped from "
                       f"the catalog (v{nxt.version}) and quarantined, and the agent is asked to re-send the disk "
                       f"(resync from seq {seq}): run the agent, then consolidate again",
                  quarantine=err.key, wait_for_resync=True)


def _drop_current(store: Store, catalog: Catalog, err: DamagedVhd) -> Repair:
    base = catalog.vhd.get("base")
    if base and base != err.key:
        points = [p.model_copy(update={"vhd": ""}) if p.vhd == err.key else p for p in catalog.points]
        nxt = catalog.next(points=points, vhd={**catalog.vhd, "current": base})
        return Repair(nxt, f"{err}: the current VHD is damaged; its point is kept as base plus logs, and the next "
                           f"point is rebuilt from the base {base} (catalog v{nxt.version})")
    seq = _resync_from(catalog)
    uncut = lambda logs: [lg.model_copy(update={"cut": False}) for lg in logs]  # noqa: E731
    nxt = catalog.next(points=[], vhd={}, **_rewrite(store, catalog, None, uncut), resync_from=seq)
    return Repair(nxt, f"{err}: the current VHD is damaged and no other VHD of the disk can rebuild it. Its points "
                       f"were dropped (catalog v{nxt.version}; v{catalog.version} keeps them) and the agent is asked "
                       f"to re-send the disk (resync from seq {seq}): run the agent, then consolidate again to "
                       "build a new point from it", wait_for_resync=True)
