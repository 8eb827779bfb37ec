"""Prefect events hotspare emits, with the resource and labels DESIGN.md fixes, so that
automations can match them."""

from __future__ import annotations

from typing import Any


def machine_resource(machine: str, mode: str, epoch: int) -> dict[str, str]:
    return {
        "prefect.resource.id": f"hotspare.machine.{machine}",
        "prefect.resource.name": machine,
        "hotspare.mode": mode,
        "hotspare.epoch": str(epoch),
    }


def emit_machine_event(event: str, machine: str, *, mode: str = "normal", epoch: int = 0,
                       payload: dict[str, Any] | None = None) -> None:
    from prefect.events import emit_event

    emit_event(event=event, resource=machine_resource(machine, mode, epoch), payload=payload or {})


def emit_heartbeat(payload: dict[str, Any]) -> None:
    emit_machine_event("hotspare.machine.heartbeat", payload["machine"], mode=payload["mode"],
                       epoch=payload["epoch"], payload=payload)


def machine_alarm(machine: str, mode: str = "normal"):
    """An ``alarm(event, payload)`` callback for the engine (the agent's stall watch): the
    engine never imports Prefect, so its events go out through this."""
    def alarm(event: str, payload: dict[str, Any]) -> None:
        emit_machine_event(event, machine, mode=mode, epoch=int(payload.get("epoch", 0)), payload=payload)
    return alarm


def prefect_api_configured() -> bool:
    """True when a Prefect API URL is set (an agent on a machine emits events only then;
    it never starts a temporary server of its own)."""
    import os

    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())
