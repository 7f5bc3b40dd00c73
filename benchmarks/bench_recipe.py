"""Choosing the decentralized recipe on validation speakers, never on a fold's test speakers (issue 11).

The tuning task is RAVDESS without fold 1's four test actors: those actors' files are left out of the corpus
altogether (a manifest in ``--work`` lists the other 20 actors' files where they lie), fold 2's four test
actors are the validation speakers, and the remaining 16 actors are 16 peers (one actor each) on an
exponential graph. Each arm is one ``p2pser simulate`` of that task; the arm with the best mean peer UA on the
validation actors wins and becomes the default of ``peer``, ``launch`` and ``simulate``; fold 1's test
actors are only ever used by bench_gossip.py, after the choice.

    python benchmarks/bench_recipe.py --arms defaults,reset,sgd,qgm,kgt,rounds60x4,lr5e-3 [--seeds 0]

Writes benchmarks/results/recipe.json (one entry per arm and seed, with its command and load average).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench_common import DATA, RESULTS, provenance, write_results
from bench_simulate import run_timed

# Every arm starts from these (the candidate defaults) and changes what its entry says.
BASE = ["--model", "cnn1d-shallow", "--features", "mfcc", "--normalizer", "speaker", "--eval-every", "10",
        "--topology", "exponential"]
ARMS: dict[str, list[str]] = {
    "defaults": [],
    "reset": ["--optimizer-state", "reset"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.05"],
    "qgm": ["--optimizer-state", "quasi-global", "--lr", "0.05"],
    "kgt": ["--algorithm", "kgt"],
    "rounds60x4": ["--rounds", "60", "--local-steps", "4"],
    "rounds60x8": ["--rounds", "60"],
    "lr5e-3": ["--lr", "0.005"],
    "final-mixing": ["--final-mixing", "10"],
    "rounds60x8-fm10": ["--rounds", "60", "--final-mixing", "10"],
    "rounds60x8-fm10-lr5e-3": ["--rounds", "60", "--final-mixing", "10", "--lr", "0.005"],
    "rounds120x8-fm10": ["--rounds", "120", "--final-mixing", "10"],
}
POOLED = "pooled"  # the reference on the same task: `p2pser train` with its defaults


def tuning_corpus(work: Path) -> Path:
    """A manifest of RAVDESS without fold 1's test actors and a folds file whose one fold tests on fold 2's
    actors: the validation task. The audio stays where it is."""
    folds = json.loads((DATA / "ravdess" / "folds.json").read_text())
    excluded = set(folds["folds"][0]["test_speakers"])
    validation = folds["folds"][1]["test_speakers"]
    out = work / "ravdess-tuning"
    out.mkdir(parents=True, exist_ok=True)
    with open(DATA / "ravdess" / "MANIFEST.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["speaker"] not in excluded]
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "speaker", "emotion", "sex"])
        for r in rows:
            writer.writerow([str((DATA / "ravdess" / r["file"]).resolve()), r["speaker"], r["emotion"], r["sex"]])
    (out / "folds.json").write_text(json.dumps({
        "name": "ravdess-tuning", "classes": folds["classes"],
        "about": f"RAVDESS without fold 1's test actors {sorted(excluded)}; validation on fold 2's test actors",
        "folds": [{"test_speakers": validation}]}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recipe-work"))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--extra", default="", help="options added to every arm (e.g. '--rounds 40')")
    parser.add_argument("--name", default="recipe", help="results file name (parallel runs write apart)")
    args = parser.parse_args()
    corpus = tuning_corpus(args.work)
    out = RESULTS / f"{args.name}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("arms", {})
    results["protocol"] = ("RAVDESS minus fold 1's test actors; validation = fold 2's test actors; 16 peers, "
                           "one actor each, exponential graph; score = mean peer UA on the validation actors")
    results["base_options"] = " ".join(BASE)
    for arm in args.arms.split(","):
        for seed in args.seeds.split(","):
            run = args.work / f"{arm}-seed{seed}"
            if arm == POOLED:
                cmd = ["train", str(corpus), "--seed", seed, "--no-progress", "--cache-dir", str(args.work / "cache"),
                       "--out", str(run)]
            else:
                cmd = ["simulate", str(corpus), *BASE, *ARMS[arm], *args.extra.split(), "--seed", seed,
                       "--cache-dir", str(args.work / "cache"), "--out", str(run)]
            timed = run_timed(cmd, args.work / f"{arm}-seed{seed}.log")
            summary = json.loads((run / "summary.json").read_text())
            keys = ("ua",) if arm == POOLED else ("ua_mean", "ua_min", "ua_average_model", "consensus_distance_last",
                                                 "bytes_sent_max_peer", "rounds", "ua_mean_per_round")
            results["arms"].setdefault(arm, {})[seed] = timed | {"commit": provenance(sys.argv)["commit"]} | {
                k: summary.get(k) for k in keys}
            print(arm, seed, summary.get("ua_mean", summary.get("ua")), flush=True)
            write_results(args.name, results | provenance(sys.argv))


if __name__ == "__main__":
    main()
