"""A machine's heartbeat (``heartbeat.json``): written by its agent each cycle, read validated."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from hotspare import layout
from hotspare.catalog.model import utcnow
from hotspare.errors import InvalidObject, NotFound, field_error
from hotspare.failback.orders import RestoreProgress
from hotspare.store.base import Store


class Heartbeat(BaseModel):
    machine: str
    mode: Literal["normal", "restore"]
    epoch: int
    time: datetime
    host: str = ""
    disks: dict[str, dict[str, Any]] = {}
    restore: RestoreProgress | None = None  # restore mode: divergence and apply progress
    # The agent's last stall (hotspare.stall): reason, detail, seconds, since and ended (its
    # clock), sent once it could reach the store again, and kept while the agent runs.
    last_stall: dict[str, Any] | None = None
    # The agent is up but its cycles fail on a local fault (hotspare.stall's agent-stuck):
    # reason, detail, since; absent once a cycle ships again.
    stuck: dict[str, Any] | None = None
    # The disks' stalls the agent saw in the store (hotspare.stall), each with its line.
    stalls: list[dict[str, Any]] = []
    # When the store received it (its clock, not the agent's); set by load_heartbeat.
    received_at: datetime | None = Field(None, exclude=True)

    @property
    def age(self) -> float:
        """Seconds since the store received the heartbeat (never from the agent's clock,
        which may be wrong: ``time`` is only recorded, and compared in :attr:`skew`)."""
        return max(0.0, (utcnow() - (self.received_at or self.time)).total_seconds())

    @property
    def skew(self) -> float | None:
        """The agent's clock minus the store's, seconds, when both are known."""
        return None if self.received_at is None else (self.time - self.received_at).total_seconds()


# A skew of the agent's clock beyond this is reported (the store's own timestamps have a
# second's resolution, and an upload takes time).
SKEW_REPORTED = 5.0


def load_heartbeat(store: Store, machine: str) -> Heartbeat | None:
    key = layout.heartbeat_key(machine)
    try:
        raw = store.get(key)
        received = store.stat(key).modified
    except NotFound:
        return None
    try:
        hb = Heartbeat.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidObject(key, field_error(err)) from err
    hb.received_at = received
    return hb


def send_heartbeat(store: Store, machine: str, *, mode: str, epoch: int, disks: dict[str, dict[str, Any]],
                   restore: dict[str, Any] | None = None, emit: Callable[[dict], None] | None = None,
                   last_stall: dict[str, Any] | None = None, stalls: list[dict[str, Any]] | None = None,
                   stuck: dict[str, Any] | None = None) -> dict:
    """Write ``heartbeat.json`` and, when ``emit`` is given, send the same payload as an event."""
    payload: dict[str, Any] = {"machine": machine, "mode": mode, "epoch": epoch,
                               "time": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(),
                               "disks": disks}
    if restore is not None:
        payload["restore"] = restore
    if last_stall is not None:
        payload["last_stall"] = last_stall
    if stalls:
        payload["stalls"] = stalls
    if stuck is not None:
        payload["stuck"] = stuck
    store.put(layout.heartbeat_key(machine), json.dumps(payload, indent=1).encode())
    if emit:
        emit(payload)
    return payload
