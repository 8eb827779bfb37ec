"""Failover through a real Prefect server and real QEMU: refusals, approvals, and the
whole path from a silent agent to a VM whose writes reach the replica."""

from __future__ import annotations

import contextvars
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.consolidate.export import export_point, find_point
from hotspare.demodisk import read_marker
from hotspare.state import load_state
from hotspare.store import open_store
from tests.helpers import HOTSPARE, PREFECT, cli

pytestmark = pytest.mark.usefixtures("prefect_api")
REPO = Path(__file__).resolve().parent.parent


def protect_demo(tmp_path: Path, demo_disk: Path, *extra: str, window: int = 10) -> dict[str, str]:
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_VM_DIR": str(tmp_path / "vms")}
    cli("protect", "demo", "--disk", f"root={demo_disk}", "--heartbeat-window", str(window), *extra, env=env)
    cli("agent", "demo", "--once", "--quiet", env=env)
    return env


def stop_vm(env: dict[str, str]) -> None:
    st = open_store(env["HOTSPARE_STORE"])
    if load_state(st, "demo").vm:
        cli("vm", "stop", "demo", env=env)


def test_failover_is_refused_while_the_heartbeat_is_fresh(tmp_path: Path, demo_disk: Path) -> None:
    # A window the flow's start-up cannot outlast: with 10 s, a loaded machine's temporary
    # Prefect server took longer to start, and the machine rightly counted as silent.
    env = protect_demo(tmp_path, demo_disk, window=600)
    r = cli("failover", "demo", "--approve", env=env, check=False)
    assert r.returncode == 4 and "refusing to fail over a live machine" in r.stderr  # MachineLive
    assert "Traceback" not in r.stderr
    assert load_state(open_store(env["HOTSPARE_STORE"]), "demo").state == "protected"
    assert not (tmp_path / "vms" / "demo" / "handle.json").exists(), "nothing launched"


def test_failover_killed_after_launch_resumes_without_a_second_vm(tmp_path: Path, demo_disk: Path) -> None:
    import signal

    env = protect_demo(tmp_path, demo_disk)
    time.sleep(11)
    r = cli("failover", "demo", "--approve", env={**env, "HOTSPARE_CRASH_AT": "failover-after-launch"}, check=False)
    assert r.returncode == -signal.SIGKILL
    st = open_store(env["HOTSPARE_STORE"])
    assert load_state(st, "demo").state == "failing-over"
    from hotspare.vm.host import load_handle

    first = load_handle(tmp_path / "vms" / "demo")
    assert first is not None and first.pid is not None
    try:
        r = cli("failover", "demo", env=env)  # no approval needed: the state says it was given
        ms = load_state(st, "demo")
        assert ms.state == "failed-over" and ms.vm["vm_id"] == first.vm_id and ms.vm["pid"] == first.pid
        qemus = subprocess.run(["pgrep", "-f", f"guest={first.vm_id}"], capture_output=True, text=True).stdout.split()
        assert qemus == [str(first.pid)], "exactly one VM, the one the crashed run launched"
        r = cli("failover", "demo", env=env)
        assert "already failed over" in r.stdout
    finally:
        stop_vm(env)


def deploy_flows(full_env: dict[str, str]) -> None:
    """The work pool and the failover and failback deployments, as an operator applies them
    (``hotspare deploy`` needs both for its automations)."""
    subprocess.run([PREFECT, "work-pool", "create", "hotspare", "--type", "process", "--overwrite"], env=full_env,
                   check=True, capture_output=True)
    r = subprocess.run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                        "failover", "--name", "failback"], cwd=REPO, env=full_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _drop_automations() -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for a in client.read_automations():
            if a.name.startswith("hotspare-"):
                client.delete_automation(a.id)


def run_flow_in_thread(flow_fn, **params):
    """Run a flow in a thread of this process (with this context: the test's Prefect API);
    ``out["state"]`` holds its final state once the thread ends."""
    out: dict = {}

    def run() -> None:
        out["state"] = flow_fn(return_state=True, **params)

    t = threading.Thread(target=contextvars.copy_context().run, args=(run,))
    t.start()
    return t, out


def _wait_paused(flow_name: str, timeout: float = 60):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            runs = [r for r in runs if r.name == flow_name]
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError(f"no paused run named {flow_name}")


def test_rejected_approval_and_timeout_launch_nothing(tmp_path: Path, demo_disk: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.failover import failover

    env = protect_demo(tmp_path, demo_disk)
    time.sleep(11)  # the machine goes silent
    t, out = run_flow_in_thread(failover, machine="demo", store=env["HOTSPARE_STORE"], vm_dir=env["HOTSPARE_VM_DIR"])
    run = _wait_paused("failover demo")
    with get_client(sync_client=True) as client:
        client.resume_flow_run(run.id, run_input={"decision": "reject", "by": "ops", "why": "it is only a network blip"})
    t.join(120)
    state = out["state"]
    assert state.is_cancelled() and "rejected by ops: it is only a network blip" in state.message
    st = open_store(env["HOTSPARE_STORE"])
    assert load_state(st, "demo").state == "protected"
    assert load_catalog(st, "demo", "root", demo_disk.stat().st_size).fences == [], "no fence without approval"
    assert not (tmp_path / "vms" / "demo" / "handle.json").exists()

    # Timeout: the policy's approval timeout passes with no answer.
    cli("protect", "demo", "--disk", f"root={demo_disk}", env=env)
    from hotspare.machine import load_machine, save_machine

    cfg = load_machine(st, "demo")
    save_machine(st, cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"approval_timeout": 3})}),
                 create_only=False)
    t, out = run_flow_in_thread(failover, machine="demo", store=env["HOTSPARE_STORE"], vm_dir=env["HOTSPARE_VM_DIR"])
    t.join(120)
    assert out["state"].is_cancelled() and "timed out" in out["state"].message
    assert load_state(st, "demo").state == "protected"
    assert not (tmp_path / "vms" / "demo" / "handle.json").exists()


@pytest.mark.parametrize("host", ["local", "docker"])
def test_heartbeat_loss_starts_failover_and_the_vm_writes_reach_the_replica(
        tmp_path: Path, demo_disk: Path, prefect_api: str, host: str, request: pytest.FixtureRequest) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter

    extra = {}
    if host == "docker":
        extra["DOCKER_HOST"] = request.getfixturevalue("dockerd")
        request.getfixturevalue("qemu_runner_image")
        os.environ["DOCKER_HOST"] = extra["DOCKER_HOST"]
        request.addfinalizer(lambda: os.environ.pop("DOCKER_HOST", None))
    request.addfinalizer(_drop_automations)  # a leftover trigger would fire for the next test's heartbeats
    env = {**protect_demo(tmp_path, demo_disk, "--host", host), **extra}
    full_env = {**os.environ, **env, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO),
                "HOTSPARE_MACHINE": "demo", "HOTSPARE_STORE_BLOCK": ""}
    deploy_flows(full_env)
    with get_client(sync_client=True) as client:
        runs_before = len(client.read_flow_runs(deployment_filter=DeploymentFilter(
            id={"any_": [client.read_deployment_by_name("failover/failover").id]})))
    r = cli("deploy", "demo", env=full_env)
    assert "automation hotspare-heartbeat-demo applied" in r.stdout
    cli("deploy", "demo", env=full_env)  # applying again replaces, never duplicates
    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name("hotspare-heartbeat-demo")) == 1
    # The machine heartbeats every 2 s, then its agent stops: the machine goes silent.
    agent = subprocess.Popen([HOTSPARE, "agent", "demo", "--interval", "2", "--quiet"], env=full_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(8)
    agent.terminate()
    agent.wait(30)
    # No heartbeat within the window: the automation creates a run of the failover deployment.
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("failover/failover")
        deadline = time.monotonic() + 90
        while len(client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]}))) <= runs_before:
            assert time.monotonic() < deadline, "the heartbeat-loss automation did not start a failover run"
            time.sleep(1)
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "hotspare", "--run-once"], cwd=REPO,
                              env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = _wait_paused("failover demo", timeout=120)  # started by the automation, paused for approval
        with get_client(sync_client=True) as client:
            assert run.deployment_id == dep.id, "the run came from the failover deployment"
            assert run.parameters["machine"] in ("demo", "hotspare.machine.demo")
            client.resume_flow_run(run.id, run_input={"decision": "approve", "by": "ops", "why": "machine is down"})
            deadline = time.monotonic() + 240
            while not (state := client.read_flow_run(run.id).state).is_final() and time.monotonic() < deadline:
                time.sleep(1)
        assert state.is_completed(), f"{state}: {worker.stdout.read() if worker.poll() is not None else ''}"
        st = open_store(env["HOTSPARE_STORE"])
        ms = load_state(st, "demo")
        assert (ms.state, ms.epoch, ms.approval["by"], ms.host) == ("failed-over", 1, "ops", host)
        assert ms.vm["host"] == {"local": "local-qemu", "docker": "docker-qemu"}[host]
        # What the operator sees: status, and the run's artifacts (approval, VM screen, table).
        import json as _json

        status = _json.loads(cli("status", "demo", "--json", env=env).stdout)
        assert (status["state"], status["vm"]["vm_id"], status["heartbeat"]["fresh"]) == \
            ("failed-over", ms.vm["vm_id"], False)
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        kinds = {a.type for a in arts}
        assert {"image", "markdown", "table"} <= kinds, kinds
        shot = next(a for a in arts if a.type == "image")
        assert str(shot.data).startswith("data:image/png;base64,")
        # The guest keeps writing; its markers arrive as epoch-1 logs and in the consolidated VHD.
        deadline = time.monotonic() + 60
        while not list(st.list(layout.logs_prefix("demo", "root", 1))) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(4)
        stop_vm(env)
        cli("consolidate", "demo", env=env)
        cat = load_catalog(st, "demo", "root", demo_disk.stat().st_size)
        assert cat.points[-1].epoch == 1
        out = tmp_path / "replica.raw"
        export_point(st, cat, find_point(cat), "raw", out)
        serial = next((tmp_path / "vms" / "demo").glob("serial-*.log")).read_text()
        printed = [int(x.split("counter=")[1].split()[0]) for x in serial.splitlines() if "hotspare-marker" in x]
        assert read_marker(out).counter == printed[-1], "the replica holds the guest's last write"
        # Late epoch-0 logs are refused once fenced: the agent itself refuses to ship.
        r = cli("agent", "demo", "--once", env=env, check=False)
        assert r.returncode == 1 and "fenced" in r.stderr
    except AssertionError:
        worker.kill()
        print(worker.stdout.read()[-5000:])
        raise
    finally:
        worker.kill()
        stop_vm(env)


def test_failover_boots_every_disk_and_captures_the_vms_writes_to_each(tmp_path: Path, demo_disk: Path) -> None:
    """A machine with a root disk (the demo disk) and a data disk of known bytes: the VM gets
    both, in the machine's order, with their sizes; they are pulled local after the boot
    (the state then says no backing is needed); a write by the VM to the data disk reaches
    the store as an epoch-1 log of that disk, shipped by the capture the flow started."""
    from hotspare.extentlog import iter_extents
    from hotspare.vm.host import VmHandle
    from hotspare.vm.qemu.local import LocalQemuHost

    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
        f.seek(1 << 20)
        f.write(b"\x5a" * (256 << 10))
    env = protect_demo(tmp_path, demo_disk, "--disk", f"data={data}")
    time.sleep(11)
    st = open_store(env["HOTSPARE_STORE"])
    try:
        cli("failover", "demo", "--approve", env=env)
        ms = load_state(st, "demo")
        assert ms.state == "failed-over" and ms.step == "disks-local"
        handle = VmHandle.model_validate(ms.vm)
        assert [(d.name, d.size, d.backing_needed) for d in handle.disks] == [
            ("root", demo_disk.stat().st_size, False), ("data", 16 << 20, False)]
        # Each disk booted from its served point (nbdkit over the chunks), and once streamed
        # local its server was stopped.
        assert all(d.backing.startswith("nbd+unix:///") for d in handle.disks), handle.disks
        assert not list((tmp_path / "vms" / "demo" / "serve").glob("*.pid")), "the point servers are stopped"
        assert not subprocess.run(["pgrep", "-f", f"nbdkit .*{tmp_path / 'vms' / 'demo' / 'serve'}"],
                                  capture_output=True).stdout, "no nbdkit left"
        host = LocalQemuHost()
        expected = [("/machine/peripheral/disk0/virtio-backend", "d-root", demo_disk.stat().st_size),
                    ("/machine/peripheral/disk1/virtio-backend", "d-data", 16 << 20)]
        deadline = time.monotonic() + 20
        while True:  # during a capture's cut, a copy-before-write filter sits on a disk for a moment
            with host.qmp(handle) as q:
                blocks = [(b["qdev"], b["inserted"]["node-name"], b["inserted"]["image"]["virtual-size"])
                          for b in q.execute("query-block")]
            if blocks == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert blocks == expected
        with host.qmp(handle) as q:  # the VM writes its data disk
            q.execute("human-monitor-command", {"command-line": 'qemu-io -d /machine/peripheral/disk1/virtio-backend '
                                                                '"write -P 0xc3 4194304 131072"'})
        prefix = layout.logs_prefix("demo", "data", ms.epoch)
        deadline = time.monotonic() + 60
        found = None
        while found is None and time.monotonic() < deadline:
            for info in st.list(prefix):
                with st.open(info.key) as f:
                    for offsets, lengths, blobs in iter_extents(f, info.key):
                        for off, n, blob in zip(offsets.tolist(), lengths.tolist(), blobs, strict=True):
                            buf = blob.as_buffer()
                            if buf is not None and off <= (4 << 20) < off + n:
                                found = bytes(buf)[(4 << 20) - off:(4 << 20) - off + (128 << 10)]
            time.sleep(1)
        assert found == b"\xc3" * (128 << 10), "the VM's write to its data disk was not shipped"
        assert ms.epoch == 1
    finally:
        stop_vm(env)


def test_an_8_gib_machine_gets_its_disk_in_a_fraction_of_a_full_copy(tmp_path: Path, demo_disk: Path) -> None:
    """The demo disk grown to 8 GiB with 1 GiB of data beyond its partitions: the failover
    gives the VM its disk by serving the point (the ``disk-backings`` task, read from the
    Prefect API) in a fraction of the time a full copy of the disk takes (qemu-img convert
    of the same served point, measured here), and the VM boots on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from hotspare.replica.serve import nbd_uri
    from hotspare.state import state_history

    with open(demo_disk, "r+b") as f:
        f.truncate(8 << 30)
    rng = os.urandom(16 << 20)
    with open(demo_disk, "r+b") as f:  # 1 GiB of data, 16 MiB runs, past the demo's partitions
        for i in range(64):
            f.seek((4 << 30) + i * (16 << 20))
            f.write(rng)
    env = protect_demo(tmp_path, demo_disk)
    cli("consolidate", "demo", env=env)  # as the schedule would have: the failover folds only the tail
    st = open_store(env["HOTSPARE_STORE"])
    time.sleep(11)
    try:
        r = cli("failover", "demo", "--approve", env=env, timeout=1200)
        assert "guest marker" in r.stdout or load_state(st, "demo").state == "failed-over", r.stdout
        states = state_history(st, "demo")
        approved = next(s for s in states if s.step == "approved")
        launched = next(s.at for s in states if s.step == "launched")
        verified = next(s.at for s in states if s.step == "verified")  # the guest's first marker was seen
        to_launch = (launched - approved.at).total_seconds()
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[approved.flow_run_id])))
        backing = next(t.total_run_time.total_seconds() for t in runs if t.name.startswith("disk-backings"))
        sock = tmp_path / "copy.sock"
        proc = subprocess.Popen([HOTSPARE, "serve", "demo", "--disk", "root", "--socket", str(sock)],
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        try:
            while not sock.exists():
                assert proc.poll() is None
                time.sleep(0.1)
            t0 = time.monotonic()
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(tmp_path / "copy.raw")],
                           check=True)
            copy = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"the disk served in {backing:.2f} s; approval to launch {to_launch:.1f} s (the catch-up included), "
              f"to the first marker {(verified - approved.at).total_seconds():.1f} s; a full copy of the 8 GiB disk "
              f"(1 GiB of data) {copy:.1f} s")
        assert backing < copy / 2, f"serving the disk took {backing:.2f} s; a full copy takes {copy:.1f} s"
    finally:
        stop_vm(env)
