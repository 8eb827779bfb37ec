"""A protected machine's state: an append-only chain ``state/<version>.json``, like the
catalog, so two flows never both move a machine and a re-run continues from the last
committed state.

States: ``protected`` (the machine's own writes are the truth, in ``epoch``),
``failing-over``, ``failed-over`` (a VM serves, its writes form ``epoch``; ``vm`` says
where), ``failing-back`` (with ``phase`` and ``failback``, hotspare.failback.model), then
``protected`` again in a new epoch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from hotspare import layout
from hotspare.catalog.model import utcnow
from hotspare.failback.model import FailbackProgress, Phase
from hotspare.store.base import Store
from hotspare.versioned import commit, latest_version, load, load_latest

State = Literal["protected", "failing-over", "failed-over", "failing-back"]


class MachineState(BaseModel):
    machine: str
    version: int = Field(ge=0)
    state: State = "protected"
    epoch: int = Field(0, ge=0, description="the epoch whose writes are the truth now")
    at: datetime = Field(default_factory=utcnow)
    reason: str = ""
    step: str = Field("", description="the last step a flow completed in this state")
    phase: Phase = Field("", description="failback phase (hotspare.failback.model)")
    flow_run_id: str | None = None
    host: str | None = None
    vm: dict[str, Any] | None = Field(None, description="the VM handle, while a VM serves")
    approval: dict[str, Any] | None = None
    failback: FailbackProgress | None = Field(None, description="a failback's targets, timings and outcome")

    def next(self, **changes: Any) -> "MachineState":
        data = self.model_dump()
        data.update(changes, version=self.version + 1, at=utcnow())
        return MachineState.model_validate(data)


def load_state(store: Store, machine: str) -> MachineState:
    """The newest state; version 0 ``protected`` in epoch 0 before any transition."""
    st = load_latest(store, layout.state_prefix(machine), MachineState)
    return st if st is not None else MachineState(machine=machine, version=0)


def commit_state(store: Store, state: MachineState) -> MachineState:
    """Commit ``state`` create-only (AlreadyExists when another flow moved the machine)."""
    commit(store, layout.state_prefix(state.machine), state)
    return state


def state_history(store: Store, machine: str) -> list[MachineState]:
    """Every committed state of ``machine``, oldest first (for timings and post-mortems)."""
    prefix = layout.state_prefix(machine)
    newest = latest_version(store, prefix)
    if newest is None:
        return []
    first = 0 if store.exists(layout.state_key(machine, 0)) else 1
    return [load(store, prefix, v, MachineState) for v in range(first, newest + 1)]
