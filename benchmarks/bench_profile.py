"""Where ``p2pser simulate`` spends its time, before and after a change: cProfile of the same runs at an
earlier commit (a temporary git worktree) and at the working tree (issue 12).

    python benchmarks/bench_profile.py --base 626dc77

Cases (single process, so the profile sees all the work): the Flower comparison's svm case shortened to 6
rounds (RAVDESS fold 1, 20 peers, fedavg on a star, 8 local steps of 16, test UA every round) and the
README's main job shortened to 8 rounds plus 2 averaging rounds (synthetic corpus, 12 peers, dpsgd, the
default model and features). For each: wall time of the command, and the cumulative CPU seconds of the
simulation loop and of the functions that matter (training, evaluation, the svm's statistics pooling, consensus distance and
mixing, checkpoints, codec, metrics, report), profiled with the process's CPU time as the clock (the machine
is shared). Writes ``benchmarks/results/NAME.json`` (``--name``, default ``profile``).
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
    "consensus distance": ("exchange/mixing.py", "consensus_distance"),
    "mixing rule (weighted average)": ("exchange/mixing.py", "mix"),
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
        "README main job (the default mlp on compare, dpsgd, 12 peers; 8 + 2 rounds)": [
            str(synth), "--max-seconds", "3", "--rounds", "8", "--final-mixing", "2", "--local-steps", "4",
            "--eval-every", "5"],
    }


# cProfile with the process's CPU time as its clock: on a shared machine, wall time measures the other jobs.
_RUN = ("import cProfile, runpy, sys, time; prof = cProfile.Profile(time.process_time); sys.argv = sys.argv[1:]; "
        "prof.enable()\ntry: runpy.run_module('p2pser', run_name='__main__')\nexcept SystemExit: pass\n"
        "finally: prof.disable(); prof.dump_stats(sys.argv[0])")


def profile(source: Path, args: list[str], out: Path, extra: list[str], env: dict) -> dict:
    prof = out.with_suffix(".prof")
    cmd = [sys.executable, "-c", _RUN, str(prof), "simulate", *args, *extra, "--out", str(out)]
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
    return {"wall_s_under_profiler": round(wall, 1), "cpu_s_profiled": round(pstats.Stats(str(prof)).total_tt, 2),
            "load_at_start": load, "load_at_end": round(os.getloadavg()[0], 2), "cumulative_cpu_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--cases", default="0,1", help="which cases (0: svm fedavg, 1: README main job)")
    parser.add_argument("--name", default="profile", help="results file name (benchmarks/results/NAME.json)")
    args = parser.parse_args()
    chosen = {int(c) for c in args.cases.split(",")}
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
                if i not in chosen:
                    continue
                # One process on both sides (the profile sees only its own process).
                before = profile(base, case, tmp / f"before-{i}", ["--workers", "1"], env)
                after = profile(REPO, case, tmp / f"after-{i}", ["--workers", "1"], env)
                results["cases"][name] = {"args": case, "before": before, "after": after}
                print(name, before, after, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    write_results(args.name, provenance(sys.argv) | results)


if __name__ == "__main__":
    main()
