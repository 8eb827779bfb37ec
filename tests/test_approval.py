"""A waiting approval notifies someone: the request's event, through the automation that
``hotspare deploy`` applies for a policy's notification block, reaches a real webhook."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from hotspare.machine import load_machine
from hotspare.store import open_store
from tests.test_failover import _drop_automations, _wait_paused, protect_demo, run_flow_in_thread

pytestmark = pytest.mark.usefixtures("prefect_api")


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:  # http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_waiting_failover_approval_notifies_the_policys_webhook(tmp_path: Path, demo_disk: Path,
                                                                  request: pytest.FixtureRequest) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    from deployments import automations as auto
    from flows.failover import failover

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)
    request.addfinalizer(_drop_automations)
    CustomWebhookNotificationBlock(name="on-call", url=f"http://127.0.0.1:{server.server_port}/hook",
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("oncall", overwrite=True)

    env = protect_demo(tmp_path, demo_disk, "--notify-block", "oncall")
    st = open_store(env["HOTSPARE_STORE"])
    cfg = load_machine(st, "demo")
    assert cfg.policy.notify_block == "oncall"
    # What `hotspare deploy` applies for this machine (its failover deployment aside).
    auto.apply([auto.approval_notification(cfg, auto.notification_block_id(cfg.policy.notify_block))])
    with pytest.raises(Exception, match="notification block custom-webhook/nobody .* not found"):
        auto.notification_block_id("nobody")

    time.sleep(11)  # the machine goes silent
    t, out = run_flow_in_thread(failover, machine="demo", store=env["HOTSPARE_STORE"], vm_dir=env["HOTSPARE_VM_DIR"])
    run = _wait_paused("failover demo")
    try:
        deadline = time.monotonic() + 60
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _Hook.received, "no notification reached the webhook within 60 s of the approval request"
        note = _Hook.received[0]
        assert note["subject"] == "hotspare: approval needed, Fail over demo? No heartbeat within its 10 s window.", note
        body = note["body"]
        for line in ("Machine: demo", "Last heartbeat: ", "Recovery point: ", "VM host: local", "Deadline: ",
                     f"/runs/flow-run/{run.id}"):
            assert line in body, (line, body)
    finally:
        with get_client(sync_client=True) as client:
            client.resume_flow_run(run.id, run_input={"decision": "reject", "by": "test", "why": "notification seen"})
        t.join(60)
    assert out["state"].is_cancelled() and "rejected by test" in out["state"].message
