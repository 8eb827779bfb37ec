"""One deployment per job for the whole fleet: the survey finds the machines with work, one
fleet run covers machines protected after the deploy (runs named after each machine), a
busy machine is skipped without holding up the others, and automations pass the machine's
name. Real Prefect server, real worker, SeaweedFS as the store of the deployed runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hotspare import fleet
from hotspare.catalog import load_catalog
from hotspare.errors import HotspareError
from hotspare.store import open_store
from tests.helpers import PREFECT, cli, random_image
from tests.test_deployments import FLEET, REPO, _wait_final, deploy, unschedule

SIZE = 4 << 20
MACHINES = ("m1", "m2", "m3")
# Seconds a fleet run waits for a machine's lease. It also bounds the round trip of taking a
# free one, which took over 1 s on these loaded machines: not much smaller than this.
BUSY_WAIT = 15.0


def protect(store: str, tmp: Path, machine: str, *, ship: bool = True, seed: int = 1) -> None:
    image = tmp / f"{machine}.img"
    random_image(image, SIZE, seed=seed, fill=0.5)
    env = {"HOTSPARE_STORE": store, "HOTSPARE_AGENT_STATE": str(tmp / "agent")}
    cli("protect", machine, "--disk", f"root={image}", env=env)
    if ship:
        cli("agent", machine, "--once", env=env)


def test_the_survey_finds_the_machines_with_work(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    protect(store, tmp_path, "m1", seed=1)
    protect(store, tmp_path, "m2", ship=False)  # protected, its agent has shipped nothing yet
    protect(store, tmp_path, "m3", seed=3)
    st = open_store(store)
    st.put("machines/bad/machine.json", b"{not json")
    surveys = {s.machine: s for s in fleet.survey_fleet(st)}
    assert sorted(surveys) == ["bad", "m1", "m2", "m3"]
    assert surveys["m1"].pending_logs >= 1 and surveys["m2"].pending_logs == 0
    assert "machine bad" in surveys["bad"].error and "machines/bad/machine.json" in surveys["bad"].error
    assert fleet.with_work(list(surveys.values()), "ingest") == ["m1", "m3"]
    assert fleet.with_work(list(surveys.values()), "consolidate") == ["m1", "m3"]
    with pytest.raises(HotspareError, match="fleet job 'defrag' is unknown"):
        fleet.with_work(list(surveys.values()), "defrag")  # type: ignore[arg-type]


def test_a_busy_machine_is_skipped_and_the_others_proceed(prefect_api: str, tmp_path: Path) -> None:
    """Another run holds m2's lease: the fleet run ingests m1 and m3, leaves m2 alone (its
    catalog untouched) and says so; the next run, with the lease free, ingests m2."""
    from flows.fleet import fleet_ingest
    from prefect.client.orchestration import get_client
    from tasks.fleet import MachineBusy, machine_lease

    store = str(tmp_path / "store")
    for i, m in enumerate(MACHINES):
        protect(store, tmp_path, m, seed=10 + i)
    st = open_store(store)
    with machine_lease("m2", wait=5):
        with pytest.raises(MachineBusy, match="machine m2: another run holds its lease hotspare-machine-m2"):
            with machine_lease("m2", wait=0.5):
                pass
        runs = {r.machine: r for r in fleet_ingest(store=store, busy_wait=BUSY_WAIT)}
        assert {m: r.outcome for m, r in runs.items()} == {"m1": "done", "m2": "busy", "m3": "done"}
        assert load_catalog(st, "m2", "root", SIZE).version == 0
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("hotspare-machine-m2").limit == 1
    assert {r.machine: r.outcome for r in fleet_ingest(store=store, busy_wait=BUSY_WAIT)} == \
        {"m1": "nothing new", "m2": "done", "m3": "nothing new"}
    assert fleet.with_work(fleet.survey_fleet(st), "ingest") == []
    assert fleet.with_work(fleet.survey_fleet(st), "consolidate") == list(MACHINES)


def test_a_machine_that_fails_fails_the_fleet_run_after_the_others(prefect_api: str, tmp_path: Path) -> None:
    from flows.fleet import fleet_ingest

    store = str(tmp_path / "store")
    protect(store, tmp_path, "m1", seed=21)
    protect(store, tmp_path, "m3", seed=23)
    open_store(store).put("machines/m2/machine.json", b'{"name": "m2", "disks": []}')
    state = fleet_ingest(store=store, busy_wait=BUSY_WAIT, return_state=True)
    assert state.is_failed()
    with pytest.raises(HotspareError, match=r"fleet ingest: 1 of 3 machine\(s\) failed: cannot survey machine m2: "
                                            r"machines/m2/machine.json"):
        state.result()
    st = open_store(store)
    assert load_catalog(st, "m1", "root", SIZE).applied_seq(0) >= 0
    assert load_catalog(st, "m3", "root", SIZE).applied_seq(0) >= 0


@pytest.fixture(scope="module")
def fleet_deployed(prefect_api: str):
    env = {"PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_STORE_BLOCK": ""}
    deploy({**os.environ, **env})
    yield env  # the variables on top of the environment of each test (s3_env sets AWS_*)
    unschedule(*FLEET)


def _run_deployment_with_a_worker(name: str, store: str, env: dict[str, str]):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(dep.id, parameters={"store": store})
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "hotspare", "--run-once"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    state = _wait_final(run.id, 60)
    assert state.is_completed(), f"{name}: {state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    return run


def _subflow_names(parent_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        assert all(r.state.is_completed() for r in children), [(r.name, r.state) for r in children]
        return {r.name for r in children}


def test_one_deployment_covers_machines_protected_after_it(fleet_deployed: dict[str, str], s3_env,
                                                           tmp_path: Path) -> None:
    """Deployed once (above), then three machines protected: one fleet-ingest run and one
    fleet-consolidate run, executed by a worker, cover all three with no redeploy."""
    bucket = f"hotspare-fleet-{uuid.uuid4().hex[:10]}"
    s3_env.client().create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/root"
    for i, m in enumerate(MACHINES):
        protect(store, tmp_path, m, seed=30 + i)
    env = {**os.environ, **fleet_deployed, "HOTSPARE_STORE": store}
    st = open_store(store)

    run = _run_deployment_with_a_worker("fleet-ingest/fleet-ingest", store, env)
    assert _subflow_names(run.id) == {f"ingest {m}" for m in MACHINES}
    for m in MACHINES:
        assert load_catalog(st, m, "root", SIZE).applied_seq(0) >= 0, m

    run = _run_deployment_with_a_worker("fleet-consolidate/fleet-consolidate", store, env)
    assert _subflow_names(run.id) == {f"consolidate {m}" for m in MACHINES}
    for m in MACHINES:
        assert load_catalog(st, m, "root", SIZE).point("current") is not None, m
    assert fleet.with_work(fleet.survey_fleet(st), "consolidate") == []

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-consolidate"])),
                                      limit=1, sort="CREATED_DESC")[0]
    assert table.flow_run_id == run.id
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["machine"]: r["outcome"] for r in rows} == {m: "done" for m in MACHINES}, rows


@pytest.mark.parametrize("trigger", ["alert-down", "heartbeat-loss"])
def test_automations_pass_the_machine_name(fleet_deployed: dict[str, str], tmp_path: Path, trigger: str) -> None:
    """An outside alert names only the resource id (no prefect.resource.name label), and a
    proactive heartbeat-loss trigger fires with no event of its own: either way the failover
    run the automation starts has ``machine: m9``, not ``hotspare.machine.m9``."""
    from deployments import automations as auto
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter
    from prefect.events import emit_event

    from hotspare.machine import DiskSpec, MachineConfig, Policy

    failover_id = auto.deployment_id("failover/failover")
    params = {"store": str(tmp_path / "store")}
    if trigger == "alert-down":
        automation, event = auto.alert_down(failover_id, params), auto.DOWN
    else:
        cfg = MachineConfig(name="m9", disks=[DiskSpec(name="root", path="/dev/null", size=1 << 20)],
                            policy=Policy(heartbeat_window=10))
        automation, event = auto.heartbeat_loss(cfg, failover_id, params), auto.HEARTBEAT
    auto.apply([automation])
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            runs = []
            sent = 0
            while not runs:
                assert time.monotonic() < deadline, f"the {trigger} automation started no failover run"
                if trigger == "alert-down" or sent < 3:  # heartbeats, then silence
                    emit_event(event=event, resource={"prefect.resource.id": "hotspare.machine.m9"})
                    sent += 1
                time.sleep(3)
                runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [failover_id]}))
                        if r.parameters.get("store") == params["store"]]  # not an earlier test's runs
            assert {r.parameters["machine"] for r in runs} == {"m9"}
    finally:
        # No failover run may be left for a later test's worker: drop the automation, let
        # the events in flight land, then delete every run it started.
        with get_client(sync_client=True) as client:
            for a in client.read_automations_by_name(automation.name):
                client.delete_automation(a.id)
            time.sleep(3)
            for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [failover_id]})):
                client.delete_flow_run(r.id)
