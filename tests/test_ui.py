"""The Prefect UI as an on-call engineer meets it, in a real browser: Debian's Chromium
driven by Playwright (no browser download), against the session's ``prefect server start``.

A failover pauses for its approval; the test opens the paused run's page, presses Resume,
reads the form (the facts as absolute times, a required decision and a required name),
approves, and sees the run end Completed with the VM booted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotspare.state import load_state
from hotspare.store import open_store
from tests.helpers import cli, require
from tests.test_failover import _wait_paused, protect_demo, run_flow_in_thread, stop_vm

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = require("chromium", "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        msg = "playwright is missing: pip install -c constraints.txt -e .[test] (scripts/setup.sh does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _screen_text(vm: dict, dump: Path) -> str:
    """The characters on the VM's VGA text screen (its 32 KiB of text memory at 0xb8000,
    every other byte), saved by QEMU through QMP."""
    from hotspare.vm.host import VmHandle
    from hotspare.vm.qemu.local import LocalQemuHost

    handle = VmHandle.model_validate(vm)
    with LocalQemuHost().qmp(handle) as q:
        q.execute("pmemsave", {"val": 0xB8000, "size": 32768, "filename": str(dump)})
    return dump.read_bytes()[0::2].decode("latin-1")


def _ui(prefect_api: str) -> str:
    return prefect_api.removesuffix("/api")


def test_approving_a_paused_failover_in_the_ui_boots_the_vm(tmp_path: Path, demo_disk: Path, prefect_api: str,
                                                           browser) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    from flows.failover import failover

    env = protect_demo(tmp_path, demo_disk)
    cli("consolidate", "demo", env=env)  # its first recovery point, which the form names
    st = open_store(env["HOTSPARE_STORE"])
    time.sleep(11)  # the machine goes silent
    t, out = run_flow_in_thread(failover, machine="demo", store=env["HOTSPARE_STORE"], vm_dir=env["HOTSPARE_VM_DIR"],
                                boot_timeout=90.0)
    run = None
    try:
        run = _wait_paused("failover demo")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{_ui(prefect_api)}/runs/flow-run/{run.id}")
            badge = page.locator(".state-badge").first  # the run's state, beside its name
            expect(badge).to_have_text("Paused", timeout=20_000)
            page.get_by_role("button", name="Resume").first.click()
            form = page.get_by_role("dialog")
            expect(form.get_by_text("Fail over demo?")).to_be_visible()
            # The facts, as absolute times that stay true however late the form is read.
            stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
            def row(name: str):
                return form.locator("tr", has_text=name)

            expect(row("Last heartbeat")).to_contain_text(re.compile(stamp + r" \(\d+ s before this request"))
            expect(row("Recovery point")).to_contain_text(re.compile(r"0-\d+ of disk root, taken " + stamp))
            expect(row("VM host")).to_contain_text("local")
            expect(row("Deadline")).to_contain_text(re.compile(stamp + ": no answer by then rejects"))
            # An untouched form cannot be sent: the decision and the name are required.
            form.get_by_role("button", name="Submit").click()
            expect(form.get_by_text("'decision' is a required property")).to_be_visible()
            expect(form.get_by_text("'by' is a required property")).to_be_visible()
            assert load_state(st, "demo").state == "protected", "nothing happened on an invalid submit"
            # Approve, with a name.
            decision = form.locator(".schema-form-property", has_text="Decision").locator(".p-select-button__control")
            approve = page.get_by_role("option", name="approve")
            for _ in range(5):  # the select opens on Space (a click at the wrong moment toggles it shut)
                decision.focus()
                page.keyboard.press("Space")
                with contextlib.suppress(PlaywrightTimeout):  # not open yet: try again
                    approve.wait_for(timeout=2000)
                    break
            approve.click()
            form.locator(".schema-form-property", has_text="By").locator("textarea").fill("alice")
            form.locator(".schema-form-property", has_text="Why").locator("textarea").fill("web1 is down")
            form.get_by_role("button", name="Submit").click()
            expect(form).to_be_hidden()
            # The operator watches the run's page until it ends.
            deadline = time.monotonic() + 150
            while (shown := badge.inner_text().strip()) != "Completed":
                assert shown not in ("Failed", "Crashed", "Cancelled"), f"the approved failover ended {shown}"
                assert time.monotonic() < deadline, f"the approved failover still shows {shown} in the UI"
                time.sleep(3)
                page.reload()
                badge.wait_for()
            t.join(60)
            assert out["state"].is_completed(), out["state"]
            ms = load_state(st, "demo")
            assert (ms.state, ms.approval["decision"], ms.approval["by"]) == ("failed-over", "approve", "alice")
            # The screen proves the boot: the guest's marker is in the VGA console's text (read
            # from the VM's memory through QMP), not only the boot loader's banner.
            assert "hotspare-marker counter=" in _screen_text(ms.vm, tmp_path / "vga.bin")
            # The failover's console artifact holds the serial console's tail.
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            with get_client(sync_client=True) as client:  # (Artifact.get is async under Playwright's loop)
                console = client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["failover-console-demo"])))
            assert console and "hotspare-marker counter=" in str(console[0].data), console
            # The fleet view: status checks the VM live, and the UI's Artifacts page shows it.
            import json

            health = json.loads(cli("status", "demo", "--json", env=env).stdout)["vm_health"]
            assert (health["status"], health["capture"]) == ("running", "alive"), health
            cli("status", "--publish", env=env)
            page.goto(f"{_ui(prefect_api)}/artifacts/key/hotspare-fleet")  # Artifacts > hotspare-fleet
            page.locator("a[href*='/artifacts/artifact/']").first.click()  # its newest version
            row = page.get_by_role("row").filter(has_text="demo")
            expect(row).to_contain_text("failed-over", timeout=20_000)
            expect(row).to_contain_text(f"local:{ms.vm['vm_id']}")
            expect(row).to_contain_text("running")
            expect(row).to_contain_text("alive")
        finally:
            page.close()
    finally:
        if run is not None and t.is_alive() and load_state(st, "demo").state == "protected":  # still paused: answer it
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.resume_flow_run(run.id, run_input={"decision": "reject", "by": "test", "why": "test failed"})
        t.join(150)
        stop_vm(env)
