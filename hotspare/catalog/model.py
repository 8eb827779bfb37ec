"""Catalog entries as pydantic models: the JSON a commit writes is their dump.

A catalog holds its newest accepted logs inline (``tail``) and names the older ones through
:class:`ManifestRef` entries; :func:`hotspare.catalog.manifest.catalog_logs` gives the whole
list. Catalogs of format 1 hold every accepted log inline (their JSON key was ``logs``) and
no manifests; they read as catalogs whose tail is the whole list.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator

from hotspare import layout

CATALOG_FORMAT = 3  # 2: the tail inline, older logs in manifests; 3: points are chunk indexes
# The catalog keeps this many rejections for the operator to read; the reason files in
# quarantine keep them all.
REJECTED_KEPT = 100


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AcceptedLog(BaseModel):
    """An accepted extent log; ``position`` orders logs across epochs."""

    key: str
    epoch: int = Field(ge=0)
    first_seq: int = Field(ge=0)
    last_seq: int = Field(ge=0)
    rows: int = Field(ge=1)
    data_bytes: int = Field(ge=0)
    covered_bytes: int = Field(ge=0)
    size: int = Field(ge=0, description="bytes of the Parquet object")
    captured_at: datetime | None = None
    accepted_at: datetime = Field(default_factory=utcnow)
    cut: bool = Field(False, description="the log ends a capture cycle: a point can be made after it")
    consistent: bool = Field(False, description="that cycle read a frozen view: the cut is crash-consistent")

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.last_seq)


Position = tuple[int, int]


class ManifestRef(BaseModel):
    """A manifest the catalog names: a create-only object holding a batch of accepted logs,
    in position order. The catalog keeps its digest so a reader knows it got those bytes."""

    key: str
    level: int = Field(0, ge=0, description="merges it went through (see hotspare.catalog.segments)")
    count: int = Field(ge=1, description="accepted logs in it")
    first: Position = Field(description="the lowest position of its logs")
    last: Position = Field(description="the highest position of its logs")
    size: int = Field(ge=0, description="bytes of the object")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RejectedLog(BaseModel):
    key: str
    reason: str
    rejected_at: datetime = Field(default_factory=utcnow)


class Fence(BaseModel):
    """Epoch ``epoch`` ends after ``after_seq``: later logs of that epoch are refused."""

    epoch: int = Field(ge=0)
    after_seq: int = Field(ge=-1)
    at: datetime = Field(default_factory=utcnow)
    reason: str = ""


class DrillVerdict(BaseModel):
    """What the last drill of a point found: ``verified`` (it booted and showed the policy's
    boot evidence, in ``seconds``), ``failed`` (``reason`` says why) or ``untested`` (the
    drill could not judge the point, e.g. the VM host failed; ``reason`` says why)."""

    verdict: Literal["verified", "failed", "untested"]
    at: datetime = Field(default_factory=utcnow, description="when the drill ended")
    seconds: float | None = Field(None, ge=0, description="from the VM's launch to the boot evidence")
    reason: str = ""


class RecoveryPoint(BaseModel):
    id: str = Field(description="<epoch>-<seq>")
    epoch: int = Field(ge=0)
    seq: int = Field(ge=-1)
    time: datetime
    root: str = Field("", description="key of the point's index root (its chunks)")
    vhd: str = Field("", description="the layout before chunks: key of the VHD object holding this point")
    bytes_applied: int = Field(ge=0)
    consistent: bool = Field(False, description="a crash-consistent cut (a frozen view was read), "
                                                "not a fuzzy read of a live disk")
    drill: DrillVerdict | None = Field(None, description="the verdict of the point's last drill; None: never drilled")

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.seq)


class Catalog(BaseModel):
    format_version: int = CATALOG_FORMAT
    machine: str
    disk: str
    version: int = Field(ge=0)
    committed_at: datetime = Field(default_factory=utcnow)
    disk_size: int = Field(gt=0)
    epoch: int = Field(0, ge=0, description="the epoch whose logs are accepted now")
    applied: dict[int, int] = Field(default_factory=dict, description="epoch -> last applied seq")
    tail: list[AcceptedLog] = Field(default_factory=list, validation_alias=AliasChoices("tail", "logs"),
                                    description="the newest accepted logs, inline; the older ones are in manifests")
    manifests: list[ManifestRef] = Field(default_factory=list, description="the older accepted logs, in batches")
    newest: dict[int, str] = Field(default_factory=dict,
                                   description="epoch -> key of its newest accepted log (ingest lists after it)")
    rejected: list[RejectedLog] = Field(default_factory=list)
    fences: list[Fence] = Field(default_factory=list)
    points: list[RecoveryPoint] = Field(default_factory=list)
    vhd: dict[str, str] = Field(default_factory=dict,
                                description="the layout before chunks: role (current, base) -> VHD key")
    vhd_objects: dict[str, str] = Field(default_factory=dict, description="point id -> key of a VHD object made from it")
    folded: dict[int, int] = Field(default_factory=dict,
                                   description="epoch -> last seq folded into the base VHD (its logs are deleted)")
    # Set when a rejected log leaves a hole in the chain: the agent re-sends the disk's
    # content with a log whose resync_from equals this seq, which closes the hole.
    resync_from: int | None = None

    @model_validator(mode="after")
    def _newest_from_tail(self) -> "Catalog":
        # Format 1 had no ``newest``; and a tail always holds the newest logs it names.
        for lg in self.tail:
            known = self.newest.get(lg.epoch)
            seqs = layout.parse_log_name(known) if known else None
            if seqs is None or lg.last_seq > seqs[1]:
                self.newest[lg.epoch] = lg.key
        return self

    @property
    def log_count(self) -> int:
        """Accepted logs in the window (inline and in manifests), without reading a manifest."""
        return len(self.tail) + sum(m.count for m in self.manifests)

    def applied_seq(self, epoch: int) -> int:
        """The last applied seq of ``epoch`` (-1 when nothing was applied)."""
        return self.applied.get(epoch, -1)

    def fence_of(self, epoch: int) -> Fence | None:
        return next((f for f in self.fences if f.epoch == epoch), None)

    def point(self, role: str) -> "RecoveryPoint | None":
        """The ``current`` (newest) or ``base`` (oldest) point. In a store of the layout
        before chunks, the point whose VHD plays that role."""
        key = self.vhd.get(role)
        if key:
            return next((p for p in self.points if p.vhd == key), None)
        pts = sorted((p for p in self.points if p.root), key=lambda p: p.position)
        if not pts:
            return None
        return pts[-1] if role == "current" else pts[0]

    def next(self, **changes) -> "Catalog":
        """A copy as the next version, with ``changes`` applied."""
        data = self.model_dump()
        data.update(changes, version=self.version + 1, committed_at=utcnow())
        nxt = Catalog.model_validate(data)
        nxt.rejected = nxt.rejected[-REJECTED_KEPT:]
        return nxt
