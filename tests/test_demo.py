"""README's main job: `hotspare demo` runs the whole cycle on embedded defaults."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import cli


def test_demo_runs_the_whole_cycle(tmp_path: Path, qemu_system: str) -> None:
    r = cli("demo", "--workdir", str(tmp_path), timeout=600)
    assert "the machine's disk holds the VM's last write, verified block for block" in r.stdout
    assert "failover" in r.stdout and "failback" in r.stdout and "Traceback" not in r.stderr
    assert "protected again" in r.stdout
    assert (tmp_path / "demo" / "store" / "machines" / "demo" / "machine.json").exists()
