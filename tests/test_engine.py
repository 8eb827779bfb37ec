"""The engine stays free of the orchestrator: flows, tasks and blocks wrap it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_engine_imports_without_prefect() -> None:
    code = (
        "import sys, importlib, pkgutil, hotspare\n"
        "for m in pkgutil.walk_packages(hotspare.__path__, 'hotspare.'):\n"
        "    if m.name != 'hotspare.cli':\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'prefect' or n.startswith('prefect.'))\n"
        "sys.exit(f'prefect loaded: {bad[:3]}' if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_cli_help_is_fast_and_lists_the_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "hotspare.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("protect", "agent", "ingest", "consolidate", "points", "export", "demo"):
        assert cmd in r.stdout


def test_the_engine_never_imports_the_orchestration_layer_even_lazily() -> None:
    """Only the CLI may reach up into flows, tasks, blocks or deployments; the source is read,
    so an import inside a function is caught too."""
    import re

    root = Path(__file__).resolve().parent.parent / "hotspare"
    pattern = re.compile(r"^\s*(from|import)\s+(flows|tasks|blocks|deployments)\b", re.M)
    offenders = [f"{p.relative_to(root.parent)}:{src[:m.start()].count(chr(10)) + 1}"
                 for p in root.rglob("*.py") if p.name != "cli.py" and "cli" not in p.parts
                 for src in [p.read_text()] for m in pattern.finditer(src)]
    assert not offenders, f"engine modules import the orchestration layer: {offenders}"
