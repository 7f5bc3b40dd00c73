"""Issue 3 targets on real speech: RAVDESS fold 1, 20 peers (one actor each), against the centralized baseline.

- ``exponential-20``, dpsgd, with real processes (``p2pser launch``: 20 OS processes on loopback ZeroMQ);
- ``ring-20`` and ``exponential-20`` (dpsgd) simulated, with ``--baseline centralized`` (the pooled-data
  model with the same model, features, training settings and epoch budget, trained in the same run);
- ``star-20``, fedavg, simulated (the same peer code; only transport and clock differ);
- ``budget4x``: exponential-20 simulated with 120 rounds against its own baseline (4x the epochs in both arms).

Every arm uses svm on mfcc, 30 rounds of 4 local steps (batch 16, lr 0.02), seed 0. The simulated dpsgd runs
come from bench_simulate.py's topology sweep when ``--sweep DIR`` points at it (ring and exponential for 20
peers are the very graphs of topologies/ring-20.toml and exponential-20.toml, checked here), otherwise they
run here. Results: benchmarks/results/gossip.json; run folders under ``--work``.

    python benchmarks/bench_gossip.py [--sweep /tmp/gwork/sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulate import DATA, RESULTS, ROUNDS, SVM, TOPOLOGIES, brief, run_timed


def _same_graph(kind: str, file: str) -> bool:
    from p2pser.exchange.topology import load_topology, make_topology

    return make_topology(kind, 20).edges == load_topology(TOPOLOGIES / file).edges


def _baseline(summary: dict) -> dict:
    return {"ua": summary["ua"], "epochs": summary["epochs"], "wall_s": summary["wall_s"],
            "train_config": summary["train_config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gwork"), help="run folders and feature cache")
    parser.add_argument("--sweep", type=Path, default=None, help="bench_simulate.py's topology sweep folder")
    parser.add_argument("--base-port", type=int, default=47300, help="ports for the launched peers")
    parser.add_argument("--parts", default="sim,star,launch,budget4x", help="arms to (re)run; others are kept")
    parser.add_argument("--reuse", action="store_true", help="budget4x: read an existing run folder in --work")
    args = parser.parse_args()
    work = args.work
    common = [str(DATA / "ravdess"), *SVM, *ROUNDS, "--cache-dir", str(work / "cache")]
    out = RESULTS / "gossip.json"
    parts = set(args.parts.split(","))
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results.update(machine=f"{os.cpu_count()} CPUs (shared with other engineers), no GPU",
                   options=" ".join(SVM + ROUNDS), date=time.strftime("%Y-%m-%d %H:%M"))

    if "sim" not in parts:
        pass
    elif args.sweep is not None and _same_graph("ring", "ring-20.toml") and _same_graph("exponential",
                                                                                        "exponential-20.toml"):
        sweep = json.loads((args.sweep / "comparison.json").read_text())
        by_label = {s["label"]: s for s in sweep["runs"]}
        results["simulate_dpsgd"] = {"source": f"bench_simulate.py topology sweep ({args.sweep})",
                                     "ring-20": brief(by_label["ring"]),
                                     "exponential-20": brief(by_label["exponential"])}
        results["centralized"] = _baseline(sweep["baseline"])
    else:
        sweep_dir = work / "gossip-sweep"
        topo = f"{TOPOLOGIES / 'ring-20.toml'},{TOPOLOGIES / 'exponential-20.toml'}"
        timed = run_timed(["simulate", *common, "--topology", topo, "--baseline", "centralized", "--out",
                           str(sweep_dir)], work / "gossip-sweep.log")
        sweep = json.loads((sweep_dir / "comparison.json").read_text())
        runs = [brief(s) for s in sweep["runs"]]
        results["simulate_dpsgd"] = timed | {"ring-20": runs[0], "exponential-20": runs[1]}
        results["centralized"] = _baseline(sweep["baseline"])
    out.write_text(json.dumps(results, indent=1))

    if "star" in parts:
        star_dir = work / "gossip-star"
        timed = run_timed(["simulate", *common, "--topology", str(TOPOLOGIES / "star-20.toml"), "--algorithm",
                           "fedavg", "--out", str(star_dir)], work / "gossip-star.log")
        results["simulate_fedavg_star-20"] = timed | brief(json.loads((star_dir / "summary.json").read_text()))
        out.write_text(json.dumps(results, indent=1))

    if "launch" in parts:
        launch_dir = work / "gossip-launch"
        timed = run_timed(["launch", str(TOPOLOGIES / "exponential-20.toml"), *common, "--quiet", "--base-port",
                           str(args.base_port), "--out", str(launch_dir)], work / "gossip-launch.log")
        results["launch_dpsgd_exponential-20"] = timed | brief(json.loads((launch_dir / "summary.json").read_text()))
    if "budget4x" in parts:
        # The same comparison with four times the rounds (and so four times the epochs in both arms): does the
        # gap close with training length, or is it the decentralized schedule itself?
        budget_dir = work / "exp120"
        rounds = [a if a != "30" else "120" for a in ROUNDS[:-1]] + ["20"]
        cmd = ["simulate", str(DATA / "ravdess"), *SVM, *rounds, "--topology", str(TOPOLOGIES / "exponential-20.toml"),
               "--baseline", "centralized", "--cache-dir", str(work / "cache"), "--out", str(budget_dir)]
        timed = {"command": "p2pser " + " ".join(cmd) + "  (run folder reused)"}
        if not (args.reuse and (budget_dir / "comparison.json").exists()):
            timed = run_timed(cmd, work / "exp120.log")
        sweep = json.loads((budget_dir / "comparison.json").read_text())
        run = sweep["runs"][0]
        results["simulate_dpsgd_exponential-20_120_rounds"] = timed | brief(run) | {
            "options": " ".join(SVM + rounds), "centralized": _baseline(sweep["baseline"]),
            "ua_mean_per_round": {int(r): round(v, 4) for r, v in run["ua_mean_per_round"].items()},
            "gap_points": round(100 * (sweep["baseline"]["ua"] - run["ua_mean"]), 2)}
    launched, baseline = results["launch_dpsgd_exponential-20"], results["centralized"]
    results["headline"] = {
        "launch_exponential20_ua_mean": launched["ua_mean"], "centralized_ua": baseline["ua"],
        "gap_points": round(100 * (baseline["ua"] - launched["ua_mean"]), 2), "target_points": 2.0,
    }
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
