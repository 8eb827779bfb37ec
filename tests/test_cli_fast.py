"""The CLI starts fast: commands that run no flow never import Prefect, and a command that
runs a flow with no server configured says how to point it at a running one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import cli, random_image

PROBE = """
import sys
sys.argv = ["hotspare", *sys.argv[1:]]
from hotspare import cli
cli.run()
print("PREFECT-IMPORTED" if any(m == "prefect" or m.startswith("prefect.") for m in sys.modules) else "NO-PREFECT")
"""


def _probe(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env={**os.environ, **env},
                       timeout=60, check=False)
    return r.stdout.strip().splitlines()[-1]


def test_commands_that_run_no_flow_do_not_import_prefect(tmp_path: Path) -> None:
    random_image(tmp_path / "d.img", 4 << 20)
    env = {"HOTSPARE_STORE": str(tmp_path / "store")}
    cli("protect", "m1", "--disk", f"root={tmp_path / 'd.img'}", env=env)
    for args in (["--help"], ["status"], ["status", "--json"], ["points", "m1"], ["failover", "--help"]):
        assert _probe(*args, env=env) == "NO-PREFECT", f"hotspare {' '.join(args)} imported prefect"


def test_a_flow_command_without_a_server_says_how_to_use_a_running_one(tmp_path: Path) -> None:
    random_image(tmp_path / "d.img", 4 << 20)
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": ""}
    cli("protect", "m1", "--disk", f"root={tmp_path / 'd.img'}", env=env)
    cli("agent", "m1", "--once", "--quiet", "--tracker", "scan", env=env)
    r = cli("ingest", "m1", env=env)
    assert "accepted 1 log(s)" in r.stdout
    assert "no Prefect server configured" in r.stderr and "export PREFECT_API_URL=" in r.stderr, r.stderr


EXIT_PROBE = """
import atexit, sys
sys.argv = ["hotspare", *sys.argv[2:]]
atexit.register(lambda: open(sys.argv_marker, "w").write("ran"))
from hotspare import cli
cli.main()
"""


def test_the_cli_ends_with_its_exit_code_after_exit_handlers_and_all_output(tmp_path: Path) -> None:
    """main() ends the process itself (so native thread pools cannot abort it during the
    interpreter's teardown): the command's exit code, its whole piped output and every exit
    handler survive that."""
    random_image(tmp_path / "d.img", 4 << 20)
    env = {**os.environ, "HOTSPARE_STORE": str(tmp_path / "store")}
    cli("protect", "m1", "--disk", f"root={tmp_path / 'd.img'}", env=env)
    cli("agent", "m1", "--once", "--quiet", "--tracker", "scan", env=env)
    marker = tmp_path / "atexit-ran"
    probe = EXIT_PROBE.replace("sys.argv_marker", repr(str(marker)))
    for args, code in ((["check", "m1"], 0), (["check", "nosuch"], 3), (["points", "m1", "--json"], 0),
                       (["points"], 2)):
        marker.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-c", probe, "x", *args], capture_output=True, text=True, env=env,
                           timeout=120, check=False)
        assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
        assert marker.read_text() == "ran", args
        assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip(), "a usage error prints its message"
    full = subprocess.run([sys.executable, "-c", probe, "x", "points", "m1", "--json"], capture_output=True,
                          text=True, env=env, timeout=120, check=True)
    assert json.loads(full.stdout), "the piped JSON is whole"


def test_each_failover_and_failback_outcome_has_its_exit_code(capsys) -> None:
    """A run's ending, as Prefect states the flows return, through the CLI's report: each
    outcome a caller branches on becomes its typed error and exit code (README, Exit codes)."""
    import pytest
    from prefect.states import Cancelled, Completed

    from flows.failback import FailbackResult
    from flows.failover import FailoverResult
    from hotspare.cli.common import report_flow
    from hotspare.errors import LostRace, MachineLive, NotApproved, Refused

    report_flow(Completed(data=FailoverResult(machine="m", outcome="already", message="already failed over")),
                "failover")
    assert "already failed over" in capsys.readouterr().out  # a re-run's success: exit 0
    for outcome, error, code in [("refused", MachineLive, 4), ("rejected", NotApproved, 5),
                                 ("timed-out", NotApproved, 5), ("lost-race", LostRace, 7)]:
        with pytest.raises(error, match="the run's message") as got:
            report_flow(Cancelled(message="the run's message", data=FailoverResult(machine="m", outcome=outcome,
                                                                                    message="x")), "failover")
        assert got.value.exit_code == code, outcome
    with pytest.raises(Refused) as got:
        report_flow(Cancelled(message="not failed over", data=FailbackResult(machine="m", outcome="refused",
                                                                             message="x")), "failback")
    assert not isinstance(got.value, MachineLive) and got.value.exit_code == 4
