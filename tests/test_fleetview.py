"""The fleet at a glance: ``hotspare status`` and the ``hotspare-fleet`` artifact show each
machine's state, heartbeat age, replica lag, newest consistent point and its VM's live
status and capture; a dead VM or capture emits an event; fleet runs refresh the artifact."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from hotspare.state import commit_state, load_state
from hotspare.store import open_store
from tests.helpers import cli, random_image

pytestmark = pytest.mark.usefixtures("prefect_api")


def _fleet_artifact() -> dict[str, dict]:
    from prefect.artifacts import Artifact

    art = Artifact.get("hotspare-fleet")
    assert art is not None, "no hotspare-fleet artifact"
    rows = json.loads(art.data) if isinstance(art.data, str) else art.data
    return {r["machine"]: r for r in rows}


def _events(prefect_api: str, name: str, machine: str) -> list[dict]:
    import httpx

    r = httpx.post(f"{prefect_api}/events/filter", json={"filter": {
        "event": {"name": [name]}, "resource": {"id": [f"hotspare.machine.{machine}"]},
        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50})
    r.raise_for_status()
    return r.json()["events"]


def test_status_and_the_fleet_artifact_show_a_dead_vm_and_its_capture(tmp_path: Path, prefect_api: str) -> None:
    from flows.fleet import fleet_ingest

    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent")}
    for m in ("web1", "db1"):
        random_image(tmp_path / f"{m}.img", 4 << 20)
        cli("protect", m, "--disk", f"root={tmp_path / f'{m}.img'}", env=env)
        cli("agent", m, "--once", "--quiet", env=env)
    cli("consolidate", "web1", env=env)
    # db1 failed over to a VM that has since died (its QEMU process exited), capture gone.
    st = open_store(env["HOTSPARE_STORE"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    workdir = tmp_path / "vms" / "db1"
    workdir.mkdir(parents=True)
    vm = {"host": "local-qemu", "vm_id": "db1-dead", "machine": "db1", "workdir": str(workdir),
          "boot_disk": str(workdir / "boot.raw"), "format": "raw", "accel": "tcg", "pid": dead.pid,
          "qmp_socket": str(workdir / "qmp.sock"), "serial_log": str(workdir / "serial.log")}
    s = load_state(st, "db1")
    commit_state(st, s.next(state="failed-over", step="verified", host="local", vm=vm, epoch=s.epoch + 1))

    r = cli("status", "--json", env=env)
    report = {m["machine"]: m for m in json.loads(r.stdout)}
    assert report["db1"]["vm_health"] == {"vm_id": "db1-dead", "host": "local", "status": "gone", "running": False,
                                          "capture": "dead", "capture_pid": None}
    assert report["web1"]["vm_health"] is None
    table = cli("status", env={**env, "COLUMNS": "250"}).stdout
    assert "gone, capture dead" in table

    r = cli("status", "--publish", env=env)
    assert "published" in r.stderr and "hotspare-fleet" in r.stderr
    rows = _fleet_artifact()
    assert rows["db1"]["state"] == "failed-over" and rows["db1"]["VM status"] == "gone"
    assert rows["db1"]["capture"] == "dead" and "VM gone" in rows["db1"]["problem"]
    assert rows["web1"]["newest consistent point"].startswith("0-") and rows["web1"]["VM"] == ""
    assert isinstance(rows["web1"]["heartbeat age (s)"], float) and isinstance(rows["web1"]["replica lag (s)"], float)
    deadline = time.monotonic() + 30
    while not (_events(prefect_api, "hotspare.machine.vm-dead", "db1")
               and _events(prefect_api, "hotspare.machine.capture-dead", "db1")):
        assert time.monotonic() < deadline, "no vm-dead and capture-dead events for db1"
        time.sleep(1)

    # A fleet run refreshes the view: web1's new logs become its newest state.
    random_image(tmp_path / "web1.img", 4 << 20, seed=2)
    cli("agent", "web1", "--once", "--quiet", env=env)
    before = _fleet_artifact()["web1"]["heartbeat age (s)"]
    time.sleep(1.5)
    fleet_ingest(store=env["HOTSPARE_STORE"])
    after = _fleet_artifact()
    assert set(after) == {"web1", "db1"} and after["web1"]["heartbeat age (s)"] != before

    # Without a server, --publish says what it needs instead of publishing into a temporary one.
    r = cli("status", "--publish", env={**env, "PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "ph")},
            check=False)
    assert r.returncode == 1 and "--publish needs a running Prefect server" in r.stderr
