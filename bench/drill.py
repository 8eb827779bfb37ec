"""Drill wall time per recovery point, against the failover's boot of the same point.

    .venv/bin/python bench/drill.py [--points 3] [--workdir DIR] [--keep]

Builds the demo disk, protects ``demo`` in a local store (a ``prefect server start`` of its
own on loopback runs the consolidate flows), and makes ``--points`` recovery points (each
after writing 4 MiB of new bytes into the disk's data partition, one agent cycle of the
``scan`` tracker, which sees writes made to the image file, and one consolidation). Then,
per point:

- the drill (:func:`hotspare.drill.drill`, the engine the drill flow runs, on local QEMU):
  its wall time, from choosing the point to the last server stopped and overlay removed,
  and its boot time (the VM's launch to the boot evidence on the serial console);
- the failover's boot of the same point measured the same way, the way the failover flow
  does it (:func:`hotspare.failover.disk_backing` serving the point, the VM launched on
  overlays over it, the guest's marker on the console): launch to marker, and wall time
  from serving to torn down. The failover's RTO figure (bench/rto.py) adds detection and
  the flow run's start to this boot.

Prints one row per point and the ratios drill wall / failover wall and drill boot /
failover boot (target: about 1: a drill costs a failover's boot). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.rto import HOTSPARE, run  # noqa: E402
from bench.scratch import scratch  # noqa: E402
from hotspare import drill as drill_engine  # noqa: E402
from hotspare import failover as fo  # noqa: E402
from hotspare.catalog import load_catalog  # noqa: E402
from hotspare.demodisk import build_demo_disk, data_partition_offset  # noqa: E402
from hotspare.machine import load_machine  # noqa: E402
from hotspare.store import open_store  # noqa: E402
from hotspare.vm.host import VmSpec  # noqa: E402
from hotspare.vm.qemu.local import LocalQemuHost  # noqa: E402
from tests.servers import running_prefect_server  # noqa: E402

console = Console() if sys.stdout.isatty() else Console(width=150)


def failover_boot(store, cfg, point, workdir: Path, timeout: float) -> tuple[float, float]:
    """(wall, launch-to-marker) of the failover's way of booting ``point``."""
    host = LocalQemuHost()
    t0 = time.monotonic()
    disks = [fo.disk_backing(store, cfg.name, cfg.disk(d), workdir, point=p)[1] for d, p in point]
    handle = None
    try:
        t1 = time.monotonic()
        handle = host.launch(VmSpec(machine=cfg.name, disks=disks, cpus=cfg.policy.vm_cpus,
                                    memory_mib=cfg.policy.vm_memory_mib, workdir=workdir))
        host.wait_for_marker(handle, timeout=timeout)
        boot = time.monotonic() - t1
    finally:
        if handle is not None:
            host.kill(handle)
        fo.discard_vm_files(workdir)
    return time.monotonic() - t0, boot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a boot may take")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with scratch(args.workdir, "drill", args.keep, console) as root:
        env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_UI_ENABLED": "false", "HOTSPARE_STORE": str(root / "store"),
               "HOTSPARE_AGENT_STATE": str(root / "agent"), "HOTSPARE_VM_DIR": str(root / "vms"),
               "HOTSPARE_TRACKER": "scan"}
        rows = []
        with running_prefect_server(root, env) as url:
            env["PREFECT_API_URL"] = url
            disk = build_demo_disk(root / "demo.img")
            run([HOTSPARE, "protect", "demo", "--disk", f"root={disk}"], env, "protect")
            off = data_partition_offset(disk)
            for i in range(args.points):
                if i:
                    with open(disk, "r+b") as f:
                        f.seek(off + i * (4 << 20))
                        f.write(os.urandom(4 << 20))
                run([HOTSPARE, "agent", "demo", "--once", "--quiet"], env, "agent")
                run([HOTSPARE, "consolidate", "demo"], env, "consolidate")
            st = open_store(env["HOTSPARE_STORE"])
            cfg = load_machine(st, "demo")
            cat = load_catalog(st, "demo", cfg.disks[0].name, cfg.disks[0].size)
            host = LocalQemuHost()
            for p in cat.points:
                t0 = time.monotonic()
                out = drill_engine.drill(st, cfg, host, drill_engine.drill_dir("demo", env["HOTSPARE_VM_DIR"]),
                                         point_id=p.id, timeout=args.timeout)
                wall = time.monotonic() - t0
                chosen = drill_engine.choose_points(st, cfg, p.id)
                fwall, fboot = failover_boot(st, cfg, chosen, root / "vms" / "demo", args.timeout)
                rows.append((p.id, out.verdict.verdict, wall, out.verdict.seconds, fwall, fboot, out.accel))
        table = Table(title="drill per point vs the failover's boot of the same point (local QEMU)")
        for col in ("point", "verdict", "drill wall s", "drill boot s", "failover wall s", "failover boot s",
                    "wall ratio", "boot ratio", "accel"):
            table.add_column(col)
        for pid, verdict, wall, boot, fwall, fboot, accel in rows:
            table.add_row(pid, verdict, f"{wall:.1f}", "" if boot is None else f"{boot:.1f}", f"{fwall:.1f}",
                          f"{fboot:.1f}", f"{wall / fwall:.2f}", "" if boot is None else f"{boot / fboot:.2f}", accel)
        console.print(table)


if __name__ == "__main__":
    main()
