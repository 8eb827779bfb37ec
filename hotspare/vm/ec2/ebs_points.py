"""Which EBS snapshot holds which recovery point: each point's snapshot is made once, from
its chunks, and over the snapshot of an older point (only the blocks that differ).

Terms:
- point snapshot: a completed EBS snapshot made from a point's chunks
  (:mod:`hotspare.vm.ec2.ebs_chunks`), tagged with the machine, disk and point and the role
  ``point``, never with a VM id: the VMs booted from it (an image each) come and go, it stays
  as the next point's parent.
- record: ``machines/<m>/ebs/<region>/<disk>/<point>.json`` (:func:`hotspare.layout.ebs_snapshot_key`),
  create-only, written once its snapshot is completed: the snapshot, the point (id,
  position, root), the region, the parent snapshot.
- parent: the snapshot of the nearest older point of the disk that has a record. A record is
  believed only once checked: its snapshot still exists, is ``completed``, is tagged with
  its point and has the volume's size, and its point's index is still in the store and of
  the same geometry. Anything else means no parent: a full upload, said in one log line.

Why records in the store rather than the snapshots' tags alone: tags are account-wide, so a
second hotspare store (a lab, a test run) protecting a machine of the same name would offer
its snapshots as parents; the store knows which points and indexes exist; and a create-only
record makes two builds of one point (a drill beside a failover) agree on one snapshot.

Pruning: once a point's snapshot is recorded, the snapshots of older points other than its
parent are deleted with their records. The parent is kept one round, since a build of
another point may still run over it; a snapshot an image still uses (a running VM's) is
refused by EC2 (``InvalidSnapshot.InUse``) and kept until a later prune.

A crash between a snapshot's completion and its record leaves a snapshot that no record
names (tagged with its point, to be deleted by hand); the re-run makes the point's snapshot
again.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from hotspare import layout
from hotspare.catalog import Catalog, RecoveryPoint
from hotspare.errors import AlreadyExists, HotspareError, InvalidObject, NotFound, UsageError, field_error
from hotspare.replica.index import IndexRoot, read_root
from hotspare.store.base import Store
from hotspare.vm.ec2.aws import Ec2Error, aws_call
from hotspare.vm.ec2.ebs import discard_snapshot, volume_gib
from hotspare.vm.ec2.ebs_chunks import ParentPoint, ParentUnreadable, check_parent, snapshot_of_point
from hotspare.vm.ec2.resources import TAG_DISK, TAG_MACHINE, TAG_POINT, TAG_ROLE

log = logging.getLogger(__name__)

RECORD_FORMAT = 1


class PointSnapshot(BaseModel):
    """The record of the EBS snapshot that holds a point (see the module docstring)."""

    format_version: Literal[1] = RECORD_FORMAT
    machine: str
    disk: str
    region: str
    point: str
    epoch: int = Field(ge=0)
    seq: int = Field(ge=-1)
    root: str = Field(min_length=1, description="key of the index root the snapshot was made from")
    snapshot_id: str = Field(pattern=r"^snap-[0-9a-f]{8,32}$")
    volume_gib: int = Field(gt=0)
    parent_snapshot_id: str | None = None
    blocks_put: int = Field(ge=0)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


def point_snapshot(ebs: Any, ec2: Any, store: Store, catalog: Catalog, point: RecoveryPoint, *, region: str,
                   tags: dict[str, str] | None = None, workers: int = 8, timeout: float = 3600.0,
                   poll_interval: float = 5.0) -> PointSnapshot:
    """The record of a completed EBS snapshot holding ``point`` of ``catalog``'s disk: the
    one already made (checked), or a new one, over a parent when a usable one exists."""
    m, d = catalog.machine, catalog.disk
    what = f"{m}/{d} point {point.id}"
    if not point.root:
        raise UsageError(f"{what} is in the layout before chunks: run `hotspare consolidate {m}` once to "
                         "convert the disk")
    layout.check_name("region", region)
    root = read_root(store, point.root)
    key = layout.ebs_snapshot_key(m, region, d, point.id)
    records = load_records(store, m, region, d)
    own = records.pop(point.id, None)
    if own is not None:
        why = stale(ec2, own, root.disk_size)
        if why is None:
            log.info("%s: snapshot %s holds it already (%s)", what, own.snapshot_id, key)
            return own
        log.warning("%s: record %s %s; making the snapshot again", what, key, why)
        store.delete(key)
    parent, parent_point = find_parent(store, ec2, catalog, root, point, records)
    snap_tags = {**(tags or {}), "Name": f"hotspare {m}/{d} {point.id}", TAG_MACHINE: m, TAG_DISK: d,
                 TAG_POINT: point.id, TAG_ROLE: "point"}
    args: dict[str, Any] = dict(tags=snap_tags, description=f"hotspare {what}", workers=workers, timeout=timeout,
                                poll_interval=poll_interval)
    try:
        up = snapshot_of_point(ebs, ec2, store, root, parent=parent, **args)
    except ParentUnreadable as err:
        log.warning("%s: %s: full upload instead", what, err)
        parent, parent_point = None, None
        up = snapshot_of_point(ebs, ec2, store, root, **args)
    rec = PointSnapshot(machine=m, disk=d, region=region, point=point.id, epoch=point.epoch, seq=point.seq,
                        root=point.root, snapshot_id=up.snapshot_id, volume_gib=up.volume_gib,
                        parent_snapshot_id=up.parent_snapshot_id, blocks_put=up.blocks_put)
    try:
        store.put(key, rec.model_dump_json(indent=1).encode(), create_only=True)
    except AlreadyExists:
        # Another build of this point recorded its snapshot first: both hold the same
        # bytes, so use that one and drop ours.
        discard_snapshot(ec2, up.snapshot_id)
        theirs = load_records(store, m, region, d).get(point.id)
        why = "is unreadable" if theirs is None else stale(ec2, theirs, root.disk_size)
        if theirs is None or why is not None:
            raise HotspareError(f"{key}: another build recorded point {point.id} first, and its record {why}; "
                                "run again") from None
        return theirs
    except BaseException:
        discard_snapshot(ec2, up.snapshot_id)  # a snapshot no record names would never be found again
        raise
    prune(store, ec2, records, keep={point.id} | ({parent_point} if parent_point else set()), before=point.position)
    return rec


def load_records(store: Store, machine: str, region: str, disk: str) -> dict[str, PointSnapshot]:
    """The disk's records in ``region`` by point id; a damaged one (it does not parse, or
    names another object than its key) is quarantined and left out."""
    out: dict[str, PointSnapshot] = {}
    prefix = layout.ebs_prefix(machine, region, disk)
    for obj in store.list(prefix):
        name = obj.key[len(prefix):]
        if not name.endswith(".json") or "/" in name:
            continue
        try:
            raw = store.get(obj.key)
        except NotFound:
            continue  # pruned meanwhile
        try:
            doc = json.loads(raw)
            if isinstance(doc, dict) and isinstance(doc.get("format_version"), int) and doc["format_version"] > RECORD_FORMAT:
                log.warning("%s: EBS snapshot record of format %d, newer than this hotspare's: not used", obj.key,
                            doc["format_version"])
                continue
            rec = PointSnapshot.model_validate(doc)
            names = (rec.machine, rec.region, rec.disk, rec.point)
            if names != (machine, region, disk, name[:-5]):
                raise ValueError(f"names {'/'.join(names)}, not {machine}/{region}/{disk}/{name[:-5]}")
        except (ValueError, ValidationError) as err:
            reason = field_error(err) if isinstance(err, ValidationError) else str(err)
            from hotspare.quarantine import quarantine  # only for a damaged record

            log.warning("%s: EBS snapshot record is damaged (%s): quarantined, not used", obj.key, reason)
            quarantine(store, obj.key, f"EBS snapshot record is damaged: {reason}")
            continue
        out[rec.point] = rec
    return out


def stale(ec2: Any, rec: PointSnapshot, disk_size: int) -> str | None:
    """Why ``rec``'s snapshot cannot stand for its point (gone, not completed, tagged for
    another point, another size), or None when it can."""
    sid = rec.snapshot_id
    try:
        with aws_call("DescribeSnapshots", sid):
            snap = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
    except Ec2Error as err:
        if err.not_found:
            return f"names snapshot {sid}, which is gone"
        raise
    if snap["State"] != "completed":
        return f"names snapshot {sid}, which is {snap['State']}, not completed"
    tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
    held = (tags.get(TAG_MACHINE), tags.get(TAG_DISK), tags.get(TAG_POINT))
    if held != (rec.machine, rec.disk, rec.point):
        return f"names snapshot {sid}, which is tagged for {'/'.join(map(str, held))}, not {rec.machine}/{rec.disk}/{rec.point}"
    if int(snap["VolumeSize"]) != volume_gib(disk_size):
        return f"names snapshot {sid} of {snap['VolumeSize']} GiB, the disk needs {volume_gib(disk_size)} GiB"
    return None


def find_parent(store: Store, ec2: Any, catalog: Catalog, root: IndexRoot, point: RecoveryPoint,
                records: dict[str, PointSnapshot]) -> tuple[ParentPoint | None, str | None]:
    """The snapshot of the nearest older recorded point, with that point's index, and its
    point id; (None, None) when there is none or it fails a check (logged once)."""
    what = f"{catalog.machine}/{catalog.disk} point {point.id}"
    older = [r for r in records.values() if r.position < point.position]
    if not older:
        log.info("%s: no snapshot of an older point: full upload", what)
        return None, None
    rec = max(older, key=lambda r: r.position)
    key = layout.ebs_snapshot_key(rec.machine, rec.region, rec.disk, rec.point)
    why = stale(ec2, rec, root.disk_size)
    proot: IndexRoot | None = None
    if why is None:
        # The catalog's root of that point when it is still retained (a repack may have
        # rewritten its index; the bytes are the same), else the one it was made from.
        root_key = next((p.root for p in catalog.points if p.id == rec.point and p.root), rec.root)
        try:
            proot = read_root(store, root_key)
        except InvalidObject as err:
            why = f"names point {rec.point}, whose index is gone ({err})"
        else:
            why = check_parent(root, proot)
            if why is None and proot.point != rec.point:
                why = f"names point {rec.point}, but index root {root_key} is point {proot.point}'s"
            elif why is not None:
                why = f"names point {rec.point}, whose index differs: {why}"
    if why is not None or proot is None:
        log.warning("%s: parent record %s %s: no parent, full upload", what, key, why)
        return None, None
    log.info("%s: parent is snapshot %s of point %s", what, rec.snapshot_id, rec.point)
    return ParentPoint(snapshot_id=rec.snapshot_id, root=proot), rec.point


def prune(store: Store, ec2: Any, records: dict[str, PointSnapshot], *, keep: set[str],
          before: tuple[int, int]) -> list[str]:
    """Delete the snapshots (and then the records) of the points older than ``before`` not in
    ``keep``; a snapshot EC2 refuses to delete stays with its record. Returns the points pruned."""
    pruned = []
    for rec in sorted(records.values(), key=lambda r: r.position):
        if rec.point in keep or rec.position >= before:
            continue
        key = layout.ebs_snapshot_key(rec.machine, rec.region, rec.disk, rec.point)
        try:
            with aws_call("DeleteSnapshot", rec.snapshot_id):
                ec2.delete_snapshot(SnapshotId=rec.snapshot_id)
        except Ec2Error as err:
            if not err.not_found:
                # InvalidSnapshot.InUse: an image (a VM that still runs) holds it.
                log.info("%s: snapshot %s kept for now: %s", key, rec.snapshot_id, err)
                continue
        store.delete(key)
        pruned.append(rec.point)
    if pruned:
        log.info("snapshots of older points deleted: %s", ", ".join(pruned))
    return pruned
