"""What real processes cost: ``p2pser launch`` of 20 peer processes against ``p2pser simulate`` with the same
options (issue 12).

    python benchmarks/bench_launch.py [--reps 1] [--rounds 20]

RAVDESS fold 1, 20 peers (one actor each, ``topologies/exponential-20.toml``), the linear ``svm`` on ``mfcc``
(a small model, so what is measured is the machinery, not training), D-PSGD, ``--rounds`` rounds of 4 local
steps, no final averaging rounds, test UA every 5 rounds; the launch with its defaults (ZeroMQ on localhost,
``--security auto``). The two arms alternate (``--reps`` times each, after one untimed simulation that fills
the feature cache), each a fresh process timed from start to exit under ``/usr/bin/time -v``, which also
gives the CPU seconds of the process and all its children (the 20 peers of a launch).

Per round:
- ``simulate``: ``loop_s / rounds`` (the event loop stepping all 20 peers in one process);
- ``launch``: for every peer, the wall time between its first and last metrics row over the rounds between
  them (``time`` is the peer's clock since its carrier started), the median over peers.

The overhead per round is the difference; the CPU overhead is ``(CPU of launch - CPU of simulate) / rounds``
(start-up included: 20 interpreters importing torch). Writes ``benchmarks/results/launch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import DATA, REPO, provenance, write_results


def options(rounds: int) -> list[str]:
    return [str(DATA / "ravdess"), "--fold", "1", "--model", "svm", "--features", "mfcc", "--rounds", str(rounds),
            "--final-mixing", "0", "--local-steps", "4", "--eval-every", "5", "--seed", "0"]


def timed(args: list[str], env: dict, log: Path) -> dict:
    load = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "p2pser", *args], cwd=REPO, env=env,
                              stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): p2pser {' '.join(args)}\n{text[-3000:]}")

    def field(label: str) -> float:
        return float(re.search(rf"{re.escape(label)}: ([\d.]+)", text).group(1))

    return {"command_s": round(wall, 1), "cpu_s": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "peak_rss_mb_largest_process": round(field("Maximum resident set size (kbytes)") / 1024, 1),
            "load_at_start": load, "load_at_end": round(os.getloadavg()[0], 2)}


def launch_round_s(run: Path) -> float:
    """Median over peers of (last row's time - first row's time) / (rounds between them)."""
    per_peer = []
    for path in sorted(run.glob("peer-*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [r for r in rows if "round" in r and "time" in r]
        if len(rows) >= 2:
            per_peer.append((rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["round"] - rows[0]["round"]))
    return statistics.median(per_peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--base-port", type=int, default=47600)
    args = parser.parse_args()
    topology = str(REPO / "topologies" / "exponential-20.toml")
    runs: dict[str, list[dict]] = {"simulate": [], "launch": []}
    with tempfile.TemporaryDirectory(prefix="p2pser-launch-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   P2PSER_CACHE_DIR=os.environ.get("P2PSER_CACHE_DIR", str(tmp / "cache")))
        common = options(args.rounds)
        # Untimed: fills the feature cache (both arms then load the same cached features).
        timed(["simulate", *options(1), "--topology", topology, "--out", str(tmp / "warm")], env, tmp / "warm.log")
        for rep in range(args.reps):
            out = tmp / f"sim-{rep}"
            sim = timed(["simulate", *common, "--topology", topology, "--workers", "1", "--out", str(out)], env,
                        tmp / f"sim-{rep}.log")
            summary = json.loads((out / "summary.json").read_text())
            sim |= {"wall_s": summary["wall_s"], "loop_s": summary["loop_s"], "ua_mean": summary["ua_mean"],
                    "round_s": round(summary["loop_s"] / args.rounds, 3)}
            runs["simulate"].append(sim)
            print("simulate", rep, sim, flush=True)
            out = tmp / f"launch-{rep}"
            real = timed(["launch", topology, *common, "--quiet", "--base-port", str(args.base_port + 100 * rep),
                          "--out", str(out)], env, tmp / f"launch-{rep}.log")
            summary = json.loads((out / "summary.json").read_text())
            real |= {"wall_s": summary["wall_s"], "ua_mean": summary["ua_mean"],
                     "round_s": round(launch_round_s(out), 3)}
            runs["launch"].append(real)
            print("launch", rep, real, flush=True)

    def med(arm: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[arm]), 3)

    result = {
        "options": common[1:] + ["--topology", "topologies/exponential-20.toml"], "runs": runs,
        "round_s": {"simulate": med("simulate", "round_s"), "launch": med("launch", "round_s")},
        "overhead_per_round_s": round(med("launch", "round_s") - med("simulate", "round_s"), 3),
        "cpu_overhead_per_round_s": round((med("launch", "cpu_s") - med("simulate", "cpu_s")) / args.rounds, 3),
        "command_s": {"simulate": med("simulate", "command_s"), "launch": med("launch", "command_s")},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    write_results("launch", provenance(sys.argv) | result)


if __name__ == "__main__":
    main()
