"""The engine stays free of the orchestrator: flows, tasks and blocks wrap it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_engine_imports_without_prefect() -> None:
    code = (
        "import sys, importlib, pkgutil, hotspare\n"
        "for m in pkgutil.walk_packages(hotspare.__path__, 'hotspare.'):\n"
        "    if m.name != 'hotspare.cli' and not m.name.startswith('hotspare.cli.'):\n"
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


ORCHESTRATION = ("flows", "tasks", "blocks", "deployments")


def orchestration_imports(src: str) -> list[int]:
    """Lines of ``src`` that import the orchestration layer, at any depth: ``import``,
    ``from ... import`` and ``importlib.import_module``/``__import__`` of a literal name."""
    def top(name: str | None) -> bool:
        return bool(name) and name.split(".")[0] in ORCHESTRATION

    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import) and any(top(a.name) for a in node.names):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and top(node.module):
            found.append(node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and top(node.args[0].value)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            found.append(node.lineno)
    return sorted(found)


def test_the_import_check_finds_lazy_imports() -> None:
    src = ("import os, flows.failover\n"
           "def run():\n"
           "    if True:\n"
           "        from tasks.events import emit\n"
           "    return importlib.import_module('blocks.vmhost'), __import__('deployments')\n"
           "from hotspare import flows_like\n")
    assert orchestration_imports(src) == [1, 4, 5, 5]


def test_the_engine_never_imports_the_orchestration_layer_even_lazily() -> None:
    """Only the CLI (``hotspare/cli/``) may reach up into flows, tasks, blocks or deployments;
    the source is read, so an import inside a function is caught too."""
    root = Path(__file__).resolve().parent.parent / "hotspare"
    offenders = [f"{p.relative_to(root.parent)}:{line}"
                 for p in sorted(root.rglob("*.py")) if p.relative_to(root).parts[0] != "cli"
                 for line in orchestration_imports(p.read_text())]
    assert len(list(root.rglob("*.py"))) > 50  # the walk saw the engine
    assert not offenders, f"engine modules import the orchestration layer: {offenders}"


# README's Layout, from the top: a module imports only its own layer and those below.
LAYERS = {
    "cli": 5,
    **dict.fromkeys(["ingest", "failover", "failback", "drill", "fleet", "check", "status", "fleetview"], 4),
    **dict.fromkeys(["capture", "vm", "qmp"], 3),
    **dict.fromkeys(["replica", "consolidate", "extentlog", "catalog", "vhd", "machine", "state", "heartbeat",
                     "fence", "stall", "replay"], 2),
    **dict.fromkeys(["store", "layout", "versioned", "quarantine", "errors", "localfile", "unixsocket", "faults", "progress", "qemuimg",
                     "demodisk"], 1),
}
# The failback's records are data that the heartbeat and the state chain carry.
RECORDS = {"failback.orders": 2, "failback.model": 2}


def _layer(dotted: str) -> int:
    parts = dotted.split(".")
    return RECORDS.get(".".join(parts[:2]), LAYERS[parts[0]])


def test_each_layer_imports_only_its_own_and_the_layers_below() -> None:
    root = Path(__file__).resolve().parent.parent / "hotspare"
    upward = []
    for p in sorted(root.rglob("*.py")):
        here = ".".join(p.relative_to(root).with_suffix("").parts)
        if here in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            for name in names:
                if name == "hotspare" and isinstance(node, ast.ImportFrom):
                    names += [f"hotspare.{a.name}" for a in node.names]
                if not name.startswith("hotspare."):
                    continue
                there = name.removeprefix("hotspare.")
                if _layer(there) > _layer(here):
                    upward.append(f"hotspare/{p.relative_to(root)}:{node.lineno} imports hotspare.{there}")
    assert set(LAYERS) >= {p.stem if p.is_file() else p.name for p in root.iterdir()
                           if p.name not in ("__init__.py", "__pycache__")}, "a new module needs its layer here"
    assert not upward, "\n".join(upward)
