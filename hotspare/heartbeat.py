"""Reading a machine's last heartbeat (``heartbeat.json``), validated."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from hotspare import layout
from hotspare.catalog.model import utcnow
from hotspare.errors import InvalidObject, NotFound, field_error
from hotspare.store.base import Store


class Heartbeat(BaseModel):
    machine: str
    mode: Literal["normal", "restore"]
    epoch: int
    time: datetime
    host: str = ""
    disks: dict[str, dict[str, Any]] = {}

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
