"""Drills: boot a recovery point the way a failover would, check that it really boots, and
record the verdict in the catalog.

Terms:
- drill directory: ``<vm_dir>/<machine>-drill/``, apart from the failover's
  ``<vm_dir>/<machine>/``: a drill never adopts, stops or touches a failed-over VM.
- boot evidence: the policy's serial-console pattern (``drill_pattern``), QMP status
  ``running``, then the policy's probe commands (``drill_probes``), each exiting 0.
- verdict: ``verified`` (with the seconds from the launch to the evidence), ``failed``
  (with the reason) or ``untested`` (the drill could not judge the point: the VM host
  failed), committed into the catalog of every disk drilled (:class:`DrillVerdict`).

A drill serves each disk's point read-only over NBD and gives the VM throw-away qcow2
overlays over them (on EC2: the point's EBS snapshot, which stays as the next one's parent);
the VM has no network (every QEMU host runs ``-nic none``). It never
fences, never ingests or consolidates, and changes nothing in the catalog but the verdict.
Everything it started is torn down in a ``finally``; a drill that died (kill -9) leaves its
VM's handle and the servers' pid files in the drill directory, and the next drill cleans
them up first (:func:`clean_up`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hotspare.catalog import DrillVerdict, RecoveryPoint, commit_catalog, load_catalog
from hotspare.consolidate.export import find_point
from hotspare.errors import AlreadyExists, HotspareError, UsageError
from hotspare.failover import disk_backing, serve_dir, stop_servers, vm_dir
from hotspare.faults import crash_point
from hotspare.machine import MachineConfig, Policy
from hotspare.store.base import Store
from hotspare.vm.host import VmHandle, VmHost, VmSpec, load_handle

DRILL_SUFFIX = "-drill"
SCREEN = "screen.png"
PROBE_TIMEOUT = 120.0
# Lines of a point server's log that mean the guest got an I/O error from the replica.
SERVER_ERROR_RE = re.compile(r"fails its SHA-256|pack missing|pack ended|InvalidObject|read of \d+ bytes at \d+:")
COMMIT_ATTEMPTS = 20


class DrillFailed(HotspareError):
    """The point did not show its boot evidence: the verdict is failed, with this reason."""


class DrillUntested(HotspareError):
    """The drill could not judge the point (the VM host failed before the guest ran)."""


def drill_dir(machine: str, root: str | None = None) -> Path:
    """The drill's work directory, beside (never inside) the failover's VM directory."""
    base = vm_dir(machine, root)
    return base.with_name(base.name + DRILL_SUFFIX)


@dataclass
class DrillOutcome:
    machine: str
    points: dict[str, str]  # disk -> point id
    verdict: DrillVerdict
    vm_id: str = ""
    accel: str = ""
    screen: bytes | None = None  # PNG of the VM's screen at the evidence (or at the failure)
    console_tail: str = ""
    cleaned: list[str] = field(default_factory=list)  # what a dead drill had left

    @property
    def ok(self) -> bool:
        return self.verdict.verdict == "verified"

    @property
    def message(self) -> str:
        pts = ", ".join(f"{d} {p}" for d, p in self.points.items())
        if self.ok:
            return f"drill of {self.machine} ({pts}): verified, booted in {self.verdict.seconds:.1f} s"
        return f"drill of {self.machine} ({pts}): {self.verdict.verdict}: {self.verdict.reason}"


def choose_points(store: Store, cfg: MachineConfig, point_id: str | None = None,
                  at: datetime | None = None) -> list[tuple[str, RecoveryPoint]]:
    """Per disk, in the machine's order, the point to drill: ``point_id`` on the boot disk
    (and on the other disks when they have it, else their newest at or before its time),
    or the newest at or before ``at``, or the newest crash-consistent one."""
    if point_id is not None and at is not None:
        raise UsageError("give --point or --at, not both")
    out: list[tuple[str, RecoveryPoint]] = []
    for i, d in enumerate(cfg.disks):
        cat = load_catalog(store, cfg.name, d.name, d.size)
        if point_id is not None and i > 0 and all(p.id != point_id for p in cat.points):
            p = find_point(cat, at=out[0][1].time)
        else:
            p = find_point(cat, point_id, at, prefer_consistent=point_id is None and at is None)
        if not p.root:
            raise UsageError(f"{cfg.name}/{d.name} point {p.id} is in the layout before chunks: run "
                             f"`hotspare consolidate {cfg.name}` once to convert the disk")
        out.append((d.name, p))
    return out


# -- cleaning up ------------------------------------------------------------------------------

def _local_qemu_of(workdir: Path) -> int | None:
    """A QEMU that runs in ``workdir`` by its pid file, also when its handle was never
    written (a drill killed between QEMU's start and the handle)."""
    try:
        pid = int((workdir / "qemu.pid").read_text().strip())
        if Path(f"/proc/{pid}/cwd").resolve() == workdir.resolve():
            return pid
    except (OSError, ValueError):
        pass
    return None


def clean_up(host: VmHost, workdir: Path) -> list[str]:
    """End what a drill of ``workdir`` left running (its VM, its point servers) and remove
    its overlays, handle and sockets; keep the last drill's logs and screen for the
    post-mortem until the next drill. Returns what was found, for the log."""
    done: list[str] = []
    if not workdir.is_dir():
        return done
    handle = load_handle(workdir)
    if handle is not None and host.is_alive(handle):
        host.kill(handle)
        done.append(f"killed VM {handle.vm_id}")
    if handle is not None:
        host.release(handle, wait=60.0)  # a drill's VM leaves nothing behind
    pid = _local_qemu_of(workdir)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed QEMU pid {pid}")
        except ProcessLookupError:
            pass
    stopped = stop_servers(workdir)
    if stopped:
        done.append(f"stopped the point server(s) of {', '.join(stopped)}")
    for p in workdir.iterdir():
        if p.suffix in (".log", ".png") and p.is_file():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return done


def _clear_logs(workdir: Path) -> None:
    """The logs and screen of the drill before (a new drill starts its own)."""
    if workdir.is_dir():
        for p in workdir.iterdir():
            if p.is_file() and p.suffix in (".log", ".png"):
                p.unlink(missing_ok=True)


# -- the boot -----------------------------------------------------------------------------------

def _server_errors(workdir: Path) -> str | None:
    """The first line of a point server's log that says a read of the replica failed."""
    for log in sorted(workdir.glob("serve-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if SERVER_ERROR_RE.search(line):
                return f"{log.stem.removeprefix('serve-')}: {line.strip()[:400]}"
    return None


def wait_for_evidence(host: VmHost, handle: VmHandle, policy: Policy, timeout: float, *,
                      poll: float = 0.2) -> None:
    """Wait until the console shows the policy's pattern and QMP says running; DrillFailed
    with the reason when the VM dies, the replica fails a read, or ``timeout`` passes."""
    pattern = re.compile(policy.drill_pattern)
    deadline = time.monotonic() + timeout
    workdir = Path(handle.workdir)
    while True:
        crash_point("drill-mid-boot")
        console = host.serial_log(handle)
        if pattern.search(console):
            status = host.status(handle)
            if status == "running":
                return
            raise DrillFailed(f"the guest printed its boot pattern but QMP says it is {status}, not running")
        bad = _server_errors(workdir)
        if bad is not None:
            raise DrillFailed(f"the replica failed a read the guest made (disk {bad}); console tail: "
                              f"{console[-300:]!r}")
        if not host.is_alive(handle):
            raise DrillFailed(f"the VM ended before its boot pattern {policy.drill_pattern!r} showed; "
                              f"console tail: {console[-300:]!r}")
        if time.monotonic() > deadline:
            raise DrillFailed(f"no {policy.drill_pattern!r} on the serial console within {timeout:.0f} s "
                              f"(accel {handle.accel}); console tail: {console[-300:]!r}")
        time.sleep(poll)


def run_probes(handle: VmHandle, probes: list[str], timeout: float = PROBE_TIMEOUT) -> None:
    """Run the policy's probe commands on this host; DrillFailed naming the first that
    does not exit 0."""
    env = dict(os.environ, HOTSPARE_DRILL_SERIAL=handle.serial_log, HOTSPARE_DRILL_QMP=handle.qmp_socket or "",
               HOTSPARE_DRILL_VM=handle.vm_id)
    for cmd in probes:
        try:
            r = subprocess.run(cmd, shell=True, check=False, env=env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DrillFailed(f"probe {cmd!r} did not finish within {timeout:.0f} s") from None
        if r.returncode != 0:
            out = (r.stdout + r.stderr).strip()[-300:]
            raise DrillFailed(f"probe {cmd!r} exited with {r.returncode}: {out or 'no output'}")


def drill(store: Store, cfg: MachineConfig, host: VmHost, workdir: Path, *, point_id: str | None = None,
          at: datetime | None = None, timeout: float | None = None) -> DrillOutcome:
    """Boot the chosen point of every disk in ``workdir``, wait for the boot evidence, take
    a screendump, tear it all down, and return the outcome (the verdict is not committed:
    :func:`record_verdict`). An error of the VM host before the guest ran is ``untested``;
    no boot evidence is ``failed``; anything else (a crash, a cancellation) propagates after
    the teardown."""
    policy = cfg.policy
    timeout = policy.drill_timeout if timeout is None else timeout
    chosen = choose_points(store, cfg, point_id, at)
    points = {d: p.id for d, p in chosen}
    cleaned = clean_up(host, workdir)
    _clear_logs(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    outcome = DrillOutcome(machine=cfg.name, points=points, verdict=DrillVerdict(verdict="untested"), cleaned=cleaned)
    handle: VmHandle | None = None
    try:
        try:
            # As the failover does: QEMU hosts read the served point, EC2 its EBS snapshot.
            disks = [disk_backing(store, cfg.name, cfg.disk(d), workdir, point=p, host=host)[1] for d, p in chosen]
            t0 = time.monotonic()
            handle = host.launch(VmSpec(machine=cfg.name, disks=disks, cpus=policy.vm_cpus,
                                        memory_mib=policy.vm_memory_mib, workdir=workdir))
        except HotspareError as err:
            raise DrillUntested(f"the VM could not be launched: {err}") from err
        outcome.vm_id, outcome.accel = handle.vm_id, handle.accel
        crash_point("drill-after-launch")
        try:
            wait_for_evidence(host, handle, policy, timeout)
            seconds = time.monotonic() - t0
            run_probes(handle, policy.drill_probes)
        finally:
            outcome.screen = _screen(host, handle, workdir)
            outcome.console_tail = host.serial_log(handle)[-2000:]
        outcome.verdict = DrillVerdict(verdict="verified", seconds=round(seconds, 2))
    except DrillFailed as err:
        outcome.verdict = DrillVerdict(verdict="failed", reason=str(err))
    except DrillUntested as err:
        outcome.verdict = DrillVerdict(verdict="untested", reason=str(err))
    finally:
        _tear_down(host, handle, workdir)
    return outcome


def _screen(host: VmHost, handle: VmHandle, workdir: Path) -> bytes | None:
    """The VM's screen as PNG bytes, or None when the VM cannot give one (it died)."""
    try:
        return host.screendump(handle, workdir / SCREEN).read_bytes()
    except Exception:  # noqa: BLE001 - a dead VM has no screen; the verdict says why
        return None


def _tear_down(host: VmHost, handle: VmHandle | None, workdir: Path) -> None:
    """Kill the VM (a drill's VM holds nothing worth a clean stop), stop the servers and
    remove overlays, handle and sockets; the logs and the screen stay."""
    try:
        if handle is not None:
            host.kill(handle)
            host.release(handle, wait=60.0)  # a drill's VM leaves nothing behind
    finally:
        clean_up(host, workdir)
        sd = serve_dir(workdir)
        if sd.is_dir():
            shutil.rmtree(sd, ignore_errors=True)


# -- the verdict ---------------------------------------------------------------------------------

def record_verdict(store: Store, cfg: MachineConfig, points: dict[str, str], verdict: DrillVerdict) -> dict[str, int | None]:
    """Set ``verdict`` on each disk's drilled point, one create-only catalog commit per disk
    that changes nothing else; after a lost race, re-read the newest catalog and try again.
    A point that retention dropped meanwhile is skipped. Returns disk -> catalog version
    committed (None: the point is gone)."""
    out: dict[str, int | None] = {}
    for d in cfg.disks:
        if d.name not in points:
            continue
        pid = points[d.name]
        for _ in range(COMMIT_ATTEMPTS):
            cat = load_catalog(store, cfg.name, d.name, d.size)
            if all(p.id != pid for p in cat.points):
                out[d.name] = None
                break
            pts = [p.model_copy(update={"drill": verdict}) if p.id == pid else p for p in cat.points]
            try:
                out[d.name] = commit_catalog(store, cat.next(points=pts)).version
                break
            except AlreadyExists:
                continue
        else:
            raise HotspareError(f"{cfg.name}/{d.name}: the drill's verdict lost {COMMIT_ATTEMPTS} commit races "
                                "in a row; run the drill again")
    return out


def last_drills(cats: dict) -> dict:
    """A machine's drill summary from its disks' catalogs (disk -> Catalog, the boot disk
    first): the newest verified point of the boot disk, the last successful drill, the last
    drill of any verdict."""
    boot = next(iter(cats.values()), None)
    drilled = [p for c in cats.values() for p in c.points if p.drill is not None]
    ok = [p for p in drilled if p.drill.verdict == "verified"]
    newest_ok = max((p for p in boot.points if p.drill and p.drill.verdict == "verified"),
                    key=lambda p: p.position, default=None) if boot is not None else None
    last_ok = max(ok, key=lambda p: p.drill.at, default=None)
    last = max(drilled, key=lambda p: p.drill.at, default=None)
    return {"newest_verified_point": newest_ok.id if newest_ok else None,
            "last_success": last_ok.drill.at if last_ok else None,
            "last": last.drill if last else None, "last_point": last.id if last else None}
