"""Many peers on one machine (issue 12): seconds per round and memory per peer of ``p2pser simulate``.

    python benchmarks/bench_scale.py [--cases svm-1000,cnn-256] [--rounds 30] [--workers 1,2]

A synthetic corpus (``p2pser data synth``, 40 speakers x 15 utterances per emotion, 3,600 utterances) is split
iid among the peers, which talk on a random-regular graph of degree 8 (D-PSGD, no final averaging rounds,
test UA every 10 rounds and at the end, on two held-out speakers, 180 utterances, to keep 256 CNN evaluations
short). Each case is one ``p2pser simulate`` process with its learners in
that process (``--workers 1``), so its peak resident memory (``ru_maxrss``) is the whole run's (with
``--workers N`` it is the largest single process's, not their sum); seconds per
round are the simulation loop's wall time (``loop_s`` of the summary) over the rounds run. Writes
``benchmarks/results/NAME.json`` (``--name``, default ``scale``).
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

from bench_common import REPO, provenance, write_results

_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
         "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_maxrss, r.ru_utime + r.ru_stime)")
CASES = {"svm-1000": ("svm", 1000), "cnn-256": ("cnn1d-shallow", 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", default="30", help="rounds per case, one number or one per case (comma list)")
    parser.add_argument("--workers", default="1", help="learner processes, one number or one per case")
    parser.add_argument("--name", default="scale", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--corpus", help="an existing synthetic corpus folder (else one is generated)")
    parser.add_argument("--features", default="mfcc",
                        help="feature kind: mfcc (default) keeps the issue's models (svm 1,928 parameters, "
                             "cnn1d-shallow 81,800); the project default compare (6,373 inputs) would make them far larger")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cases = args.cases.split(",")
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = rounds * len(cases) if len(rounds) == 1 else rounds
    workers = [int(w) for w in args.workers.split(",")]
    workers = workers * len(cases) if len(workers) == 1 else workers
    results: dict = {"cases": {}}
    with tempfile.TemporaryDirectory(prefix="p2pser-scale-") as tmp:
        tmp = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else tmp / "synth"
        if not args.corpus:
            subprocess.run([sys.executable, "-m", "p2pser", "data", "synth", str(corpus), "--speakers", "40",
                            "--per-emotion", "15"], check=True, env=env, stdout=subprocess.DEVNULL)
        for name, n_rounds, n_workers in zip(cases, rounds, workers, strict=True):
            model, peers = CASES[name]
            out = tmp / name
            cmd = [sys.executable, "-m", "p2pser", "simulate", str(corpus), "--model", model, "--features",
                   args.features, "--peers", str(peers),
                   "--partition", "iid", "--topology", "random-regular", "--degree", "8", "--rounds", str(n_rounds),
                   "--final-mixing", "0", "--local-steps", "4", "--eval-every", "10", "--max-seconds", "3",
                   "--test-speakers", "synth_01,synth_02", "--workers", str(n_workers), "--out", str(out)]
            load = [round(x, 2) for x in os.getloadavg()]
            t0 = time.monotonic()
            # A fresh parent per case, so that its children's peak resident memory is this case's alone.
            measured = subprocess.run([sys.executable, "-c", _PEAK, *cmd], check=True, env=env, text=True,
                                      capture_output=True)
            wall = time.monotonic() - t0
            peak_kb, cpu_s = int(measured.stdout.split()[-2]), float(measured.stdout.split()[-1])
            summary = json.loads((out / "summary.json").read_text())
            results["cases"][name] = {
                "model": model, "features": args.features, "workers": summary.get("workers"), "peers": peers,
                "rounds": n_rounds, "command": " ".join(cmd[1:]),
                "load_at_start": load, "wall_s": round(wall, 1), "cpu_s": round(cpu_s, 1),
                "load_at_end": [round(x, 2) for x in os.getloadavg()], "loop_s": summary.get("loop_s"),
                "seconds_per_round": round(summary["loop_s"] / n_rounds, 2),
                "peak_rss_gb": round(peak_kb / 2**20, 3), "peak_rss_mb_per_peer": round(peak_kb / 1024 / peers, 2),
                "ua_mean": summary.get("ua_mean"), "ua_average_model": summary.get("ua_average_model"),
            }
            print(name, json.dumps(results["cases"][name]), flush=True)
            write_results(args.name, provenance(sys.argv) | results)  # after each case: a long run keeps what it has


if __name__ == "__main__":
    main()
