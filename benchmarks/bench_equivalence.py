"""Same seed, same metrics: run the same simulations with an earlier commit and with the working tree, and
compare every peer's metrics rows field by field (timing fields aside).

    python benchmarks/bench_equivalence.py --base 63f4199

A refactor that claims "behaviour unchanged" shows it with this file: each case runs once at ``--base`` (a
temporary git worktree) and once here, on the same generated synthetic corpus and feature cache. Fields
that only one side writes are listed, not compared. Writes ``benchmarks/results/equivalence.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import provenance, write_results

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock and per-process timing: they differ between any two runs.
TIMING = {"time", "deadline_s", "wait_s"}
COMMON = ["--max-seconds", "3", "--local-steps", "4"]
CASES = {
    "readme-demo (dpsgd, exponential, cnn1d-shallow)": ["--rounds", "20", "--eval-every", "5"],
    "gossip": ["--rounds", "12", "--eval-every", "3", "--algorithm", "gossip"],
    "fedavg on a star": ["--rounds", "12", "--eval-every", "3", "--algorithm", "fedavg", "--topology", "star"],
    "faults (svm, 10% loss, churn, trimmed mean)": [
        "--rounds", "12", "--eval-every", "3", "--model", "svm", "--drop", "0.1", "--churn", "3@4-8",
        "--mixing", "trimmed"],
    "fedavg, svm, local normaliser, test every round": [
        "--rounds", "8", "--eval-every", "1", "--algorithm", "fedavg", "--topology", "star", "--model", "svm",
        "--normalizer", "local"],
}


def simulate(source: Path, corpus: Path, out: Path, args: list[str], env: dict) -> None:
    """``args`` may end with options only the working tree knows (``--workers``)."""
    cmd = [sys.executable, "-m", "p2pser", "simulate", str(corpus), *COMMON, *args, "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=source, env=dict(env, PYTHONPATH=str(source)),
                   stdout=subprocess.DEVNULL)


def rows_of(run: Path) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(run.glob("peer-*/metrics.jsonl"))}


def compare(before: Path, after: Path) -> dict:
    a, b = rows_of(before), rows_of(after)
    differences, only_before, only_after, compared = [], set(), set(), 0
    for peer in sorted(set(a) | set(b)):
        ra, rb = a.get(peer, []), b.get(peer, [])
        if len(ra) != len(rb):
            differences.append(f"{peer}: {len(ra)} rows before, {len(rb)} after")
        for x, y in zip(ra, rb):
            only_before |= x.keys() - y.keys()
            only_after |= y.keys() - x.keys()
            for key in (x.keys() & y.keys()) - TIMING:
                compared += 1
                if x[key] != y[key]:
                    differences.append(f"{peer} round {x.get('round')}: {key} {x[key]!r} -> {y[key]!r}")
    fields = sorted({d.split(": ", 1)[1].split()[0] for d in differences if ": " in d})
    return {"values_compared": compared, "differences": differences[:50], "n_differences": len(differences),
            "differing_fields": fields,
            "fields_only_before": sorted(only_before), "fields_only_after": sorted(only_after),
            "identical": not differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--speakers", type=int, default=16)
    parser.add_argument("--workers", default=None,
                        help="comma list: run the working tree once per number of learner processes (simulate "
                             "--workers N), each compared with the single run at --base")
    parser.add_argument("--name", default="equivalence", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    results: dict = {"base": base_rev, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="p2pser-equivalence-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), base_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            env = dict(os.environ, P2PSER_CACHE_DIR=str(tmp / "cache"))
            corpus = tmp / "synth"
            subprocess.run([sys.executable, "-m", "p2pser", "data", "synth", str(corpus), "--speakers",
                            str(args.speakers)], check=True, cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                           stdout=subprocess.DEVNULL)
            variants = [[]] if args.workers is None else [["--workers", w] for w in args.workers.split(",")]
            for i, (name, case) in enumerate(CASES.items()):
                t0 = time.monotonic()
                simulate(base, corpus, tmp / f"before-{i}", case, env)
                for j, extra in enumerate(variants):
                    label = name if not extra else f"{name}, workers {extra[1]}"
                    t1 = time.monotonic()
                    simulate(ROOT, corpus, tmp / f"after-{i}-{j}", case + extra, env)
                    results["cases"][label] = compare(tmp / f"before-{i}", tmp / f"after-{i}-{j}") | {
                        "args": COMMON + case + extra, "wall_s": round(time.monotonic() - t0, 1),
                        "after_wall_s": round(time.monotonic() - t1, 1)}
                    t0 = time.monotonic()
                    print(f"{label}: {'identical' if results['cases'][label]['identical'] else 'DIFFERENT'}",
                          flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    write_results(args.name, provenance(sys.argv) | results)


if __name__ == "__main__":
    main()
