"""The automations that start failover and failback, applied with ``hotspare deploy``.

- ``hotspare-heartbeat-<machine>``: proactive. Once a heartbeat of the machine has been
  seen, another is expected within the machine's heartbeat window; if none comes, it runs
  the ``failover`` deployment for that machine. (On the open-source server a proactive
  trigger needs ``after`` as well as ``expect``, both the heartbeat, to open its bucket.)
- ``hotspare-alert-down``: reactive. An outside alerting system posts
  ``hotspare.machine.down`` for ``hotspare.machine.<machine>`` through Prefect's events API;
  the same deployment runs for that machine.
- ``hotspare-approval-<machine>``: reactive, for a machine whose policy names a notification
  block (``notify_block``). A ``hotspare.failover.approval-requested`` or
  ``hotspare.failback.approval-requested`` event of the machine sends a notification through
  that block (Prefect's SendNotification action) with the question, the facts, the deadline
  and the run's address in the UI, where the form waits.
- ``hotspare-restore-heartbeat``: reactive. A restore-mode heartbeat of a fenced machine
  runs the ``failback`` deployment.

Each action passes the machine's name as the ``machine`` parameter, rendered from the
event's resource id (``hotspare.machine.<m>``) by Prefect's templating, so one automation
serves every machine and a run's parameters read ``machine: web1``. (The resource id is used
rather than the ``prefect.resource.name`` label because an outside alert may not set it.)
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

from hotspare.errors import HotspareError
from hotspare.failover import RESOURCE_PREFIX
from hotspare.machine import MachineConfig

HEARTBEAT = "hotspare.machine.heartbeat"
APPROVAL_REQUESTED = ("hotspare.failover.approval-requested", "hotspare.failback.approval-requested")
NOTIFY_SUBJECT = "hotspare: approval needed, {{ event.payload.question | replace('**', '') }}"
NOTIFY_BODY = """{{ event.payload.question | replace('**', '') }}
{% for k, v in event.payload.facts.items() %}{{ k }}: {{ v }}
{% endfor %}Deadline: {{ event.payload.deadline_text }} (no answer by then rejects)
Answer in the Prefect UI: {{ event.payload.ui_url or ('flow run ' ~ event.payload.flow_run_id) }}, button Resume."""
DOWN = "hotspare.machine.down"
# Jinja's replace filter: the resource id without its prefix, the machine's name.
MACHINE_PARAM = "{{ event.resource.id | replace('" + RESOURCE_PREFIX + "', '', 1) }}"


def _run(deployment_id, **params) -> RunDeployment:
    return RunDeployment(source="selected", deployment_id=deployment_id,
                         parameters={"machine": MACHINE_PARAM, **params})


def heartbeat_loss(cfg: MachineConfig, failover_id, store_params: dict) -> Automation:
    resource = f"hotspare.machine.{cfg.name}"
    return Automation(
        name=f"hotspare-heartbeat-{cfg.name}",
        description=f"No heartbeat from {cfg.name} within {cfg.policy.heartbeat_window}s: run failover",
        trigger=EventTrigger(
            after={HEARTBEAT}, expect={HEARTBEAT}, match={"prefect.resource.id": resource},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=max(10, cfg.policy.heartbeat_window)),
        ),
        actions=[_run(failover_id, **store_params)],
    )


def alert_down(failover_id, store_params: dict) -> Automation:
    return Automation(
        name="hotspare-alert-down",
        description="An outside alert says a protected machine is down: run failover",
        trigger=EventTrigger(expect={DOWN}, match={"prefect.resource.id": "hotspare.machine.*"},
                             for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1),
        actions=[_run(failover_id, **store_params)],
    )


def restore_heartbeat(failback_id, store_params: dict) -> Automation:
    return Automation(
        name="hotspare-restore-heartbeat",
        description="A fenced machine's agent reports in restore mode: run failback",
        trigger=EventTrigger(expect={HEARTBEAT}, match={"prefect.resource.id": "hotspare.machine.*",
                                                        "hotspare.mode": "restore"},
                             for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1,
                             within=timedelta(minutes=10)),
        actions=[_run(failback_id, **store_params)],
    )


def approval_notification(cfg: MachineConfig, block_document_id) -> Automation:
    return Automation(
        name=f"hotspare-approval-{cfg.name}",
        description=f"An approval for {cfg.name} is waiting: notify through {cfg.policy.notify_block}",
        trigger=EventTrigger(expect=set(APPROVAL_REQUESTED), match={"prefect.resource.id": f"hotspare.machine.{cfg.name}"},
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_document_id, subject=NOTIFY_SUBJECT, body=NOTIFY_BODY)],
    )


def notification_block_id(name: str):
    """The id of the notification block ``TYPE-SLUG/NAME`` (a bare NAME is a custom-webhook
    block), with an error naming it when it is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, _, block = name.rpartition("/")
    slug = slug or "custom-webhook"
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(block, slug).id
        except ObjectNotFound:
            raise HotspareError(f"notification block {slug}/{block} (a machine policy's notify_block) not found on "
                                "the Prefect server: create it under Blocks, or fix the policy") from None


def apply(automations: list[Automation]) -> list[str]:
    """Create each automation, or replace the one of the same name; returns the names."""
    from prefect.client.orchestration import get_client

    names = []
    with get_client(sync_client=True) as client:
        for a in automations:
            for old in client.read_automations_by_name(a.name):
                client.delete_automation(old.id)
            a.create()
            names.append(a.name)
    return names


def deployment_id(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            raise HotspareError(f"deployment {name!r} not found on the Prefect server: run "
                                "`prefect deploy --prefect-file deployments/prefect.yaml --all` first") from None
