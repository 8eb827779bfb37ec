"""deployments/prefect.yaml applies to a real server, and a scheduled deployment's run is
executed by a worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import cli, random_image

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.prefix) / "bin" / "prefect")


@pytest.fixture(scope="module")
def deployed(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    store = tmp_path_factory.mktemp("deploy") / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_MACHINE": "m1",
           "HOTSPARE_STORE_BLOCK": ""}
    subprocess.run([PREFECT, "work-pool", "create", "hotspare", "--type", "process", "--overwrite"], env=env,
                   check=True, capture_output=True)
    r = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"store": str(store)}


def test_deployments_have_schedules(deployed: dict[str, str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = {d.name: d for d in client.read_deployments()}
        assert {"ingest", "consolidate", "failover", "failback"} <= set(found)
        for name, seconds in (("ingest", 300), ("consolidate", 900)):
            d = found[name]
            scheds = client.read_deployment_schedules(d.id)
            assert [s.schedule.interval.total_seconds() for s in scheds] == [seconds]
            assert d.parameters["machine"] == "m1"
            assert d.work_pool_name == "hotspare"


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
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while True:
            state = client.read_flow_run(run.id).state
            if state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert state.is_completed(), f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    from hotspare.catalog import load_catalog
    from hotspare.store import open_store

    assert load_catalog(open_store(deployed["store"]), "m1", "root", 8 << 20).applied_seq(0) >= 0
