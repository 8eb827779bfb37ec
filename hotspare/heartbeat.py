"""A machine's heartbeat (``heartbeat.json``): written by its agent each cycle, read validated."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

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

    @property
    def age(self) -> float:
        return (utcnow() - self.time).total_seconds()


def load_heartbeat(store: Store, machine: str) -> Heartbeat | None:
    key = layout.heartbeat_key(machine)
    try:
        raw = store.get(key)
    except NotFound:
        return None
    try:
        return Heartbeat.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidObject(key, field_error(err)) from err


def send_heartbeat(store: Store, machine: str, *, mode: str, epoch: int, disks: dict[str, dict[str, Any]],
                   restore: dict[str, Any] | None = None, emit: Callable[[dict], None] | None = None) -> dict:
    """Write ``heartbeat.json`` and, when ``emit`` is given, send the same payload as an event."""
    payload: dict[str, Any] = {"machine": machine, "mode": mode, "epoch": epoch,
                               "time": datetime.now(timezone.utc).isoformat(), "host": socket.gethostname(),
                               "disks": disks}
    if restore is not None:
        payload["restore"] = restore
    store.put(layout.heartbeat_key(machine), json.dumps(payload, indent=1).encode())
    if emit:
        emit(payload)
    return payload
