"""What the CLI costs beyond the engine work: start-up of commands without Prefect, and the
Prefect overhead of a command that runs a flow, with no server configured (a temporary
server per command) and with a running ``prefect server start``.

    .venv/bin/python bench/cli.py [--runs 3] [--workdir DIR] [--keep]

Set-up (not measured): a 16 MiB image protected in a local store, one scan cycle, one
ingest; a ``prefect server start`` on a free port for the "running server" rows.

Measured (median of ``--runs``): ``hotspare --help``, ``hotspare status`` and ``hotspare
points`` (no Prefect imported), and ``hotspare ingest`` with nothing new (the flow runs, its
engine work is a catalog read and a listing) without and with a server. The overhead of a
flow command is its time minus ``hotspare points`` (the same reads, no Prefect). Issue 13's
target: at most 3 s over the engine work, or the command says how to point it at a running
server (it does, on stderr, when none is configured). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import running_prefect_server  # noqa: E402

HOTSPARE = str(Path(sys.prefix) / "bin" / "hotspare")


def timed(args: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([HOTSPARE, *args], env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(__file__).parent / ".work" / "cli"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img = work / "d.img"
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(16 << 20)
    env = {**os.environ, "HOTSPARE_STORE": str(work / "store"), "HOTSPARE_AGENT_STATE": str(work / "agent"),
           "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": ""}
    subprocess.run([HOTSPARE, "protect", "m", "--disk", f"root={img}"], env=env, check=True, capture_output=True)
    subprocess.run([HOTSPARE, "agent", "m", "--once", "--quiet", "--tracker", "scan"], env=env, check=True,
                   capture_output=True)
    subprocess.run([HOTSPARE, "ingest", "m"], env=env, check=True, capture_output=True)

    rows = [(" ".join(c), timed(c, env, a.runs)) for c in (["--help"], ["status"], ["points", "m"])]
    base = rows[-1][1]
    rows.append(("ingest m, no server (temporary one)", timed(["ingest", "m"], env, a.runs)))
    with running_prefect_server(work, env, timeout=90) as url:
        rows.append(("ingest m, running server", timed(["ingest", "m"], {**env, "PREFECT_API_URL": url}, a.runs)))
    print(f"{'command':<40} {'seconds':>8} {'over points (engine reads)':>28}")
    for name, t in rows:
        print(f"{name:<40} {t:8.2f} {t - base:28.2f}")
    print("target: a flow command adds <= 3 s over the engine work, or says how to use a running server (it does)")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
