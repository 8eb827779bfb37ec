"""Catalog entries as pydantic models: the JSON a commit writes is their dump."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field

CATALOG_FORMAT = 1
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


class RecoveryPoint(BaseModel):
    id: str = Field(description="<epoch>-<seq>")
    epoch: int = Field(ge=0)
    seq: int = Field(ge=-1)
    time: datetime
    vhd: str = Field("", description="key of the VHD object holding this point, if it is current or base")
    bytes_applied: int = Field(ge=0)
    consistent: bool = Field(False, description="a crash-consistent cut (a frozen view was read), "
                                                "not a fuzzy read of a live disk")

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
    logs: list[AcceptedLog] = Field(default_factory=list)
    rejected: list[RejectedLog] = Field(default_factory=list)
    fences: list[Fence] = Field(default_factory=list)
    points: list[RecoveryPoint] = Field(default_factory=list)
    vhd: dict[str, str] = Field(default_factory=dict, description="role (current, base) -> VHD key")
    folded: dict[int, int] = Field(default_factory=dict,
                                   description="epoch -> last seq folded into the base VHD (its logs are deleted)")
    # Set when a rejected log leaves a hole in the chain: the agent re-sends the disk's
    # content with a log whose resync_from equals this seq, which closes the hole.
    resync_from: int | None = None

    def applied_seq(self, epoch: int) -> int:
        """The last applied seq of ``epoch`` (-1 when nothing was applied)."""
        return self.applied.get(epoch, -1)

    def fence_of(self, epoch: int) -> Fence | None:
        return next((f for f in self.fences if f.epoch == epoch), None)

    def point(self, role: str) -> "RecoveryPoint | None":
        """The point whose VHD plays ``role`` (current or base)."""
        key = self.vhd.get(role)
        return next((p for p in self.points if p.vhd == key), None) if key else None

    def accepted_keys(self) -> set[str]:
        return {log.key for log in self.logs}

    def next(self, **changes) -> "Catalog":
        """A copy as the next version, with ``changes`` applied."""
        data = self.model_dump()
        data.update(changes, version=self.version + 1, committed_at=utcnow())
        nxt = Catalog.model_validate(data)
        nxt.rejected = nxt.rejected[-REJECTED_KEPT:]
        return nxt
