"""Issue 10 item 7 (fast feedback): start-up time of every ``--help``, and the test tiers' wall time, idle and
beside a CPU burner.

Parts (``--parts``, comma list):
- ``startup``: ``python -m p2pser [COMMAND ...] --help`` for every command and subcommand (found by walking
  the parser), ``--repeat`` times each; median and worst wall seconds. Target: under 0.5 s.
- ``fast``: ``pytest -m "not slow"`` once. Target: under 90 s.
- ``suite``: the whole suite once, as the README runs it (``pytest -n 2``: two xdist workers; ``--workers``
  changes it, 0 = one process). Target: under 7 minutes.
- ``burner``: the whole suite while ``--burners`` processes (``while True: pass``) keep the cores busy; it
  must pass. The burners are started and killed by this script.

Each part records the load average before and after (other engineers share the machine), the commit, the
date and pytest's last line. Results: benchmarks/results/fast_feedback.json (a part rerun replaces its entry).

    python benchmarks/bench_fast_feedback.py --parts startup,fast,suite,burner
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "fast_feedback.json"
BURN = "while True: pass"


def startup(repeat: int) -> dict:
    rows = {}
    from p2pser.cli import command_paths

    for argv in command_paths():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "p2pser", *argv, "--help"], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        rows[" ".join(["p2pser", *argv, "--help"])] = {"median_s": round(statistics.median(times), 3),
                                                        "max_s": round(max(times), 3)}
    worst = max(r["max_s"] for r in rows.values())
    return {"repeat": repeat, "commands": rows, "worst_s": worst, "target_s": 0.5}


def pytest_run(args: list[str]) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    lines = proc.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(["pytest", *args]), "wall_s": round(wall, 1), "returncode": proc.returncode,
            "result": lines[-1] if lines else proc.stderr[-500:], "failed": failed}


def beside_burners(n: int, args: list[str]) -> dict:
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(n)]
    try:
        time.sleep(5)  # let the load average see them
        return {"burners": n, **pytest_run(args)}
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="startup,fast,suite,burner")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each --help")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="CPU burner processes")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (-n) of every pytest run; "
                        "0 runs in one process")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    workers = ["-n", str(args.workers)] if args.workers else ["-p", "no:xdist"]
    for part in args.parts.split(","):
        load = os.getloadavg()
        if part == "startup":
            entry = startup(args.repeat)
        elif part == "fast":
            entry = pytest_run([*workers, "-m", "not slow"]) | {"target_s": 90}
        elif part == "suite":
            entry = pytest_run(workers) | {"target_s": 420}
        elif part == "burner":
            entry = beside_burners(args.burners, workers) | {"target": "passes"}
        else:
            raise SystemExit(f"unknown part {part!r}")
        entry |= {"load_avg_before": [round(x, 2) for x in load],
                  "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                  "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "machine": f"{os.cpu_count()} CPUs (shared with other engineers)"}
        results[part] = entry
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(part, json.dumps({k: v for k, v in entry.items() if k != "commands"}))


if __name__ == "__main__":
    main()
