"""Failback through a real Prefect server and real QEMU: the machine returns, its disk is
brought to the VM's state in two phases while the VM serves, verified block for block, and
protection resumes in a new epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.consolidate.export import export_point, find_point
from hotspare.failover import vm_host
from hotspare.machine import load_machine, save_machine
from hotspare.state import load_state
from hotspare.store import open_store
from hotspare.vm.host import VmHandle
from tests.helpers import HOTSPARE, PREFECT, cli, power_loss, qemu_io, require, served
from tests.test_failover import (REPO, _drop_automations, _wait_paused, deploy_flows, protect_demo,
                                 run_flow_in_thread, stop_vm)

pytestmark = pytest.mark.usefixtures("prefect_api")
TAIL = 60 << 20  # where the machine writes its unshipped tail (inside the 64 MiB demo disk)


def fail_over(tmp_path: Path, demo_disk: Path, *extra: str) -> dict[str, str]:
    """Protect the demo machine, let it write a tail that never ships, go silent, fail over,
    and let the VM write for a few seconds."""
    env = protect_demo(tmp_path, demo_disk, *extra)
    qemu_io(served(env, "demo"), f"write -P 0xab {TAIL} 128k")  # never shipped: the machine dies first
    power_loss(env, "demo")
    time.sleep(11)
    cli("failover", "demo", "--approve", env=env)
    time.sleep(4)  # the guest keeps counting on the VM
    return env


class RestoreAgent:
    """``hotspare agent demo --restore`` on the returning machine."""

    def __init__(self, env: dict[str, str], tmp_path: Path, **extra_env: str) -> None:
        self.log = open(tmp_path / f"restore-agent-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([HOTSPARE, "agent", "demo", "--restore", "--interval", "0.5", "--quiet"],
                                     env={**os.environ, **env, **extra_env}, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_restore_heartbeat(self, st, timeout: float = 60) -> None:
        from hotspare.heartbeat import load_heartbeat

        deadline = time.monotonic() + timeout
        while True:
            hb = load_heartbeat(st, "demo")
            if hb is not None and hb.mode == "restore" and hb.restore and hb.restore.divergence:
                return
            assert self.proc.poll() is None, f"restore agent exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no restore heartbeat:\n{self.output()}"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def final_replica(st, tmp_path: Path, size: int) -> Path:
    cat = load_catalog(st, "demo", "root", size)
    out = tmp_path / "final-replica.raw"
    export_point(st, cat, find_point(cat), "raw", out)
    return out


def assert_same_image(image: Path, replica: Path) -> None:
    r = subprocess.run([require("qemu-img", "qemu-utils"), "compare", "-f", "raw", "-F", "raw", str(image),
                        str(replica)], capture_output=True, text=True)
    assert r.returncode == 0, f"the machine's disk differs from the replica: {r.stdout}{r.stderr}"


def vm_gone(tmp_path: Path, vm_id: str) -> bool:
    return not subprocess.run(["pgrep", "-f", f"guest={vm_id}"], capture_output=True).stdout.strip()


def test_killed_flow_and_agent_in_phase_one_converge_to_a_verified_disk(tmp_path: Path, demo_disk: Path) -> None:
    env = fail_over(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    vm_id = load_state(st, "demo").vm["vm_id"]
    # The agent dies (kill -9) in the middle of applying its first data log.
    agent = RestoreAgent(env, tmp_path, HOTSPARE_CRASH_AT="restore-mid-apply")
    try:
        agent.wait_restore_heartbeat(st)
        # The flow dies (kill -9) right after it ordered phase one.
        r = cli("failback", "demo", "--approve", env={**env, "HOTSPARE_CRASH_AT": "failback-after-order"}, check=False)
        assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
        assert agent.proc.wait(60) == -signal.SIGKILL, agent.output()
        ms = load_state(st, "demo")
        assert (ms.state, ms.phase) == ("failing-back", "phase-one") and ms.vm, "the VM still serves"
        progress = json.loads((tmp_path / "agent" / "demo" / "restore.json").read_text())
        assert progress["working"] == 0 and progress["position"] == 0, "the half-applied log is not counted"
        agent = RestoreAgent(env, tmp_path)
        r = cli("failback", "demo", "--approve", env=env)
        assert "failed back" in r.stdout, r.stdout
        # The downtime's verification re-hashed only what was written since phase one's scan.
        reread = int(re.search(r"verification re-read (\d+) bytes", r.stdout).group(1))
        assert reread < demo_disk.stat().st_size // 4, r.stdout
    finally:
        agent.stop()
        stop_vm(env)
    ms = load_state(st, "demo")
    assert (ms.state, ms.epoch, ms.step) == ("protected", 2, "failed-back")
    assert vm_gone(tmp_path, vm_id), "the VM is stopped"
    left = sorted(p.name for p in (tmp_path / "vms" / "demo").iterdir())
    assert all(n.endswith((".log", ".png")) for n in left), f"the VM's disks are removed, its logs kept: {left}"
    assert_same_image(demo_disk, final_replica(st, tmp_path, demo_disk.stat().st_size))
    assert_tail_gone(demo_disk)


def assert_tail_gone(image: Path) -> None:
    with open(image, "rb") as f:
        f.seek(TAIL)
        assert f.read(128 << 10) != b"\xab" * (128 << 10), "the machine's unshipped tail is still on its disk"


def test_cut_over_refusals_keep_the_vm_and_a_bad_block_fails_verification(tmp_path: Path, demo_disk: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.failback import failback

    env = fail_over(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    size = demo_disk.stat().st_size
    params = dict(machine="demo", store=env["HOTSPARE_STORE"], vm_dir=env["HOTSPARE_VM_DIR"])
    agent = RestoreAgent(env, tmp_path)
    try:
        agent.wait_restore_heartbeat(st)
        # Rejected: the VM keeps serving, the machine stays in restore mode.
        t, out = run_flow_in_thread(failback, **params)
        run = _wait_paused("failback demo", timeout=120)
        keyset = run.state.state_details.run_input_keyset
        assert keyset, "the pause waits for a RunInput"
        with get_client(sync_client=True) as client:
            # The form asks only for the answer; the facts (bytes to move, the downtime) are its text.
            schema = client.read_flow_run_input(run.id, keyset["schema"])
            assert set(json.loads(schema)["properties"]) == {"decision", "by", "why"}, schema
            description = client.read_flow_run_input(run.id, keyset["description"])
            assert "Bytes to move at cut-over" in description and "Estimated downtime" in description, description
            client.resume_flow_run(run.id, run_input={"decision": "reject", "by": "ops", "why": "peak hour"})
        t.join(120)
        assert out["state"].is_cancelled() and "rejected by ops: peak hour" in out["state"].message
        ms = load_state(st, "demo")
        assert ms.state == "failing-back" and ms.vm, ms
        assert vm_host("local").status(VmHandle.model_validate(ms.vm)) == "running", "the VM still serves"
        assert json.loads(cli("status", "demo", "--json", env=env).stdout)["heartbeat"]["mode"] == "restore"
        # Timed out: the same.
        cfg = load_machine(st, "demo")
        save_machine(st, cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"approval_timeout": 3})}),
                     create_only=False)
        t, out = run_flow_in_thread(failback, **params)
        t.join(180)
        assert out["state"].is_cancelled() and "timed out" in out["state"].message, out["state"]
        assert vm_host("local").status(VmHandle.model_validate(load_state(st, "demo").vm)) == "running"
        save_machine(st, cfg, create_only=False)
        # Approved, but a block changes on the machine behind the agent's back between the phases.
        t, out = run_flow_in_thread(failback, **params)
        run = _wait_paused("failback demo", timeout=120)
        qemu_io(demo_disk, "write -P 0xcd 50M 4k")
        with get_client(sync_client=True) as client:
            client.resume_flow_run(run.id, run_input={"decision": "approve", "by": "ops", "why": "go"})
        t.join(180)
        state = out["state"]
        assert state.is_failed(), state
        with pytest.raises(Exception, match=r"differs from the replica in 1 block\(s\) of 65536 bytes, first at "
                                            r"offset 52428800"):
            state.result()
        ms = load_state(st, "demo")
        assert (ms.state, ms.step, ms.epoch) == ("failing-back", "verify-failed", 1)
        cat = load_catalog(st, "demo", "root", size)
        assert cat.epoch == 1 and cat.fence_of(1) is None, "the fence stays: the replica is still the truth"
        # A re-run repairs the block and verifies again.
        r = cli("failback", "demo", "--approve", env=env)
        assert "failed back" in r.stdout
    finally:
        agent.stop()
        stop_vm(env)
    assert load_state(st, "demo").state == "protected"
    assert_same_image(demo_disk, final_replica(st, tmp_path, size))


def test_failback_to_a_replacement_disk_with_catch_up_rounds(tmp_path: Path, demo_disk: Path) -> None:
    env = fail_over(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    new_disk = tmp_path / "replacement.img"  # empty: not even created yet
    agent = RestoreAgent(env, tmp_path)
    try:
        agent.wait_restore_heartbeat(st)
        r = cli("failback", "demo", "--approve", "--target-disk", f"root={new_disk}", "--catch-up-mib", "0", env=env)
        assert "failed back" in r.stdout
    finally:
        agent.stop()
        stop_vm(env)
    from hotspare.failback.orders import load_orders

    labels = [o.label for o in load_orders(st, "demo", 1)]
    assert labels[:2] == ["compare-phase-1", "phase-1"] and "catch-up-1" in labels, labels
    assert_same_image(new_disk, final_replica(st, tmp_path, demo_disk.stat().st_size))
    assert load_machine(st, "demo").disks[0].path == str(new_disk), "the replacement is the machine's disk now"
    with open(demo_disk, "rb") as f:
        f.seek(TAIL)
        assert f.read(4) == b"\xab" * 4, "the old disk is left as it was"


def test_restore_heartbeat_starts_failback_and_protection_resumes_in_a_new_epoch(
        tmp_path: Path, demo_disk: Path, prefect_api: str, request: pytest.FixtureRequest) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter

    request.addfinalizer(_drop_automations)
    env = fail_over(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    size = demo_disk.stat().st_size
    vm_id = load_state(st, "demo").vm["vm_id"]
    full_env = {**os.environ, **env, "PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO),
                "HOTSPARE_MACHINE": "demo", "HOTSPARE_STORE_BLOCK": ""}
    # The machine returns in normal mode: refused in one line, nothing shipped.
    logs_before = list(st.list(layout.logs_prefix("demo", "root", 0)))
    r = cli("agent", "demo", "--once", env=env, check=False)
    assert r.returncode == 1 and "fenced" in r.stderr and "--restore" in r.stderr and "Traceback" not in r.stderr
    assert list(st.list(layout.logs_prefix("demo", "root", 0))) == logs_before, "no log written"
    # The failback deployment and the restore automation, as an operator applies them.
    deploy_flows(full_env)
    assert "automation hotspare-restore-heartbeat applied" in cli("deploy", "demo", env=full_env).stdout
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("failback/failback")
    # The machine returns in restore mode: its heartbeat starts the failback.
    agent = RestoreAgent(full_env, tmp_path)
    worker = None
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 90
            while not client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep.id]})):
                assert time.monotonic() < deadline, f"the restore automation started no failback run\n{agent.output()}"
                time.sleep(1)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "hotspare", "--run-once"], cwd=REPO,
                                  env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run = _wait_paused("failback demo", timeout=180)  # phase one applied, cut-over awaits approval
        assert load_state(st, "demo").vm, "the VM serves until the cut-over"
        with get_client(sync_client=True) as client:
            client.resume_flow_run(run.id, run_input={"decision": "approve", "by": "ops", "why": "maintenance window"})
            deadline = time.monotonic() + 240
            while not (state := client.read_flow_run(run.id).state).is_final() and time.monotonic() < deadline:
                time.sleep(1)
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert state.is_completed(), f"{state}\n{agent.output()}"
        keys = {a.key for a in arts}
        assert {"failback-plan-demo", "failback-verify-demo", "failback-demo", "failback-approval-demo"} <= keys, keys
        assert any(a.type == "progress" for a in arts)
        # The machine's disk is the replica's final state; the unshipped tail is gone.
        assert_same_image(demo_disk, final_replica(st, tmp_path, size))
        assert_tail_gone(demo_disk)
        assert vm_gone(tmp_path, vm_id), "the VM is stopped"
        status = json.loads(cli("status", "demo", "--json", env=env).stdout)
        assert (status["state"], status["epoch"], status["vm"]) == ("protected", 2, None)
        # The same agent protects again: a new write ships as an epoch-2 log and is accepted.
        sock = Path(served(env, "demo").split("socket=")[1])
        deadline = time.monotonic() + 60
        while not sock.exists():  # the agent, protecting again, starts a new storage daemon
            assert time.monotonic() < deadline, f"no storage daemon serves the disk\n{agent.output()}"
            time.sleep(0.2)
        qemu_io(served(env, "demo"), "write -P 0x5a 10M 64k")  # through the new daemon
        deadline = time.monotonic() + 30
        while not list(st.list(layout.logs_prefix("demo", "root", 2))):
            assert time.monotonic() < deadline, f"no epoch-2 log\n{agent.output()}"
            time.sleep(0.5)
        cli("ingest", "demo", env=env)
        cat = load_catalog(st, "demo", "root", size)
        assert cat.epoch == 2 and cat.applied_seq(2) >= 0 and not cat.rejected, cat.rejected
        status = json.loads(cli("status", "demo", "--json", env=env).stdout)
        assert (status["heartbeat"]["mode"], status["heartbeat"]["epoch"]) == ("normal", 2)
    except AssertionError:
        if worker:
            worker.kill()
            print(worker.stdout.read()[-5000:])
        raise
    finally:
        if worker:
            worker.kill()
        agent.stop()
        stop_vm(env)


def test_a_failback_killed_after_its_last_commit_still_gets_its_last_point(tmp_path: Path, demo_disk: Path) -> None:
    """Killed after it committed "protected" and before the consolidation that gives the newest
    point the VM's last writes: the re-run says it is finished and makes that point."""
    env = fail_over(tmp_path, demo_disk)
    st = open_store(env["HOTSPARE_STORE"])
    agent = RestoreAgent(env, tmp_path)
    try:
        agent.wait_restore_heartbeat(st)
        r = cli("failback", "demo", "--approve", env={**env, "HOTSPARE_CRASH_AT": "failback-before-last-consolidation"},
                check=False)
        assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
        ms = load_state(st, "demo")
        assert (ms.state, ms.step) == ("protected", "failed-back")
        r = cli("failback", "demo", env=env)
        assert "its failback is finished" in r.stdout, r.stdout
    finally:
        agent.stop()
        stop_vm(env)
    assert_same_image(demo_disk, final_replica(st, tmp_path, demo_disk.stat().st_size))
