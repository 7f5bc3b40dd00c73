"""Where ``p2pser simulate`` spends its time, before and after a change: cProfile of the same runs at an
earlier commit (a temporary git worktree) and at the working tree (issue 12).

    python benchmarks/bench_profile.py --base 626dc77

Cases (single process, so the profile sees all the work): the Flower comparison's svm case shortened to 6
rounds (RAVDESS fold 1, 20 peers, fedavg on a star, 8 local steps of 16, test UA every round) and the
README's main job shortened to 8 rounds plus 2 averaging rounds (synthetic corpus, 12 peers, dpsgd,
cnn1d-shallow). For each: wall time of the command, of the simulation loop, and the cumulative seconds of
the functions that matter (training, evaluation, the svm's statistics pooling, checkpoints, codec, metrics,
report). Writes ``benchmarks/results/profile.json``.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import DATA, REPO, provenance, write_results

WATCH = {  # label -> (file suffix, function name) in the profile
    "simulation loop": ("carriers/simulated.py", "run"),
    "local training": ("learn/learner.py", "train"),
    "evaluation": ("learn/learner.py", "evaluate"),
    "svm statistics pooling": ("learn/models.py", "_stats_pool"),
    "checkpoints": ("exchange/checkpoint.py", "save_checkpoint"),
    "decode": ("exchange/codec.py", "decode"),
    "encode": ("exchange/codec.py", "encode"),
    "mixing": ("exchange/peer.py", "mix"),
    "metrics rows": ("report/metrics_log.py", "write"),
    "building peers": ("exchange/peer.py", "build_peer"),
    "report and plots": ("report/summary.py", "report_run"),
}


def cases(synth: Path) -> dict[str, list[str]]:
    return {
        "svm, fedavg, 20 peers, test UA every round (6 rounds)": [
            str(DATA / "ravdess"), "--fold", "1", "--model", "svm", "--rounds", "6", "--local-steps", "8",
            "--batch-size", "16", "--lr", "0.1", "--eval-every", "1", "--algorithm", "fedavg", "--topology",
            str(REPO / "topologies" / "star-20.toml")],
        "README main job (cnn1d-shallow, dpsgd, 12 peers; 8 + 2 rounds)": [
            str(synth), "--max-seconds", "3", "--rounds", "8", "--final-mixing", "2", "--local-steps", "4",
            "--eval-every", "5"],
    }


def profile(source: Path, args: list[str], out: Path, extra: list[str], env: dict) -> dict:
    prof = out.with_suffix(".prof")
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "p2pser", "simulate", *args, *extra,
           "--out", str(out)]
    load = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=source, env=dict(env, PYTHONPATH=str(source)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    stats = pstats.Stats(str(prof)).stats
    seconds = {}
    for label, (suffix, name) in WATCH.items():
        seconds[label] = round(sum(v[3] for (path, _, func), v in stats.items()
                                   if path.endswith(suffix) and func == name), 2)
    return {"wall_s_under_profiler": round(wall, 1), "load_at_start": load, "cumulative_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    args = parser.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", args.base], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    results: dict = {"base": base_rev, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="p2pser-profile-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), base_rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            env = dict(os.environ)
            synth = tmp / "synth"
            subprocess.run([sys.executable, "-m", "p2pser", "data", "synth", str(synth), "--speakers", "16"],
                           check=True, cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
            for i, (name, case) in enumerate(cases(synth).items()):
                before = profile(base, case, tmp / f"before-{i}", [], env)
                after = profile(REPO, case, tmp / f"after-{i}", ["--workers", "1"], env)
                results["cases"][name] = {"args": case, "before": before, "after": after}
                print(name, before, after, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    write_results("profile", provenance(sys.argv) | results)


if __name__ == "__main__":
    main()
