"""The README's main job, timed at an earlier commit and at the working tree, interleaved (issue 12).

    python benchmarks/bench_main_job.py --base 626dc77 [--reps 2]

Runs the simulation of the Quick start (``p2pser simulate runs/synth --max-seconds 3 --rounds 20
--local-steps 4 --eval-every 5``, synthetic corpus of 16 speakers, without the pooled baseline) alternately at
``--base`` (a temporary git worktree) and here, with a warm feature cache, and records the summary's
``wall_s`` (set-up and simulation, as the README quotes it) and the whole command's time. The machine is
shared, so the figure to read is the ratio of the medians, measured under the same load. Writes
``benchmarks/results/main_job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import REPO, provenance, write_results

ARGS = ["--max-seconds", "3", "--rounds", "20", "--local-steps", "4", "--eval-every", "5"]


def run(source: Path, corpus: Path, out: Path, env: dict) -> dict:
    load = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "p2pser", "simulate", str(corpus), *ARGS, "--out", str(out)], check=True,
                   cwd=source, env=dict(env, PYTHONPATH=str(source)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": summary["wall_s"], "command_s": round(time.monotonic() - t0, 1), "load_at_start": load,
            "ua_mean": summary["ua_mean"], "workers": summary.get("workers")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--name", default="main_job", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", args.base], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="p2pser-mainjob-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), base_rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            env = dict(os.environ, P2PSER_CACHE_DIR=str(tmp / "cache"))
            corpus = tmp / "synth"
            subprocess.run([sys.executable, "-m", "p2pser", "data", "synth", str(corpus), "--speakers", "16"],
                           check=True, cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
            run(REPO, corpus, tmp / "warm-up", env)  # fills the feature cache, not counted
            for rep in range(args.reps):
                for side, source in (("before", base), ("after", REPO)):
                    runs[side].append(run(source, corpus, tmp / f"{side}-{rep}", env))
                    print(side, rep, runs[side][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    med = {side: statistics.median(r["wall_s"] for r in rs) for side, rs in runs.items()}
    write_results(args.name, provenance(sys.argv) | {
        "base": base_rev, "args": ARGS, "runs": runs, "median_wall_s": med,
        "speed_up": round(med["before"] / med["after"], 2)})


if __name__ == "__main__":
    main()
