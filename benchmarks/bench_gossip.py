"""Issue 11: is the gossip-learned model as good as pooled training? Defaults against defaults, as a user runs
them, on real speech; every figure into benchmarks/results/gossip.json with the commit, command and load.

Parts (``--parts``, comma list; each rewrites only its own entry):

- ``headline``: RAVDESS fold 1. ``p2pser train RAVDESS --fold 1`` (defaults) against ``p2pser launch
  topologies/exponential-20.toml RAVDESS --fold 1`` (defaults: 20 real processes, one actor each).
- ``baselines``: the pooled model with the decentralized schedule's sequential steps and batch n x b (n peers
  x b per peer), next to the default pooled recipe; and the pooled model under the old ``global``
  normaliser, today's figure before this work (49.6%).
- ``ablation``: RAVDESS fold 1 simulated, each cause switched off from the defaults in turn: the speaker
  normaliser (``--normalizer local``), the recipe (the earlier defaults), drift correction (K-GT),
  final averaging.
- ``ring``: ring-20 simulated, with the bytes of the busiest peer; ``star``: fedavg on star-20.
- ``ravdess-folds`` / ``emodb-folds``: every fold simulated with the defaults (RAVDESS 20 peers, EmoDB 8
  peers) against the pooled model's folds.
  ``--folds``/``--no-pooled`` split them over processes (each with its own ``--name``); ``--parts combine
  --combine NAME,...`` joins them.
- ``ring8``: the synthetic corpus on topologies/ring-8.toml, 20 rounds, defaults: consensus distance of the
  first and the last round, and the spread of the peers' UA.

    python benchmarks/bench_gossip.py --parts headline,baselines,ablation,ring,star,ravdess-folds,emodb-folds,ring8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_common import DATA, REPO, RESULTS, provenance, write_results
from bench_simulate import run_timed

TOPOLOGIES = REPO / "topologies"
RAVDESS, EMODB = DATA / "ravdess", DATA / "emodb"
# The decentralized defaults before this work, for the ablation (cnn1d-shallow, AdamW kept across averages).
OLD_RECIPE = ["--rounds", "30", "--local-steps", "8", "--final-mixing", "0", "--algorithm", "dpsgd",
              "--optimizer-state", "keep"]
PEER_FIELDS = ("ua_mean", "ua_min", "ua_max", "ua_average_model", "consensus_distance_first",
               "consensus_distance_last", "bytes_sent_max_peer", "rounds", "peers", "ua_average_model_per_round",
               "ua_mean_per_round")


def simulate(work: Path, name: str, corpus: Path, *options: str) -> dict:
    out = work / name
    timed = run_timed(["simulate", str(corpus), *options, "--cache-dir", str(work / "cache"), "--out", str(out)],
                      work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    return timed | {k: summary.get(k) for k in PEER_FIELDS}


def train(work: Path, name: str, corpus: Path, *options: str) -> dict:
    out = work / name
    timed = run_timed(["train", str(corpus), *options, "--no-progress", "--cache-dir", str(work / "cache"),
                       "--out", str(out)], work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    return timed | {"ua": summary["ua"], "per_fold": [{k: f[k] for k in ("fold", "ua", "train_s")}
                                                     for f in summary["per_fold"]],
                    "train_config": summary["train_config"]}


def headline(work: Path, results: dict, base_port: int) -> None:
    pooled = train(work, "train-fold1", RAVDESS, "--fold", "1")
    out = work / "launch-fold1"
    launched = run_timed(["launch", str(TOPOLOGIES / "exponential-20.toml"), str(RAVDESS), "--fold", "1",
                          "--quiet", "--base-port", str(base_port), "--cache-dir", str(work / "cache"),
                          "--out", str(out)], work / "launch-fold1.log")
    summary = json.loads((out / "summary.json").read_text())
    launched |= {k: summary.get(k) for k in PEER_FIELDS}
    results["headline"] = {
        "train": pooled, "launch": launched,
        "gap_mean_points": round(100 * (pooled["ua"] - launched["ua_mean"]), 2),
        "gap_min_points": round(100 * (pooled["ua"] - launched["ua_min"]), 2),
        "targets": {"gap_mean_points": 2.0, "gap_min_points": 4.0, "launch_wall_s": 900},
    }


def baselines(work: Path, results: dict) -> None:
    from p2pser.config import RunConfig
    from p2pser.partition.experiment import make_plan

    cfg = RunConfig()
    plan = make_plan(RAVDESS, cfg)  # fold 1, one peer per training actor: what the headline's peers hold
    peers = plan.n_peers
    training_utterances = sum(len(p) for p in plan.peers) * (1 - cfg.val_fraction)
    batch = peers * cfg.batch_size
    steps = cfg.rounds * cfg.local_steps
    epochs = max(1, round(steps / max(1, int(training_utterances // batch))))
    results["baselines"] = {
        "same_sequential_steps_batch_nxb": train(work, "train-fold1-nxb", RAVDESS, "--fold", "1", "--batch-size",
                                                 str(batch), "--epochs", str(epochs)) | {
            "why": f"{steps} sequential steps of batch {peers} x {cfg.batch_size}, as the peers make"},
        "global_normaliser_before_this_work": train(work, "train-fold1-global", RAVDESS, "--fold", "1",
                                                    "--normalizer", "global"),
    }


def ablation(work: Path, results: dict, only: list[str] | None = None) -> None:
    topo = ["--topology", str(TOPOLOGIES / "exponential-20.toml"), "--fold", "1"]
    arms = {
        "defaults": [],
        "normalizer local": ["--normalizer", "local"],
        "earlier recipe": OLD_RECIPE,
        "earlier recipe, normalizer local (before this work)": [*OLD_RECIPE, "--normalizer", "local"],
        "no final averaging": ["--final-mixing", "0"],
        "K-GT drift correction": ["--algorithm", "kgt"],
    }
    results.setdefault("ablation", {})
    for name, options in arms.items():
        if only and name not in only:
            continue
        results["ablation"][name] = simulate(work, "ablation-" + name.replace(" ", "-").replace(",", ""),
                                             RAVDESS, *topo, *options) | {"options": " ".join(options)}
        yield


def summarize_folds(entry: dict, folds: int) -> None:
    """The gap over folds, once every fold and the pooled model are in."""
    if "pooled" not in entry or any(str(k) not in entry["folds"] for k in range(1, folds + 1)):
        return
    done = [entry["folds"][str(k)] for k in range(1, folds + 1)]
    entry["ua_mean_over_folds"] = sum(d["ua_mean"] for d in done) / folds
    entry["ua_min_over_folds"] = sum(d["ua_min"] for d in done) / folds
    entry["gap_points"] = round(100 * (entry["pooled"]["ua"] - entry["ua_mean_over_folds"]), 2)
    entry["gap_points_per_fold"] = {str(k): round(100 * (entry["pooled"]["per_fold"][k - 1]["ua"]
                                                         - entry["folds"][str(k)]["ua_mean"]), 2)
                                    for k in range(1, folds + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="headline,baselines,ablation,ring,star,ring8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gossip-work"))
    parser.add_argument("--base-port", type=int, default=47300)
    parser.add_argument("--name", default="gossip", help="results file name (parallel runs write apart)")
    parser.add_argument("--ablation-arms", default=None, help="';'-separated subset of the ablation's arms")
    parser.add_argument("--folds", type=lambda text: [int(k) for k in text.split(",")], default=None,
                        help="only these folds of ravdess-folds/emodb-folds (comma list), to split a part over "
                             "processes, each with its own --name; join them with --parts combine")
    parser.add_argument("--no-pooled", dest="pooled", action="store_false",
                        help="ravdess-folds/emodb-folds without the pooled model (another process trains it)")
    parser.add_argument("--combine", default="", help="for --parts combine: the results names to join")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results = {k: v for k, v in results.items() if k not in ("machine", "options", "date")}  # older format

    def save() -> None:
        write_results(args.name, results | provenance(sys.argv))

    for part in args.parts.split(","):
        if part == "headline":
            headline(args.work, results, args.base_port)
        elif part == "baselines":
            baselines(args.work, results)
        elif part == "ablation":
            only = args.ablation_arms.split(";") if args.ablation_arms else None
            for _ in ablation(args.work, results, only):
                save()
        elif part == "ring":
            results["ring-20"] = simulate(args.work, "ring-20", RAVDESS, "--fold", "1", "--topology",
                                          str(TOPOLOGIES / "ring-20.toml"))
        elif part == "star":
            results["fedavg-star-20"] = simulate(args.work, "star-20", RAVDESS, "--fold", "1", "--topology",
                                                 str(TOPOLOGIES / "star-20.toml"), "--algorithm", "fedavg")
        elif part in ("ravdess-folds", "emodb-folds"):
            corpus, folds = (RAVDESS, 6) if part == "ravdess-folds" else (EMODB, 5)
            entry = results.setdefault(part, {"folds": {}})
            if args.pooled:
                entry["pooled"] = train(args.work, f"{part}-pooled", corpus, "--fold", "all")
                save()
            for k in (args.folds or range(1, folds + 1)):
                entry["folds"][str(k)] = simulate(args.work, f"{part}-{k}", corpus, "--fold", str(k))
                save()
            summarize_folds(entry, folds)
        elif part == "combine":
            # Runs split over processes (--folds, --no-pooled, each its own --name) joined into this file.
            for name in args.combine.split(","):
                other = json.loads((RESULTS / f"{name}.json").read_text())
                for key in ("ravdess-folds", "emodb-folds"):
                    if key in other:
                        entry = results.setdefault(key, {"folds": {}})
                        entry["folds"].update(other[key]["folds"])
                        entry.setdefault("parts", []).append({"name": name, "commit": other.get("commit"),
                                                              "command": other.get("command")})
                        if "pooled" in other[key]:
                            entry["pooled"] = other[key]["pooled"]
            for key, folds in (("ravdess-folds", 6), ("emodb-folds", 5)):
                if key in results:
                    summarize_folds(results[key], folds)
        elif part == "ring8":
            synth = args.work / "synth"
            if not (synth / "folds.json").exists():
                import subprocess

                subprocess.run([sys.executable, "-m", "p2pser", "data", "synth", str(synth), "--speakers", "16"],
                               check=True, stdout=subprocess.DEVNULL)
            run = simulate(args.work, "ring8", synth, "--topology", str(TOPOLOGIES / "ring-8.toml"),
                           "--rounds", "20", "--max-seconds", "3")
            run["ratio_last_to_first"] = run["consensus_distance_last"] / run["consensus_distance_first"]
            run["ua_spread_points"] = round(100 * (run["ua_max"] - run["ua_min"]), 2)
            results["ring-8-synthetic"] = run
        else:
            raise SystemExit(f"unknown part {part!r}")
        save()
        print(part, "done", flush=True)


if __name__ == "__main__":
    main()
