"""Recovery time: heartbeat loss to the failed-over guest's first marker, through the whole
automation path, against a bare QEMU boot of the same disk measured in the same run.

    .venv/bin/python bench/rto.py [--hosts local,docker] [--window 10] [--workdir DIR] [--keep]

Starts its own ``prefect server start`` on loopback (PREFECT_HOME in the work directory),
the ``hotspare`` process work pool, the ``failover`` deployment and one ``prefect worker``.
For each VM host (``local``: QEMU as a process here; ``docker``: QEMU in a container of a
private dockerd, whose runner image is built first with ``deployments/docker/build-offline.sh``,
not counted), it

- builds the demo disk, protects ``demo-<host>`` with ``--heartbeat-window W --auto-approve
  --host <host>`` in a local store and applies its automations (``hotspare deploy``);
- runs the agent with ``--interval 2`` for about 8 s, then stops it: t0 is the ``time`` of its
  last heartbeat (``heartbeat.json``);
- watches: the failover flow run the heartbeat-loss automation creates (its ``created``),
  the run entering Running (its ``start_time``), the VM launched (``handle.json`` written,
  after QEMU's QMP answers), the guest's first ``hotspare-marker`` line on the serial console;
- boots the same demo disk with plain ``qemu-system-x86_64`` (same accelerator, CPUs and
  memory, ``snapshot=on``), start to first marker: the reference.

Prints the phases, RTO (t0 to first marker) and RTO / bare boot. Goal: RTO under 60 s. The
heartbeat window is a floor of the detection phase, and the worker's poll interval
(``PREFECT_WORKER_QUERY_SECONDS``, Prefect's default unless ``--worker-poll``) is part of the
run-start phase. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scratch import scratch  # noqa: E402
from hotspare.demodisk import MARKER_RE, qemu_accel  # noqa: E402
from hotspare.heartbeat import load_heartbeat  # noqa: E402
from hotspare.machine import Policy  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from tests.servers import Missing, running_dockerd, running_prefect_server, stop_group  # noqa: E402

BIN = Path(sys.prefix) / "bin"
PREFECT, HOTSPARE = str(BIN / "prefect"), str(BIN / "hotspare")
RUNNER_IMAGE = "hotspare/qemu-runner:bookworm"
BUILD_OFFLINE = REPO / "deployments" / "docker" / "build-offline.sh"
GOAL = 60.0
AGENT_SECONDS = 8.0
POLL = 0.2

console = Console() if sys.stdout.isatty() else Console(width=150)  # a readable table in logs too


@dataclass
class Row:
    host: str
    accel: str = ""
    t0: float | None = None  # last heartbeat (epoch seconds)
    created: float | None = None  # failover flow run created
    running: float | None = None  # flow run entered Running
    launched: float | None = None  # handle.json written
    marker: float | None = None  # first marker line seen
    bare: float | None = None  # bare QEMU boot, start to first marker
    final: str = ""  # the flow run's final state
    error: str = ""
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ processes

def run(cmd: list[str], env: dict[str, str], what: str, cwd: Path = REPO, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        last = out.splitlines()[-1] if out else ""
        raise RuntimeError(f"{what} failed ({proc.returncode}): {last}\n{out[-3000:]}")
    return proc.stdout


# ------------------------------------------------------------------------------ measuring

def has_marker(vm_dir: Path) -> bool:
    for log in vm_dir.glob("serial-*.log"):
        try:
            if MARKER_RE.search(log.read_text(errors="replace")):
                return True
        except OSError:
            pass
    return False


def bare_boot(image: Path, root: Path, accel: str, policy: Policy, timeout: float = 300) -> float:
    """Plain qemu-system-x86_64 on the raw demo disk (writes discarded): start to first marker."""
    serial = root / "bare-serial.log"
    serial.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-name", "guest=hotspare-bench-bare", "-accel", accel,
           *(["-cpu", "host"] if accel == "kvm" else []), "-machine", "pc", "-smp", str(policy.vm_cpus),
           "-m", str(policy.vm_memory_mib), "-nodefaults", "-display", "none", "-device", "VGA", "-nic", "none",
           "-drive", f"file={image},format=raw,if=virtio,snapshot=on", "-serial", f"file:{serial}"]
    started = time.monotonic()
    with open(root / "bare-qemu.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            if serial.exists() and MARKER_RE.search(serial.read_text(errors="replace")):
                return time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"bare QEMU exited with {proc.returncode}: "
                                   f"{(root / 'bare-qemu.log').read_text(errors='replace')[-1000:]}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"bare QEMU printed no marker in {timeout:.0f} s")
            time.sleep(POLL)
    finally:
        stop_group(proc, 10)


def find_run(client, dep_id, machine: str):
    from prefect.client.schemas.filters import DeploymentFilter

    from hotspare.failover import machine_name

    for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [dep_id]})):
        if machine_name(str(r.parameters.get("machine", ""))) == machine:
            return r
    return None


def measure_host(host: str, root: Path, env: dict[str, str], window: int, timeout: float) -> Row:
    from prefect.client.orchestration import get_client

    row = Row(host)
    machine = f"demo-{host}"
    hroot = root / host
    hroot.mkdir()
    image = hroot / "demo.img"
    vm_dir = Path(env["HOTSPARE_VM_DIR"]) / machine
    henv = {**env, "HOTSPARE_AGENT_STATE": str(hroot / "agent"), "HOTSPARE_MACHINE": machine}
    try:
        run([HOTSPARE, "demo-disk", str(image)], henv, "hotspare demo-disk")
        policy = Policy()
        row.accel = qemu_accel()
        row.bare = bare_boot(image, hroot, row.accel, policy)
        run([HOTSPARE, "protect", machine, "--disk", f"root={image}", "--heartbeat-window", str(window),
             "--auto-approve", "--host", host], henv, "hotspare protect")
        run([HOTSPARE, "deploy", machine], henv, "hotspare deploy")
        agent = subprocess.Popen([HOTSPARE, "agent", machine, "--interval", "2", "--quiet"], env=henv, cwd=REPO,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=open(hroot / "agent.log", "wb"), start_new_session=True)
        time.sleep(AGENT_SECONDS)
        stop_group(agent, 30)
        hb = load_heartbeat(open_store(env["HOTSPARE_STORE"]), machine)
        if hb is None:
            raise RuntimeError(f"the agent sent no heartbeat in {AGENT_SECONDS:.0f} s: "
                               f"{(hroot / 'agent.log').read_text(errors='replace')[-1000:]}")
        row.t0 = hb.time.timestamp()
        deadline = time.monotonic() + timeout
        flow_run = None
        next_api = 0.0
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("failover/failover")
            while row.marker is None:
                now = time.monotonic()
                if now > deadline:
                    raise RuntimeError(f"no marker {timeout:.0f} s after the last heartbeat "
                                       f"(run {'created' if flow_run else 'not created'})")
                if now >= next_api:
                    next_api = now + (0.5 if row.running is None else 2.0)
                    flow_run = find_run(client, dep.id, machine) if flow_run is None else client.read_flow_run(flow_run.id)
                    if flow_run is not None:
                        row.created = flow_run.created.timestamp()
                        if flow_run.start_time is not None:
                            row.running = flow_run.start_time.timestamp()
                        if flow_run.state is not None and flow_run.state.is_final():
                            raise RuntimeError(f"the failover run ended {flow_run.state.name}: "
                                               f"{flow_run.state.message}")
                handle = vm_dir / "handle.json"
                if row.launched is None and handle.exists():
                    row.launched = handle.stat().st_mtime
                if has_marker(vm_dir):
                    row.marker = time.time()
                time.sleep(POLL)
            # Let the flow finish (screendump, capture, state commit) before stopping its VM.
            end = time.monotonic() + 180
            while time.monotonic() < end:
                state = client.read_flow_run(flow_run.id).state
                if state is not None and state.is_final():
                    row.final = state.name if state.is_completed() else f"{state.name}: {state.message}"
                    if row.running is None:
                        st = client.read_flow_run(flow_run.id).start_time
                        row.running = st.timestamp() if st else None
                    break
                time.sleep(0.5)
            else:
                row.final = "not final after 180 s"
    except Exception as err:  # noqa: BLE001 - one host's failure is reported in its row
        row.error = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        (hroot / "error.txt").write_text(str(err))
    finally:
        stop_vm(machine, vm_dir, henv)
    return row


def stop_vm(machine: str, vm_dir: Path, env: dict[str, str]) -> None:
    """``hotspare vm stop``; when that cannot (the failover did not finish), kill what the
    failover left: the capture process, the QEMU process or container in handle.json."""
    if not (vm_dir / "handle.json").exists():
        return
    r = subprocess.run([HOTSPARE, "vm", "stop", machine], env=env, cwd=REPO, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=180)
    if r.returncode == 0:
        return
    console.print(f"[yellow]hotspare vm stop {machine}: {r.stderr.strip()[-300:]}; killing its VM[/yellow]")
    try:
        pid = int((vm_dir / "capture.pid").read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass
    handle = json.loads((vm_dir / "handle.json").read_text())
    if handle.get("container_id") and env.get("DOCKER_HOST"):
        import docker

        client = docker.DockerClient(base_url=env["DOCKER_HOST"], timeout=30)
        try:
            client.containers.get(handle["container_id"]).remove(force=True)
        except Exception:  # noqa: BLE001 - gone already
            pass
        finally:
            client.close()
    elif handle.get("pid"):
        try:
            cmdline = Path(f"/proc/{handle['pid']}/cmdline").read_bytes()
            if f"guest={handle['vm_id']}".encode() in cmdline:  # ours, not a reused pid
                os.kill(handle["pid"], signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------ the run

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default="local,docker", help="VM hosts, comma-separated: local, docker")
    ap.add_argument("--window", type=int, default=10, help="heartbeat window, seconds (>= 10; default 10)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work",
                    help="where the server home, stores, images and VMs go (default bench/.work)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--worker-poll", type=float, default=None,
                    help="the worker's PREFECT_WORKER_QUERY_SECONDS (default: Prefect's)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per host from t0 to the marker")
    args = ap.parse_args()
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts or any(h not in ("local", "docker") for h in hosts) or args.window < 10:
        console.print("[red]--hosts takes local and/or docker; --window must be at least 10[/red]")
        return 2
    with scratch(args.workdir, "rto", args.keep, console) as root:
        return bench(args, hosts, root)


def bench(args: argparse.Namespace, hosts: list[str], root: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HOTSPARE_", "DOCKER_HOST"))}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", HOTSPARE_STORE=str(root / "store"),
               HOTSPARE_VM_DIR=str(root / "vms"), HOTSPARE_REPO=str(REPO), HOTSPARE_STORE_BLOCK="",
               HOTSPARE_MACHINE="demo-local")
    worker = None
    rows: list[Row] = []
    setup_failed: list[Row] = []
    # Stopped last to first: the worker, dockerd, the Prefect server.
    with ExitStack() as servers:
        try:
            url = servers.enter_context(running_prefect_server(root, env))
            env["PREFECT_API_URL"] = url
            os.environ["PREFECT_API_URL"] = url  # this process's client
            run([PREFECT, "work-pool", "create", "hotspare", "--type", "process", "--overwrite"], env,
                "work-pool create")
            run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "failover",
                 "--name", "failback"],
                env, "prefect deploy")
            build = None
            if "docker" in hosts:
                try:
                    if shutil.which("docker") is None:  # build-offline.sh drives the daemon with it
                        raise Missing("the docker client (Debian package docker.io)")
                    base_url = servers.enter_context(running_dockerd(prefix="hs-bench-dockerd-"))
                    env["DOCKER_HOST"] = base_url
                    started = time.monotonic()
                    run(["sh", str(BUILD_OFFLINE), RUNNER_IMAGE, base_url], env, "build-offline.sh", timeout=900)
                    build = time.monotonic() - started
                except Exception as err:  # noqa: BLE001 - the local host can still be measured
                    hosts = [h for h in hosts if h != "docker"]
                    setup_failed.append(Row("docker", error=f"setup: {str(err).strip().splitlines()[0][:300]}"))
            wenv = dict(env)
            if args.worker_poll is not None:
                wenv["PREFECT_WORKER_QUERY_SECONDS"] = str(args.worker_poll)
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "hotspare"], cwd=REPO, env=wenv,
                                      stdin=subprocess.DEVNULL, stdout=open(root / "worker.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True)
            for host in hosts:
                console.print(f"measuring {host} ...")
                rows.append(measure_host(host, root, env, args.window, args.timeout))
            rows += setup_failed
            report(rows, args, build)
        finally:
            stop_group(worker)
    return 0 if rows and all(not r.error for r in rows) else 1


def report(rows: list[Row], args: argparse.Namespace, build: float | None) -> None:
    def d(a: float | None, b: float | None) -> str:
        return f"{b - a:.1f}" if a is not None and b is not None else "-"

    table = Table(title=f"RTO: heartbeat loss to the guest's first marker (window {args.window} s, auto-approve)")
    for col in ("host", "accel", "detection (s)", "run start (s)", "launch (s)", "boot to marker (s)",
                "RTO total (s)", "bare boot (s)", "RTO / bare boot", f"goal < {GOAL:.0f} s met?"):
        table.add_column(col, justify="left" if col in ("host", "accel") else "right")
    for r in rows:
        rto = r.marker - r.t0 if r.marker is not None and r.t0 is not None else None
        met = "-" if rto is None else ("yes" if rto < GOAL else "no")
        table.add_row(r.host, r.accel or "-", d(r.t0, r.created), d(r.created, r.running), d(r.running, r.launched),
                      d(r.launched, r.marker), f"{rto:.1f}" if rto is not None else "-",
                      f"{r.bare:.1f}" if r.bare is not None else "-",
                      f"{rto / r.bare:.1f}x" if rto is not None and r.bare else "-", met)
    console.print(table)
    poll = args.worker_poll
    if poll is None:
        from prefect.settings import PREFECT_WORKER_QUERY_SECONDS

        poll = PREFECT_WORKER_QUERY_SECONDS.value()
    console.print(f"detection: last heartbeat -> failover run created (floor: the {args.window} s window); "
                  f"run start: created -> Running (worker polls every {poll:g} s, then a new process); "
                  "launch: Running -> handle.json (fence, consolidate, export, QEMU up); "
                  "boot: handle.json -> first marker.")
    if build is not None:
        console.print(f"docker runner image build (not counted): {build:.0f} s")
    for r in rows:
        if r.final and r.final != "Completed":
            console.print(f"[yellow]{r.host}: failover run ended {r.final}[/yellow]")
        if r.error:
            console.print(f"[red]{r.host}: {r.error}[/red]")
    console.print(f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
