"""Issue 4 targets: the simulator against real processes, its overhead at 64 peers, 256 peers, topologies.

Every case runs the real CLI (``p2pser simulate`` / ``p2pser launch``) under ``/usr/bin/time -v`` so wall time
and peak RSS are the user's; run folders go under ``--work`` (never into the repository), the numbers to
benchmarks/results/simulate.json and the plots to benchmarks/results/simulate-*.png.

Parts (``--parts``, comma list):
- ``agreement``: EmoDB fold 1, ring-8, svm on mfcc, simulated and launched with the same seed and options;
  final mean UA and the consensus-distance curves of both (one plot).
- ``scale64``: 64 peers, cnn1d-shallow, iid partition of RAVDESS fold 1: ``overhead_fraction`` (time outside
  local training and evaluation) from the summary.
- ``scale256``: 32 and 256 peers with svm: wall time and peak RSS, and the RSS growth per peer.
- ``topologies``: RAVDESS fold 1, 20 peers (one actor each), dpsgd on ring, torus, exponential, complete and
  star with ``--baseline centralized``: UA at fixed round budgets and consensus distance per round, against
  the Metropolis-Hastings spectral gap of each topology.

    python benchmarks/bench_simulate.py --parts agreement,scale64,scale256,topologies
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
RESULTS = HERE / "results"
TOPOLOGIES = REPO / "topologies"
# One recipe for every svm case: the linear model wants the larger step (see p2pser.learn.trainer._RECIPES).
SVM = ["--model", "svm", "--features", "mfcc", "--lr", "0.02", "--seed", "0"]
# The RAVDESS fold 1, 20-peer schedule shared with bench_gossip.py (eval every 5 rounds: fixed round budgets).
ROUNDS = ["--fold", "1", "--rounds", "30", "--local-steps", "4", "--eval-every", "5"]
KINDS = ("ring", "torus", "exponential", "complete", "star")


def run_timed(args: list[str], log_path: Path) -> dict:
    """Run ``p2pser ARGS`` under /usr/bin/time -v (one torch thread); wall seconds, peak RSS and the command."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "p2pser", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    load = os.getloadavg()[0]
    start = time.monotonic()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return {"command": "p2pser " + " ".join(args), "wall_s": round(wall, 1), "cpu_s": round(sum(cpu), 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "load_avg_at_start": round(load, 2), "load_avg_at_end": round(os.getloadavg()[0], 2)}


def brief(summary: dict) -> dict:
    keys = ("mode", "algorithm", "topology", "model", "peers", "rounds", "ua_mean", "ua_min", "ua_max",
            "ua_average_model", "consensus_distance_first", "consensus_distance_last", "bytes_sent_total",
            "bytes_sent_max_peer", "wall_s", "overhead_fraction", "virtual_time_s")
    return {k: summary[k] for k in keys if k in summary}


def curve(summary: dict, key: str) -> dict[int, float]:
    return {int(r): round(v, 5) for r, v in summary[key].items()}


def agreement(work: Path, port: int) -> dict:
    common = [str(DATA / "emodb"), *SVM, "--fold", "1", "--rounds", "15", "--local-steps", "4",
              "--cache-dir", str(work / "cache")]
    topo = str(TOPOLOGIES / "ring-8.toml")
    sim = run_timed(["simulate", *common, "--topology", topo, "--out", str(work / "agree-sim")], work / "agree-sim.log")
    real = run_timed(["launch", topo, *common, "--quiet", "--base-port", str(port), "--out", str(work / "agree-launch")],
                     work / "agree-launch.log")
    s_sim = json.loads((work / "agree-sim" / "summary.json").read_text())
    s_real = json.loads((work / "agree-launch" / "summary.json").read_text())
    _plot_agreement(s_sim, s_real, RESULTS / "simulate-vs-launch.png")
    cd_sim, cd_real = curve(s_sim, "consensus_distance_per_round"), curve(s_real, "consensus_distance_per_round")
    common_rounds = sorted(set(cd_sim) & set(cd_real))
    rel = [abs(cd_sim[r] - cd_real[r]) / max(cd_real[r], 1e-12) for r in common_rounds]
    return {
        "simulate": sim | brief(s_sim), "launch": real | brief(s_real),
        "ua_mean_diff_points": round(100 * abs(s_sim["ua_mean"] - s_real["ua_mean"]), 2),
        "consensus_max_relative_diff": round(max(rel), 4) if rel else None,
        "consensus_per_round": {"simulate": cd_sim, "launch": cd_real},
        "ua_mean_per_round": {"simulate": curve(s_sim, "ua_mean_per_round"),
                              "launch": curve(s_real, "ua_mean_per_round")},
        "plot": "benchmarks/results/simulate-vs-launch.png",
    }


def _plot_agreement(sim: dict, real: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = ((sim, {"marker": "o", "ms": 4, "label": "simulate"}), (real, {"ls": "--", "marker": "x", "label": "launch"}))
    for s, style in styles:
        cd, ua = curve(s, "consensus_distance_per_round"), curve(s, "ua_mean_per_round")
        axes[0].plot(list(cd), list(cd.values()), **style)
        axes[1].plot(list(ua), list(ua.values()), **style)
    axes[0].set(xlabel="round", ylabel="mean consensus distance", yscale="log", title="Consensus distance")
    axes[1].set(xlabel="round", ylabel="mean test UA", title="Test UA (EmoDB fold 1, ring-8, svm)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def scale(work: Path, peers: int, model: list[str], rounds: int, steps: int) -> dict:
    out = work / f"scale-{peers}-{model[1]}"
    args = ["simulate", str(DATA / "ravdess"), *model, "--fold", "1", "--topology", "exponential", "--peers",
            str(peers), "--partition", "iid", "--rounds", str(rounds), "--local-steps", str(steps),
            "--eval-every", str(rounds), "--cache-dir", str(work / "cache"), "--out", str(out)]
    timed = run_timed(args, work / f"scale-{peers}-{model[1]}.log")
    return timed | brief(json.loads((out / "summary.json").read_text()))


def topologies(work: Path) -> dict:
    from p2pser.exchange.topology import make_topology, metropolis_hastings_weights, spectral_gap

    out = work / "sweep"
    args = ["simulate", str(DATA / "ravdess"), *SVM, *ROUNDS, "--topology", ",".join(KINDS), "--peers", "20",
            "--baseline", "centralized",
            "--cache-dir", str(work / "cache"), "--out", str(out)]
    timed = run_timed(args, work / "sweep.log")
    comparison = json.loads((out / "comparison.json").read_text())
    runs = {}
    for s in comparison["runs"]:
        topo = make_topology(s["label"], 20)
        runs[s["label"]] = brief(s) | {
            "spectral_gap_mh": round(spectral_gap(metropolis_hastings_weights(topo)), 4),
            "max_degree": max(len(topo.neighbours(i)) for i in range(topo.n)),
            "ua_mean_per_round": curve(s, "ua_mean_per_round"),
            "consensus_distance_per_round": curve(s, "consensus_distance_per_round"),
        }
    base = comparison["baseline"]
    for name in ("comparison.md", "comparison.png"):
        (RESULTS / f"simulate-topologies-{name.split('.')[0]}.{name.split('.')[1]}").write_bytes(
            (out / name).read_bytes())
    return timed | {"runs": runs, "sweep_dir": str(out),
                    "baseline": {"ua": base["ua"], "epochs": base["epochs"], "wall_s": base["wall_s"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="agreement,scale64,scale256,topologies")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gwork"), help="run folders and feature cache")
    parser.add_argument("--base-port", type=int, default=47100, help="ports for the launched peers")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "simulate.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = f"{os.cpu_count()} CPUs (shared with other engineers), no GPU"
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        if part == "agreement":
            results[part] = agreement(args.work, args.base_port)
        elif part == "scale64":
            results[part] = scale(args.work, 64, ["--model", "cnn1d-shallow", "--features", "mfcc"], 3, 4)
        elif part == "scale256":
            results[part] = {str(n): scale(args.work, n, SVM, 5, 2) for n in (32, 256)}
            a, b = results[part]["32"], results[part]["256"]
            results[part]["rss_mb_per_peer"] = round((b["peak_rss_mb"] - a["peak_rss_mb"]) / (256 - 32), 3)
        elif part == "topologies":
            results[part] = topologies(args.work)
        else:
            raise SystemExit(f"unknown part {part}")
        results[part]["date"] = time.strftime("%Y-%m-%d %H:%M")
        print(json.dumps(results[part], indent=1)[:3000], flush=True)
        out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
