"""Approvals an on-call engineer can act on: failover's, and failback's cut-over.

A flow that needs a decision calls :func:`ask_approval`. It

- emits ``hotspare.<action>.approval-requested`` for the machine, whose payload holds the
  question, the facts, the deadline and the run's UI address (``hotspare deploy`` hangs a
  notification on it when the machine's policy names a webhook block);
- pauses the run for an :class:`Approval` (Prefect's ``pause_flow_run`` with a ``RunInput``).
  In the UI the form is on the paused run's page: the **Resume** button at its top right
  (also under the run's ⋮ menu). Its description states the facts
  as absolute times, written once when the run pauses, so they stay true however late
  someone reads them: the machine's last heartbeat, the recovery point that would boot and
  its age, the VM host, and the deadline;
- returns the answer: ``decision`` is a required choice between ``approve`` and ``reject``
  (no default, so an untouched form cannot be submitted), ``by`` is required, ``why``
  optional. No answer by the deadline is a rejection by ``timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from hotspare.catalog import load_catalog
from hotspare.catalog.model import utcnow
from hotspare.consolidate.export import find_point
from hotspare.errors import HotspareError, UsageError
from hotspare.heartbeat import load_heartbeat
from hotspare.machine import MachineConfig
from hotspare.store import Store
from tasks.events import emit_machine_event


class Approval(RunInput):
    """The operator's answer. ``approve`` reads the decision as a bool for the flows."""

    decision: Literal["approve", "reject"] = Field(
        title="Decision", description="approve: go ahead as described above; reject: change nothing")
    by: str = Field(title="By", min_length=1, description="your name, recorded with the decision (required)")
    why: str = Field("", title="Why", description="the reason, recorded with the decision")

    @property
    def approve(self) -> bool:
        return self.decision == "approve"


A = TypeVar("A", bound=Approval)


def when(t: datetime | None) -> str:
    """An absolute UTC time as the form shows it."""
    return "never" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(t: datetime, now: datetime) -> str:
    s = max(0, int((now - t).total_seconds()))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60} s" if s < 7200 else f"{s // 3600} h {s % 3600 // 60} min"


@dataclass
class ApprovalRequest:
    """What a flow asks, and the facts the operator decides on (label, value)."""

    action: Literal["failover", "failback"]
    machine: str
    question: str  # markdown, one line: **Fail over web1?**
    consequences: str  # what approving and rejecting do
    timeout: int
    mode: str = "normal"
    epoch: int = 0
    facts: list[tuple[str, str]] = field(default_factory=list)

    def description(self, deadline: datetime) -> str:
        rows = [*self.facts, ("Deadline", f"{when(deadline)}: no answer by then rejects")]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return (f"{self.question}\n\n| | at the request |\n|---|---|\n{table}\n\n{self.consequences}\n\n"
                "Choose **approve** or **reject** under *Decision*, give your name under *By*, then press Submit.")


def machine_facts(st: Store, cfg: MachineConfig, host: str, now: datetime | None = None) -> list[tuple[str, str]]:
    """The facts both approvals show: the last heartbeat, the newest (crash-consistent when
    there is one) recovery point of the boot disk, and the VM host; all as absolute times
    with their age at the request."""
    now = now or utcnow()
    hb = load_heartbeat(st, cfg.name)
    if hb is None:
        beat = "never received"
    else:
        beat = (f"{when(hb.received_at or hb.time)} ({age(hb.received_at or hb.time, now)} before this request; "
                f"window {cfg.policy.heartbeat_window} s, {hb.mode} mode)")
    disk = cfg.disks[0]
    try:
        p = find_point(load_catalog(st, cfg.name, disk.name, disk.size), prefer_consistent=True)
        point = (f"{p.id} of disk {disk.name}, taken {when(p.time)} ({age(p.time, now)} old at this request)"
                 + ("" if p.consistent else "; NOT crash-consistent (a scan of a live disk)"))
    except UsageError:  # a machine failed over before its first consolidation
        point = (f"none yet on disk {disk.name}: approving folds in the logs the machine shipped and boots the "
                 "point that makes")
    except HotspareError as err:
        point = f"unreadable: {err}"
    return [("Machine", cfg.name), ("Last heartbeat", beat), ("Recovery point", point), ("VM host", host)]


def _run_url() -> str:
    """The paused run's page in the UI (``prefect.runtime.flow_run.ui_url`` names a route
    this UI does not have; ``url_for`` is what the run's "View at" log line uses)."""
    from prefect.context import FlowRunContext
    from prefect.utilities.urls import url_for

    ctx = FlowRunContext.get()
    return (url_for(ctx.flow_run) or "") if ctx and ctx.flow_run else ""


def ask_approval(request: ApprovalRequest, model: type[A] = Approval, **shown) -> A:  # type: ignore[assignment]
    """Emit the request's event, pause for ``model`` (a subclass may show more fields,
    given in ``shown``), and return the answer; no answer within the timeout rejects."""
    now = utcnow()
    deadline = now + timedelta(seconds=request.timeout)
    description = request.description(deadline)
    get_run_logger().info("approval requested for %s of %s; deadline %s", request.action, request.machine,
                          when(deadline))
    emit_machine_event(f"hotspare.{request.action}.approval-requested", request.machine, mode=request.mode,
                       epoch=request.epoch,
                       payload={"question": request.question, "facts": dict(request.facts),
                                "deadline": deadline.isoformat(), "deadline_text": when(deadline),
                                "flow_run_id": str(flow_run.id), "ui_url": _run_url()})
    try:
        return pause_flow_run(wait_for_input=model.with_initial_data(description=description, **shown),
                              timeout=request.timeout, poll_interval=2)
    except FlowPauseTimeout:
        # The server refuses any end state but Failed for a run whose pause expired; put
        # the run back to Running so that it can end as a clear rejection instead.
        from prefect.client.orchestration import get_client
        from prefect.states import Running

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Running(message="approval timed out"), force=True)
        return model(decision="reject", by="timeout", why=f"no answer by {when(deadline)}", **shown)
