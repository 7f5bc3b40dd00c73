"""`p2pser --help` stays fast: building the parser and printing any command's help imports no heavy module.

Deterministic, not timed: a fresh interpreter prints every help text there is (found by walking the parser,
so a new subcommand is covered without editing this test) and then lists what it imported. The time
itself is measured by benchmarks/bench_startup.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

# torch alone costs about 1 s of start-up; the others 0.1-0.5 s each.
HEAVY = ("torch", "librosa", "numba", "zmq", "matplotlib", "scipy", "sklearn", "networkx")

EVERY_HELP = f"""
import contextlib, io, json, sys
from p2pser.cli import command_paths, main

shown = []
for argv in command_paths():
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*argv, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    assert "usage: p2pser" in out.getvalue(), argv
    shown.append(" ".join(argv))
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"shown": shown, "heavy": heavy}}))
"""


def test_every_help_text_imports_no_heavy_module():
    result = subprocess.run([sys.executable, "-c", EVERY_HELP], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["heavy"] == [], f"imported while printing help: {report['heavy']}"
    # The walk really reached the nested commands (p2pser data synth, p2pser slurm peer, ...).
    assert {"", "data synth", "features", "train", "simulate", "launch", "slurm peer", "keys new"} <= set(
        report["shown"]), report["shown"]


def test_python_m_p2pser_help_lists_every_command():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "p2pser", "--help"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for command in ("data", "features", "train", "topology", "peer", "launch", "simulate", "keys", "launch-hosts"):
        assert command in result.stdout
    # -X importtime lists every module the interpreter imported, one per line, on stderr.
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "p2pser" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
