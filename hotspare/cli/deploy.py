"""``hotspare deploy``: hotspare's block types and automations, applied to the Prefect server."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from hotspare.cli.common import StoreOpt, app, console, load_flows, open_store


@app.command()
def deploy(machines: Annotated[Optional[list[str]], typer.Argument(help="machines (default: all)")] = None,
           store: StoreOpt = None,
           store_block: Annotated[Optional[str], typer.Option(help="store block the automations pass to flows")] = None) -> None:
    """Register hotspare's block types, then apply the detection automations (heartbeat
    loss, alerts, restore) and, for machines whose policy names a notification block, the
    notification of a waiting approval, to the Prefect server."""
    from hotspare.machine import list_machines, load_machine

    st = open_store(store)
    load_flows()
    _register_blocks()
    from deployments import automations as auto

    params = {"store_block": store_block} if store_block else {"store": st.url}
    failover_id = auto.deployment_id("failover/failover")
    cfgs = [load_machine(st, m) for m in (machines or list_machines(st))]
    items = [auto.heartbeat_loss(cfg, failover_id, params) for cfg in cfgs]
    items += [auto.approval_notification(cfg, auto.notification_block_id(cfg.policy.notify_block))
              for cfg in cfgs if cfg.policy.notify_block]  # approvals waiting notify the policy's block
    items.append(auto.alert_down(failover_id, params))
    items.append(auto.restore_heartbeat(auto.deployment_id("failback/failback"), params))
    for name in auto.apply(items):
        console.print(f"automation {name} applied")


def _register_blocks() -> None:
    """Register hotspare's block types, so the UI offers them (Blocks > +) before anyone
    has saved one."""
    from blocks import register_block_types

    for slug in register_block_types():
        console.print(f"block type {slug} registered")
