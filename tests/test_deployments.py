"""deployments/prefect.yaml applies to a real server; a worker runs its deployments, and a
scheduled deployment gets runs from the server's scheduler that a worker completes with no
one starting them."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PREFECT, cli, random_image, stop_group

REPO = Path(__file__).resolve().parent.parent
FLEET = ("fleet-ingest/fleet-ingest", "fleet-consolidate/fleet-consolidate", "vhd/vhd", "check/check", "drill/drill")


def deploy(env: dict[str, str], *names: str, pool: str = "hotspare", extra: tuple[str, ...] = ()) -> None:
    """Create the work pool and apply prefect.yaml (every deployment, or ``names``), as the
    README tells an operator to."""
    subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                   check=True, capture_output=True)
    which = [a for n in names for a in ("--name", n)] or ["--all"]
    r = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", *which, *extra],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def start_worker(pool: str, env: dict[str, str], log) -> subprocess.Popen:
    """``prefect worker start --pool POOL`` as README tells operators to run it, polling every
    2 s, in a session of its own (stop it with ``stop_group``), its output in ``log``."""
    return subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"})


def unschedule(*names: str) -> None:
    """Pause the deployments' schedules and delete their runs not yet started, so that a
    worker of a later test never picks one up."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateName)
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            client.pause_deployment(dep.id)
            for run in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled", "Late"])))):
                client.delete_flow_run(run.id)


@pytest.fixture(scope="module")
def deployed(prefect_api: str, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("deploy") / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_STORE_BLOCK": ""}
    deploy(env)
    yield {"store": str(store)}
    unschedule(*FLEET)


def test_deployments_have_schedules_and_bind_no_machine(deployed: dict[str, str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = {d.name: d for d in client.read_deployments()}
        assert {"fleet-ingest", "fleet-consolidate", "vhd", "check", "drill", "ingest", "consolidate", "failover",
                "failback"} <= set(found)
        for name, seconds in (("fleet-ingest", 300), ("fleet-consolidate", 900), ("vhd", 86400), ("check", 604800),
                              ("drill", 86400)):
            scheds = client.read_deployment_schedules(found[name].id)
            assert [s.schedule.interval.total_seconds() for s in scheds] == [seconds], name
        for name in ("ingest", "consolidate"):
            assert client.read_deployment_schedules(found[name].id) == [], f"{name} runs one machine: no schedule"
        for d in found.values():
            assert "machine" not in d.parameters, f"deployment {d.name} binds machine {d.parameters['machine']!r}"
            assert d.work_pool_name == "hotspare"
    text = (REPO / "deployments" / "prefect.yaml").read_text()
    assert "HOTSPARE_MACHINE" not in text


def _wait_final(run_id, timeout: float):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while True:
            state = client.read_flow_run(run_id).state
            if state.is_final() or time.monotonic() > deadline:
                return state
            time.sleep(1)


def test_a_worker_runs_the_ingest_deployment(deployed: dict[str, str], tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    image = tmp_path / "disk.img"
    random_image(image, 8 << 20)
    env = {"HOTSPARE_STORE": deployed["store"], "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_TRACKER": "scan"}
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("ingest/ingest")
        run = client.create_flow_run_from_deployment(dep.id, parameters={"machine": "m1", "store": deployed["store"],
                                                                        "store_block": None})
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "hotspare", "--run-once"], cwd=REPO,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
    state = _wait_final(run.id, 60)
    assert state.is_completed(), f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    from hotspare.catalog import load_catalog
    from hotspare.store import open_store

    assert load_catalog(open_store(deployed["store"]), "m1", "root", 8 << 20).applied_seq(0) >= 0


def test_the_scheduler_starts_a_run_that_a_worker_completes(prefect_api: str, tmp_path: Path) -> None:
    """Nobody starts a run: the server's scheduler makes one from the fleet-ingest schedule,
    and `prefect worker start --pool ...` (what README tells operators to run) executes it.
    With SQLAlchemy 2.1.9 under prefect 3.9.0 the scheduler failed every loop and no run ever
    came; this waits for one and for its work (the machine's catalog advanced)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter

    from hotspare.catalog import load_catalog
    from hotspare.store import open_store

    store = tmp_path / "store"
    image = tmp_path / "disk.img"
    random_image(image, 4 << 20, seed=3, fill=0.5)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_STORE_BLOCK": "",
           "HOTSPARE_STORE": str(store), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent")}
    cli("protect", "s1", "--disk", f"root={image}", env=env)
    cli("agent", "s1", "--once", env=env)
    # prefect.yaml's fleet-ingest (every 5 minutes, first run 5 minutes after the deploy) plus a
    # 10 s interval, in a pool of its own that only this test's worker serves, one run at a time.
    pool = "hotspare-schedule-test"
    deploy(env, "fleet-ingest", pool=pool, extra=("--pool", pool, "--interval", "10"))
    subprocess.run([PREFECT, "work-pool", "set-concurrency-limit", pool, "1"], env=env, check=True,
                   capture_output=True)
    log = open(tmp_path / "worker.log", "w+")
    worker = start_worker(pool, env, log)
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("fleet-ingest/fleet-ingest")
            deadline = time.monotonic() + 150
            done = []
            while not done:
                # Only this test's pool: another file's tests may have run fleet-ingest on this server.
                runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))
                        if r.work_pool_name == pool]
                done = [r for r in runs if r.state and r.state.is_completed()]
                failed = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
                assert not failed, f"{failed[0].name}: {failed[0].state}\n{_tail(log)}"
                assert time.monotonic() < deadline, (
                    f"no scheduled run completed in 150 s ({len(runs)} run(s): "
                    f"{sorted({r.state_name for r in runs})})\n{_tail(log)}")
                time.sleep(1)
            assert done[0].auto_scheduled, "the run was made by the scheduler, not by a person"
            assert done[0].work_pool_name == pool
    finally:
        stop_group(worker)
        unschedule("fleet-ingest/fleet-ingest")
        log.close()
    assert load_catalog(open_store(str(store)), "s1", "root", 4 << 20).applied_seq(0) >= 0


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]
