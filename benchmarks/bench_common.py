"""What every results file carries, so each figure can be traced (GUIDE.md, "Honest numbers"): the commit
(and whether the tree had uncommitted changes), the command, the date, the machine and its load."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
# The real corpora beside the clone (as tests find them); P2PSER_SHARED_DATA moves them.
DATA = Path(os.environ.get("P2PSER_SHARED_DATA", REPO.parent / "shared" / "data"))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()


def provenance(argv: list[str]) -> dict:
    return {
        "commit": _git("rev-parse", "HEAD"),
        # The results files themselves do not count (a script rewrites its own file as it goes).
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                         ":(exclude)benchmarks/results")),
        "command": "python " + " ".join(argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_write": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(name: str, results: dict) -> Path:
    """Write ``benchmarks/results/NAME.json`` (overwriting: a rerun replaces the figures it backs)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
