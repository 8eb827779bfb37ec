"""Ingest: decide which new extent logs a disk's catalog accepts, quarantine the bad ones,
and commit the next catalog version.

The steps are separate functions so that the Prefect flow can run validation as parallel
tasks with retries, while the decisions stay here, pure and tested. None of them costs the
retention window (a disk may hold 150,000 accepted logs at one log a second):

1. :func:`~hotspare.catalog.list_pending`: logs in the store that the catalog has not accepted, listed from
   each epoch's newest accepted log on.
2. :func:`batches` and :func:`check_log`: validate the logs, a batch per task in the flow
   (InvalidLog on any fault).
3. :func:`plan`: order the valid logs, accept those that continue each epoch's seq chain,
   reject overlaps and fenced epochs, leave logs after a gap waiting.
4. :func:`next_catalog`: the next version, recording the rejections and whether the agent
   must resync (a rejected log left a hole in the chain); the accepted logs join the
   catalog's inline tail. Committed create-only (the commit moves a long tail into
   manifests first); a loser re-plans from the winner's catalog.
5. :func:`~hotspare.quarantine.quarantine`: after the commit, move each rejected log under ``quarantine/`` with
   a reason file. A crash before the move leaves the log in place; the re-run rejects it
   again (validation is deterministic) and moves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hotspare import layout
from hotspare.catalog import AcceptedLog, Catalog, RejectedLog, list_pending
from hotspare.errors import AlreadyExists, InvalidLog
from hotspare.extentlog import LogInfo, validate_log
from hotspare.machine import DiskSpec
from hotspare.quarantine import quarantine
from hotspare.store.base import ObjectInfo, Store


@dataclass
class Plan:
    accepted: list[LogInfo] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason without the key)
    waiting: list[tuple[str, str]] = field(default_factory=list)
    # The agent must re-send the disk from this seq: a rejected log held seqs the chain
    # needs, or a gap stayed open too long, so they are lost unless re-sent.
    hole_at: int | None = None
    # Why this ingest asked for a resync although it rejected nothing (a gap, one line).
    gap_stalled: str | None = None


BATCH_LOGS = 64
BATCH_BYTES = 256 << 20


def batches(pending: list[ObjectInfo], max_logs: int = BATCH_LOGS, max_bytes: int = BATCH_BYTES) -> list[list[str]]:
    """The keys of ``pending`` in order, cut into batches of at most ``max_logs`` logs and
    ``max_bytes`` bytes (a bigger log is a batch of its own): one validation task each."""
    out: list[list[str]] = []
    size = 0
    for o in pending:
        if not out or len(out[-1]) >= max_logs or (out[-1] and size + o.size > max_bytes):
            out.append([])
            size = 0
        out[-1].append(o.key)
        size += o.size
    return out


def check_log(store: Store, key: str, machine: str, disk: DiskSpec) -> LogInfo:
    """Validate one log object fully (streams it row group by row group)."""
    parsed = layout.parse_log_name(key)
    epoch = epoch_of(key)
    if parsed is None or epoch is None:
        raise InvalidLog(key, "not an extent-log name (<epoch>/logs/<first_seq>-<last_seq>.parquet)")
    with store.open(key) as f:
        info = validate_log(f, key, machine=machine, disk=disk.name, epoch=epoch, disk_size=disk.size)
    info = replace(info, size=store.size(key))
    if (info.meta.first_seq, info.meta.last_seq) != parsed:
        raise InvalidLog(key, f"holds seqs {info.meta.first_seq}..{info.meta.last_seq}, its name says {parsed[0]}..{parsed[1]}")
    return info


def epoch_of(key: str) -> int | None:
    """The epoch a log key names (``.../epochs/<epoch>/logs/...``), or None."""
    parts = key.split("/")
    try:
        return int(parts[parts.index("epochs") + 1])
    except (ValueError, IndexError):
        return None


def plan(catalog: Catalog, results: list[LogInfo | InvalidLog]) -> Plan:
    """Decide each pending log's fate against ``catalog``."""
    p = Plan()
    applied = dict(catalog.applied)
    for r in results:
        if isinstance(r, InvalidLog):
            p.rejected.append((r.key, r.detail))
    valid = sorted((r for r in results if isinstance(r, LogInfo)), key=lambda i: (i.meta.epoch, i.meta.first_seq))
    for info in valid:
        m = info.meta
        last = applied.get(m.epoch, -1)
        fence = catalog.fence_of(m.epoch)
        if fence is not None and m.last_seq > fence.after_seq:
            p.rejected.append((info.key, f"epoch {m.epoch} is fenced after seq {fence.after_seq} "
                                         f"(the machine failed over); seqs {m.first_seq}..{m.last_seq} refused"))
        elif m.epoch != catalog.epoch and fence is None:
            p.waiting.append((info.key, f"epoch {m.epoch} is not the disk's current epoch {catalog.epoch}"))
        elif m.first_seq <= last:
            p.rejected.append((info.key, f"seqs {m.first_seq}..{m.last_seq} overlap the accepted seqs "
                                         f"(applied up to {last})"))
        elif m.first_seq == last + 1 or (m.resync_from is not None and m.resync_from == last + 1):
            p.accepted.append(info)
            applied[m.epoch] = m.last_seq
        else:
            p.waiting.append((info.key, f"seq gap: expects seq {last + 1}, this log starts at {m.first_seq}"))
    # A log that now overlaps (superseded by a resync) is refused rather than left waiting.
    still_waiting = []
    by_key = {i.key: i for i in valid}
    for key, why in p.waiting:
        info = by_key[key]
        if info.meta.first_seq <= applied.get(info.meta.epoch, -1):
            p.rejected.append((key, f"seqs {info.meta.first_seq}..{info.meta.last_seq} superseded by a resync"))
        else:
            still_waiting.append((key, why))
    p.waiting = still_waiting
    current = applied.get(catalog.epoch, -1)
    for key, _ in p.rejected:
        seqs = layout.parse_log_name(key)
        if epoch_of(key) == catalog.epoch and seqs and seqs[0] > current:
            p.hole_at = current + 1
    return p


def next_catalog(catalog: Catalog, p: Plan) -> Catalog | None:
    """The next catalog version for plan ``p``, or None when nothing changes."""
    resync_from = catalog.resync_from
    if any(i.meta.resync_from is not None and i.meta.resync_from == resync_from for i in p.accepted):
        resync_from = None  # the agent's resync arrived and closed the hole
    if p.hole_at is not None:
        resync_from = p.hole_at
    if not p.accepted and not p.rejected and resync_from == catalog.resync_from:
        return None
    applied = dict(catalog.applied)
    newest = dict(catalog.newest)
    logs = list(catalog.tail)
    for info in p.accepted:
        m = info.meta
        applied[m.epoch] = m.last_seq
        newest[m.epoch] = info.key
        logs.append(AcceptedLog(key=info.key, epoch=m.epoch, first_seq=m.first_seq, last_seq=m.last_seq,
                                rows=info.rows, data_bytes=info.data_bytes, covered_bytes=info.covered_bytes,
                                size=info.size, captured_at=info.captured_at,
                                cut=m.cut, consistent=m.consistent))
    rejected = catalog.rejected + [RejectedLog(key=k, reason=r) for k, r in p.rejected]
    return catalog.next(applied=applied, tail=logs, newest=newest, rejected=rejected, resync_from=resync_from)


MAX_RACES = 8


def check_logs(store: Store, keys: list[str], machine: str, disk: DiskSpec) -> list[LogInfo | InvalidLog]:
    """Validate a batch of logs: each one's LogInfo, or the InvalidLog that condemns it."""
    out: list[LogInfo | InvalidLog] = []
    for key in keys:
        try:
            out.append(check_log(store, key, machine, disk))
        except InvalidLog as err:
            out.append(err)
    return out


def _validate_here(store: Store, batches_: list[list[str]], machine: str, disk: DiskSpec) -> list[LogInfo | InvalidLog]:
    return [r for keys in batches_ for r in check_logs(store, keys, machine, disk)]


def resync_stale_gap(catalog: Catalog, pending: list[ObjectInfo], p: Plan, gap_timeout: float) -> None:
    """Turn a gap that logs have waited on for longer than ``gap_timeout`` seconds into a
    resync request (in ``p``): the agent uploads logs in seq order, so the missing one is
    lost, and without this the replica would wait for it for ever."""
    from hotspare.stall import find_gap

    if p.hole_at is not None or catalog.resync_from is not None:
        return  # a resync is asked for already
    decided = {i.key for i in p.accepted} | {k for k, _ in p.rejected}
    applied = max([catalog.applied_seq(catalog.epoch)]
                  + [i.meta.last_seq for i in p.accepted if i.meta.epoch == catalog.epoch])
    gap = find_gap(catalog, [o for o in pending if o.key not in decided], applied=applied)
    if gap is not None and gap.waited > gap_timeout:
        p.hole_at = gap.expects
        p.gap_stalled = (f"seq {gap.expects} never arrived: the log from seq {gap.next_seq} waited {gap.waited:.0f}s "
                         f"(more than {gap_timeout:g}s); asked the agent for a resync from seq {gap.expects}")


def ingest_disk(store: Store, machine: str, disk: DiskSpec, *, validate=_validate_here, commit=None,
                quarantine_one=None, gap_timeout: float | None = None) -> tuple[Catalog, Plan]:
    """One disk's ingest: plan, commit create-only (re-planning after a lost race), then
    quarantine the rejected logs. The flow passes task-backed ``validate`` (given the
    batches of :func:`batches`), ``commit`` (returning the committed catalog) and
    ``quarantine_one`` (retries, concurrency); without them everything runs here. A gap
    waited on for longer than ``gap_timeout`` seconds becomes a resync request."""
    from hotspare.catalog import commit_catalog, load_catalog
    from hotspare.errors import HotspareError
    from hotspare.faults import crash_point

    commit = commit or commit_catalog
    quarantine_one = quarantine_one or quarantine
    for _ in range(MAX_RACES):
        catalog = load_catalog(store, machine, disk.name, disk.size)
        pending = list_pending(store, machine, disk.name, catalog)
        p = plan(catalog, validate(store, batches(pending), machine, disk))
        if gap_timeout is not None:
            resync_stale_gap(catalog, pending, p, gap_timeout)
        nxt = next_catalog(catalog, p)
        crash_point("ingest-before-commit")
        if nxt is not None:
            try:
                catalog = commit(store, nxt)
            except AlreadyExists:
                continue  # another ingest committed this version: re-plan from its catalog
        for key, reason in p.rejected:
            quarantine_one(store, key, reason)
        return catalog, p
    raise HotspareError(f"ingest of {machine}/{disk.name} lost {MAX_RACES} commit races in a row; another ingest is busy")
