"""Issue 6 churn target: RAVDESS fold 1, 20 peers, a random 25% of them crash and restart later.

Every arm is ``p2pser simulate`` on ``topologies/exponential-20.toml`` with dpsgd, svm on mfcc, lr 0.1,
60 rounds of 2 local steps (the best decentralized schedule of the issue 3 benchmark), test UA every
round, checkpoints every 5 rounds. The churn arms add ``--churn random:0.25``: five peers each crash once
after a random round in the first half and come back 6-15 rounds later; a restarted peer loads its last
checkpoint (losing the rounds since), pulls its neighbours' current models and rejoins at their round.
Each seed gives another schedule of crashes; the fault-free arm runs with the same seed.

Reported per seed: mean (min) final test UA of all 20 peers with and without churn, and for every restarted
peer the rounds it needed after rejoining to be within 1 point of its neighbours' mean test UA.

    python benchmarks/bench_churn.py [--seeds 0,1,2] [--work /tmp/churnwork]

Results: benchmarks/results/churn.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulate import DATA, RESULTS, TOPOLOGIES, run_timed

OPTIONS = ["--model", "svm", "--features", "mfcc", "--lr", "0.1", "--fold", "1", "--rounds", "60",
           "--local-steps", "2", "--eval-every", "1", "--checkpoint-every", "5"]


def read_rows(run: Path) -> dict[int, list[dict]]:
    out = {}
    for folder in sorted(run.glob("peer-*")):
        out[int(folder.name[5:])] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return out


def test_ua(run: Path) -> dict[int, dict[int, float]]:
    return {p: {r["round"]: r["test_ua"] for r in rs if "test_ua" in r} for p, rs in read_rows(run).items()}


def neighbour_gaps(run: Path, topology_file: Path, rounds: range) -> list[float]:
    """|test UA of a peer - mean test UA of its neighbours| over all peers and ``rounds``: how far apart
    neighbours are anyway, the yardstick for 'back within 1 point'."""
    from p2pser.exchange.topology import load_topology

    topology = load_topology(topology_file)
    ua = test_ua(run)
    gaps = []
    for p in ua:
        for t in rounds:
            others = [ua[j][t] for j in topology.neighbours(p) if t in ua[j]]
            if t in ua[p] and others:
                gaps.append(abs(ua[p][t] - sum(others) / len(others)))
    return gaps


def recovery(run: Path, topology_file: Path) -> list[dict]:
    """For each restarted peer: when it crashed, when it rejoined, and the rounds after rejoining until its
    test UA was within 1 point of its neighbours' mean test UA at the same round."""
    from p2pser.exchange.topology import load_topology

    topology = load_topology(topology_file)
    rows = read_rows(run)
    ua = test_ua(run)
    out = []
    for p, rs in rows.items():
        rounds = [r["round"] for r in rs]
        gaps = [(a, b) for a, b in itertools.pairwise(rounds) if b > a + 1]
        if not gaps:
            continue
        crashed_after, rejoined = gaps[0]
        nbrs = topology.neighbours(p)
        needed = None
        for t in sorted(r for r in ua[p] if r >= rejoined):
            others = [ua[j][t] for j in nbrs if t in ua[j]]
            if others and abs(ua[p][t] - sum(others) / len(others)) <= 0.01:
                needed = t - rejoined
                break
        gap_at_rejoin = None
        if rejoined in ua[p]:
            others = [ua[j][rejoined] for j in nbrs if rejoined in ua[j]]
            gap_at_rejoin = round(ua[p][rejoined] - sum(others) / len(others), 4) if others else None
        out.append({"peer": p, "crashed_after_round": crashed_after, "rejoined_at_round": rejoined,
                    "ua_minus_neighbours_at_rejoin": gap_at_rejoin, "rounds_to_within_1_point": needed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/churnwork"), help="run folders and feature cache")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (one churn schedule each)")
    parser.add_argument("--arms", default="fault_free,churn", help="arms to (re)run; others are read from --work")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    topo = TOPOLOGIES / "exponential-20.toml"
    results = {"machine": f"{os.cpu_count()} CPUs (shared with other engineers), no GPU",
               "options": " ".join(OPTIONS), "topology": str(topo.relative_to(topo.parents[1])),
               "date": time.strftime("%Y-%m-%d %H:%M"), "seeds": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        arms = {}
        for arm, extra in (("fault_free", []), ("churn", ["--churn", "random:0.25"])):
            out = work / f"{arm}-seed{seed}"
            command = ["simulate", str(DATA / "ravdess"), "--topology", str(topo), *OPTIONS, "--seed", str(seed),
                       "--cache-dir", str(work / "cache"), *extra, "--out", str(out)]
            if arm in args.arms.split(",") or not out.exists():
                shutil.rmtree(out, ignore_errors=True)
                timing = run_timed(command, work / f"{arm}-seed{seed}.log")
            else:  # kept from an earlier run of this script
                timing = {"command": "p2pser " + " ".join(command), "reused": True}
            summary = json.loads((out / "summary.json").read_text())
            arms[arm] = {"ua_mean": summary["ua_mean"], "ua_min": summary["ua_min"], **timing}
            if arm == "churn":
                arms[arm]["restarted"] = recovery(out, topo)
        arms["ua_mean_difference_points"] = round(100 * (arms["churn"]["ua_mean"] - arms["fault_free"]["ua_mean"]), 2)
        gaps = sorted(neighbour_gaps(work / f"fault_free-seed{seed}", topo, range(20, 60)))
        arms["fault_free_neighbour_gap_points"] = {"median": round(100 * gaps[len(gaps) // 2], 2),
                                                   "p90": round(100 * gaps[int(0.9 * len(gaps))], 2)}
        results["seeds"][seed] = arms
        print(json.dumps({seed: arms}, indent=1), flush=True)
    (RESULTS / "churn.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
