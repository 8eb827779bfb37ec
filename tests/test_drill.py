"""Drills of the demo machine: real QEMU (TCG where KVM is missing), real nbdkit servers
over the replica's chunks, and a real Prefect API for the flow, its artifacts and events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hotspare.catalog import load_catalog
from hotspare.machine import load_machine
from hotspare.replica.index import read_root
from hotspare.replica.reader import ChunkReader
from hotspare.state import load_state
from hotspare.store import open_store
from hotspare.vm.host import load_handle
from tests.helpers import cli, stop_group

pytestmark = pytest.mark.usefixtures("prefect_api")


def status_cli(*args: str, env: dict[str, str]):
    """``hotspare status``: exit 3 only says a machine is stalled (the protected machine here
    stops heartbeating after its agent's single cycle), which is not what these tests judge."""
    r = cli("status", *args, env=env, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    return r


def protect_demo(tmp_path: Path, demo_disk: Path) -> dict[str, str]:
    """The demo machine protected, its seed shipped and consolidated into a point."""
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_VM_DIR": str(tmp_path / "vms"), "COLUMNS": "400"}  # tables unwrapped
    cli("protect", "demo", "--disk", f"root={demo_disk}", *env_free_args(), env=env)
    cli("agent", "demo", "--once", "--quiet", env=env)
    cli("consolidate", "demo", env=env)
    return env


def env_free_args() -> tuple[str, ...]:
    return ("--heartbeat-window", "10")


def drill_dir(tmp_path: Path) -> Path:
    return tmp_path / "vms" / "demo-drill"


def catalogs(env: dict[str, str]) -> dict:
    st = open_store(env["HOTSPARE_STORE"])
    cfg = load_machine(st, "demo")
    return {d.name: load_catalog(st, "demo", d.name, d.size) for d in cfg.disks}


def assert_nothing_left(tmp_path: Path) -> None:
    d = drill_dir(tmp_path)
    left = sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) if d.exists() else []
    assert all(p.endswith((".log", ".png")) for p in left), f"the drill left {left}"
    assert not list(d.rglob("*.sock")) and not list(d.rglob("*.qcow2")) and not (d / "handle.json").exists()
    # No QEMU and no nbdkit of the drill directory still runs (their command lines name it).
    found = subprocess.run(["pgrep", "-af", str(d)], check=False, capture_output=True, text=True).stdout.strip()
    assert not [ln for ln in found.splitlines() if "pgrep" not in ln], f"still running: {found}"


def drill_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["drill demo"])),
                                     sort=FlowRunSort.START_TIME_DESC)


def run_artifacts(run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def drill_event(name: str, run_id) -> dict:
    """The payload of the ``name`` event the drill run ``run_id`` emitted for the demo machine."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=["hotspare.machine.demo"]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            found = [e.payload for e in client.read_events(filter=flt, limit=50).events
                     if e.payload.get("flow_run_id") == str(run_id)]
            if found or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert found, f"no {name} event of run {run_id}"
    return found[0]


def test_drill_of_a_good_point_verifies_it_and_leaves_nothing_behind(tmp_path: Path, demo_disk: Path) -> None:
    env = protect_demo(tmp_path, demo_disk)
    before = drill_runs()
    r = cli("drill", "demo", env=env)
    assert "verified" in r.stdout, r.stdout
    cats = catalogs(env)
    (p,) = cats["root"].points
    assert p.drill is not None and p.drill.verdict == "verified" and p.drill.seconds and p.drill.seconds > 0
    assert_nothing_left(tmp_path)
    assert load_state(open_store(env["HOTSPARE_STORE"]), "demo").state == "protected", "the drill fences nothing"
    assert not (tmp_path / "vms" / "demo").exists(), "the drill has its own directory"

    runs = [fr for fr in drill_runs() if fr.id not in {b.id for b in before}]
    assert len(runs) == 1 and runs[0].state.is_completed()
    arts = {a.key: a for a in run_artifacts(runs[0].id)}
    shot = arts["drill-screen-demo"]
    assert shot.type == "image" and shot.data.startswith("data:image/png;base64,")
    import base64

    png = base64.b64decode(shot.data.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert arts["drill-demo"].type == "table" and "verified" in arts["drill-demo"].data
    assert drill_event("hotspare.drill.verified", runs[0].id)["seconds"] == p.drill.seconds

    # points and status show the truth.
    pts = json.loads(cli("points", "demo", "--json", env=env).stdout)
    assert pts["root"][0]["drill"]["verdict"] == "verified"
    status = json.loads(status_cli("demo", "--json", env=env).stdout)
    assert status["drill"]["newest_verified_point"] == p.id
    assert 0 <= status["drill"]["last_success_age_seconds"] < 600
    table = status_cli("demo", env=env).stdout
    assert "verified" in table and "never drilled" not in table


def test_status_says_never_drilled(tmp_path: Path, demo_disk: Path) -> None:
    env = protect_demo(tmp_path, demo_disk)
    assert "never drilled" in status_cli(env=env).stdout
    assert json.loads(status_cli("demo", "--json", env=env).stdout)["drill"]["drilled"] is False
    assert "never drilled" in cli("points", "demo", env=env).stdout


def damage_boot_chunks(env: dict[str, str]) -> list[str]:
    """Overwrite, inside their packs in the local store, the stored chunks of the first MiB
    of the root disk's point (the boot sector and loader) with garbage of the same length."""
    st = open_store(env["HOTSPARE_STORE"])
    (p,) = catalogs(env)["root"].points
    root = read_root(st, p.root)
    ents = ChunkReader(st, root).entries(0, (1 << 20) // root.chunk_size - 1)
    damaged = []
    for e in ents:
        if int(e["length"]) == 0:
            continue
        ref = root.packs[f"{int(e['pack']):016x}"]
        path = Path(env["HOTSPARE_STORE"], *ref.key.split("/"))
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(int(e["offset"]))
            f.write(os.urandom(int(e["length"])))
        damaged.append(ref.key)
    assert damaged, "the first MiB of the demo disk stores no chunk?"
    return damaged


def test_drill_of_a_point_with_a_damaged_boot_chunk_fails_with_the_reason(tmp_path: Path, demo_disk: Path) -> None:
    env = protect_demo(tmp_path, demo_disk)
    damage_boot_chunks(env)
    r = cli("drill", "demo", "--boot-timeout", "90", env=env, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed" in r.stderr and "SHA-256" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    (p,) = catalogs(env)["root"].points
    assert p.drill is not None and p.drill.verdict == "failed" and "SHA-256" in p.drill.reason
    assert_nothing_left(tmp_path)
    (run, *_) = drill_runs()
    assert run.state.is_failed() and "SHA-256" in (run.state.message or "")
    assert "SHA-256" in drill_event("hotspare.drill.failed", run.id)["reason"]
    assert "FAILED" in cli("points", "demo", env=env).stdout
    status = json.loads(status_cli("demo", "--json", env=env).stdout)["drill"]
    assert status["drilled"] and status["newest_verified_point"] is None and status["last_verdict"] == "failed"


def test_a_drill_killed_mid_boot_is_cleaned_up_by_the_next(tmp_path: Path, demo_disk: Path) -> None:
    env = protect_demo(tmp_path, demo_disk)
    r = cli("drill", "demo", env={**env, "HOTSPARE_CRASH_AT": "drill-mid-boot"}, check=False)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    handle = load_handle(drill_dir(tmp_path))
    assert handle is not None and handle.pid is not None
    os.kill(handle.pid, 0)  # the dead drill's VM still runs
    assert list((drill_dir(tmp_path) / "serve").glob("*.pid")), "and its point server"
    assert catalogs(env)["root"].points[0].drill is None

    # The re-run waits for the dead drill's lease to expire (about a minute), then cleans up.
    r = cli("drill", "demo", env=env, timeout=600)
    assert "verified" in r.stdout
    deadline = time.monotonic() + 10
    while Path(f"/proc/{handle.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{handle.pid}").exists() or handle.vm_id.encode() not in \
        Path(f"/proc/{handle.pid}/cmdline").read_bytes(), "the dead drill's VM was killed"
    assert catalogs(env)["root"].points[0].drill.verdict == "verified"
    assert_nothing_left(tmp_path)


def _without_drill(cat) -> dict:
    data = cat.model_dump(mode="json", exclude={"version", "committed_at"})
    for p in data["points"]:
        p.pop("drill")
    return data


def test_a_drill_while_the_machine_is_protected_changes_only_the_verdict(tmp_path: Path, demo_disk: Path) -> None:
    env = protect_demo(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    agent = subprocess.Popen(["hotspare", "agent", "demo", "--quiet", "--interval", "1"],
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        time.sleep(3)
        assert agent.poll() is None, "the agent runs"
        before = catalogs(env)["root"]
        packs = sorted(i.key for i in st.list("machines/demo/") if "/packs/" in i.key)
        index = sorted(i.key for i in st.list("machines/demo/") if "/index/" in i.key)
        state = load_state(st, "demo")
        cli("drill", "demo", env=env)
        from hotspare.heartbeat import load_heartbeat

        hb = load_heartbeat(st, "demo")
        assert hb is not None and hb.age < 10, "the agent kept its heartbeats through the drill"
        after = catalogs(env)["root"]
        assert after.version == before.version + 1
        assert _without_drill(after) == _without_drill(before)
        assert after.points[0].drill.verdict == "verified"
        assert sorted(i.key for i in st.list("machines/demo/") if "/packs/" in i.key) == packs
        assert sorted(i.key for i in st.list("machines/demo/") if "/index/" in i.key) == index
        now = load_state(st, "demo")
        assert (now.version, now.state, now.epoch) == (state.version, "protected", 0), "the machine's state is untouched"
        assert agent.poll() is None, "the agent still runs"
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    assert_nothing_left(tmp_path)


def test_a_drill_cancelled_from_prefect_tears_down_its_vm(prefect_api: str, tmp_path: Path, demo_disk: Path) -> None:
    """The drill deployment run by a worker, cancelled (as the UI's Cancel does) while its VM
    boots: the run ends Cancelled, and its VM, servers and overlays are gone with it."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from tests.test_deployments import REPO, _wait_final, deploy, start_worker, unschedule

    env = protect_demo(tmp_path, demo_disk)
    full = {**os.environ, **env, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_STORE_BLOCK": ""}
    pool = "hotspare-drill-test"
    deploy(full, "drill", pool=pool, extra=("--pool", pool))
    log = open(tmp_path / "worker.log", "w+")
    worker = start_worker(pool, full, log)
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("drill/drill")
            run = client.create_flow_run_from_deployment(dep.id, parameters={
                "machine": "demo", "store": env["HOTSPARE_STORE"], "store_block": None,
                "vm_dir": env["HOTSPARE_VM_DIR"], "boot_timeout": 600})
            deadline = time.monotonic() + 120
            while load_handle(drill_dir(tmp_path)) is None:  # the drill's VM was launched
                log.seek(0)
                assert time.monotonic() < deadline, f"no drill VM within 120 s\n{log.read()[-3000:]}"
                time.sleep(0.2)
            handle = load_handle(drill_dir(tmp_path))
            client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"), force=True)
        state = _wait_final(run.id, 120)
        log.seek(0)
        assert state.is_cancelled(), f"{state}\n{log.read()[-3000:]}"
    finally:
        stop_group(worker)
        unschedule("drill/drill")
        log.close()
    assert not Path(f"/proc/{handle.pid}").exists() or handle.vm_id.encode() not in \
        Path(f"/proc/{handle.pid}/cmdline").read_bytes(), "the cancelled drill's VM was stopped"
    assert_nothing_left(tmp_path)
    assert catalogs(env)["root"].points[0].drill is None, "a cancelled drill gives no verdict"

