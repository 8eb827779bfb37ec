"""The words of a failback run, as the machine's state chain records them.

- ``Phase``: where a ``failing-back`` machine is (``MachineState.phase``). Each phase ends
  by committing the next one: ``phase-one`` (the replica's content applied while the VM
  serves, then the cut-over approval), ``cut-over`` (the VM stopped with its last writes
  shipped), ``phase-two`` (what changed since the last applied point), ``verify`` (every
  block hashed on the machine and compared), ``finish`` (the VM epoch fenced, protection
  resumed); ``""`` outside a failback.
- ``FailbackProgress``: what a failback keeps between its steps and reports at its end
  (``MachineState.failback``); it stays on the chain after the machine is protected again,
  until the next failback starts.
- ``CutOverAnswer``: the decision on the cut-over, an operator's or the policy's.
- ``FailbackResult``: what a run returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hotspare.errors import Outcome

Phase = Literal["phase-one", "cut-over", "phase-two", "verify", "finish", ""]


class FailbackProgress(BaseModel):
    """``MachineState.failback``. The JSON keys are those the flow wrote as a plain dict
    before this model existed, so those states load as they are. A key this version does
    not know is kept (``extra="allow"``) and carried to the next committed state: a run of
    an older release re-running a newer one's failback must not erase what it cannot read."""

    model_config = ConfigDict(extra="allow")

    targets: dict[str, str] = Field(default_factory=dict, description="disk -> replacement disk or image written "
                                                                      "instead of the registered one")
    round: int = Field(0, ge=0, description="verifications that failed so far (the next one is verify-<round>)")
    phase_two_round: int = Field(0, ge=0, description="phase two again after the replica moved past its point")
    cutover_at: datetime | None = Field(None, description="when the cut-over was approved (the downtime starts)")
    estimated_downtime_s: float | None = Field(None, description="the estimate the approval showed")
    vm: dict[str, Any] | None = Field(None, description="the stopped VM's handle")
    mismatch: list[str] = Field(default_factory=list, description="the last failed verification's findings")
    verified_blocks: int | None = Field(None, description="blocks found equal to the replica")
    scans: dict[str, str] = Field(default_factory=dict, description="disk -> the verified hash map's key")
    verify_read_bytes: int | None = Field(None, description="bytes the verification re-read from the machine's disk")
    moved: dict[str, int] = Field(default_factory=dict, description="bytes applied per phase")
    downtime_s: float | None = Field(None, description="cut-over approval to protected again, in seconds")
    finished_at: datetime | None = None


class CutOverAnswer(BaseModel):
    """The cut-over decision (the fields of the flow's approval form)."""

    decision: Literal["approve", "reject"]
    by: str = ""
    why: str = ""

    @property
    def approve(self) -> bool:
        return self.decision == "approve"


class FailbackResult(BaseModel):
    machine: str
    outcome: Outcome
    message: str
    epoch: int | None = None
    bytes_moved: dict[str, int] = {}
    downtime_s: float | None = None
    verified_blocks: int | None = None
    verify_read_bytes: int | None = None  # what the downtime's verification read of the machine's disk
