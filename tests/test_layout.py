"""The package layout reads as the data flow, and dependencies point one way along it (README, "How it fits
together"): a module may import from its own package and from those before it, never from those after."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "p2pser"
# Earlier rank = closer to the audio. Packages of one rank may not import each other.
RANK = {"audio": 0, "features": 1, "partition": 2, "learn": 3, "exchange": 4, "carriers": 5, "report": 6,
        "deploy": 7, "experiments": 7, "cli": 8}
# Shared by every layer: configuration, errors, atomic files, thread pinning; and the run folder's file names
# and metrics log, which a learner and a carrier write into.
ANYWHERE = {"p2pser.config", "p2pser.errors", "p2pser.files", "p2pser.runtime", "p2pser.report.run_folder",
            "p2pser.report.metrics_log"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("p2pser"):
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("p2pser")]
    return names


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_package_is_placed():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(RANK)


def test_dependencies_point_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _package("p2pser." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if own is None:
            continue
        for module in _imports(path):
            target = _package(module)
            if module in ANYWHERE or target is None or target == own:
                continue
            if RANK[target] >= RANK[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", ["p2pser.experiments.simulate", "p2pser.carriers.simulated"])
def test_the_simulator_never_imports_zeromq(module):
    code = f"import sys, {module}; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
