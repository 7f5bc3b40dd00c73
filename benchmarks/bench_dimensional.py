"""Issue 16: emotion dimensions by regression, pooled and by gossip, on real speech; every figure into
benchmarks/results/dimensional.json with the commit, command and load.

Parts (``--parts``, comma list; each rewrites only its own entry):

- ``baved-choice``: the feature normaliser (speaker, global) and the regression loss (ccc, mse), chosen on
  validation speakers only: fold 1's training speakers, with fold 2's test speakers held out as validation
  (fold 1's test speakers are left out of the data altogether). The linear model, 40 epochs.
- ``baved-pooled``: BAVED arousal (activation level -1/0/+1), the 5 speaker-independent folds of
  ``baved/folds.json``, ``p2pser train --task dimensional`` for each model of ``--models`` with the chosen
  normaliser and loss; mean CCC over the folds. Target: the best model at 0.60 or more. ``--epochs`` and
  ``--pooled-folds`` shrink a heavy model's runs (the entry records both).
- ``baved-gossip``: folds ``--gossip-folds`` simulated with one peer per training speaker (the default
  speaker partition, exponential graph, the decentralized defaults) for ``--gossip-model``: the peers' mean
  CCC against the pooled model's on the same folds. Target: within 0.03. A fold whose run folder already
  holds a summary is read, not rerun (about 10 minutes a fold on the loaded 2-core machine).
- ``synth``: the built-in synthetic corpus (12 speakers, 4 folds), arousal and valence (and dominance), pooled
  and by gossip (``--synth-gossip-folds`` for a subset), ``--synth-model``.
- ``ravdess-multitask``: RAVDESS, categories alone (``--task categorical``) against categories plus arousal
  (``--task both``), its 6 folds, the same model and recipe. RAVDESS has no rated arousal: its intensity field
  (normal / strong) stands in as a proxy, -1 / +1. Target: UA not lower with the multi-task.
  ``--multitask-seed`` runs both arms again with another seed (its own entry).

A model is named with its features, ``model:features`` (``mlp:egemaps``); a bare name takes its features
from ``FEATURES``, and every entry records them. Results are keyed by that name (``svm``, ``mlp``, or
``mlp:egemaps`` when the features differ from ``FEATURES``).

    python benchmarks/bench_dimensional.py --parts baved-choice,baved-pooled,baved-gossip,synth,ravdess-multitask
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from bench_common import DATA, RESULTS, provenance, write_results
from bench_simulate import run_timed

BAVED, RAVDESS = DATA / "baved", DATA / "ravdess"
NAME = "dimensional"
# BAVED holds isolated words of 0.8-5.1 s: 3 s keeps nearly all of every word and saves the CNNs a quarter.
BAVED_OPTIONS = ["--max-seconds", "3"]
DIMS = ("arousal", "valence", "dominance")
PEER_FIELDS = ("ccc_mean", "ccc_min", "ccc_max", "ccc_average_model", "ua_mean", "ua_min", "ua_average_model",
               *(f"ccc_{d}_mean" for d in DIMS), *(f"ccc_{d}_average_model" for d in DIMS), "peers", "rounds",
               "consensus_distance_first", "consensus_distance_last")
# Each model's features when a name comes without them: the linear model and the CNNs on MFCC frames (the
# svm figures were measured on MFCC, the default features then), the MLP on ComParE functionals (the
# default model and features now).
FEATURES = {"svm": "mfcc", "mlp": "compare", "cnn1d-shallow": "mfcc", "cnn1d": "mfcc", "cnn2d": "mfcc",
            "crnn": "mfcc"}
FOLD_FIELDS = ("fold", "ua", "ccc", *(f"ccc_{d}" for d in DIMS), *(f"pearson_{d}" for d in DIMS),
               *(f"mae_{d}" for d in DIMS), "n_test", "train_s")


def model_options(spec: str) -> tuple[str, list[str]]:
    """``model[:features]`` -> (results key, ``--model M --features F``)."""
    model, _, features = spec.partition(":")
    features = features or FEATURES[model]
    key = model if features == FEATURES[model] else f"{model}:{features}"
    return key, ["--model", model, "--features", features]


def train(work: Path, name: str, corpus: Path, *options: str) -> dict:
    out = work / name
    # --augment none: every figure here was measured without the speed copies that `p2pser train` makes by
    # default since issue 14's second pass, and the peers it is compared with make none either.
    timed = run_timed(["train", str(corpus), *options, "--augment", "none", "--no-progress", "--workers", "1", "--cache-dir",
                       str(work / "cache"), "--out", str(out)], work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    means = {k: summary[k] for k in ("ua", "ccc", *(f"ccc_{d}" for d in DIMS)) if k in summary}
    return timed | means | {"per_fold": [{k: f[k] for k in FOLD_FIELDS if k in f} for f in summary["per_fold"]]}


def simulate(work: Path, name: str, corpus: Path, *options: str, reuse: bool = False) -> dict:
    out = work / name
    if reuse and (out / "summary.json").exists():
        if (work / f"{name}.json").exists():
            return json.loads((work / f"{name}.json").read_text())
        summary = json.loads((out / "summary.json").read_text())  # a run of an earlier invocation, untimed
        return {"run_folder": str(out), "simulate_wall_s": summary["wall_s"]} | {
            k: summary[k] for k in PEER_FIELDS if summary.get(k) is not None}
    timed = run_timed(["simulate", str(corpus), *options, "--cache-dir", str(work / "cache"), "--out", str(out)],
                      work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    result = timed | {k: summary[k] for k in PEER_FIELDS if summary.get(k) is not None}
    (work / f"{name}.json").write_text(json.dumps(result))
    return result


def baved_folds() -> list[list[str]]:
    return [f["test_speakers"] for f in json.loads((BAVED / "folds.json").read_text())["folds"]]


def baved_choice(work: Path, results: dict, spec: str) -> None:
    """The choice for ``spec``; the other parts use the svm's (``baved-choice``), another model's is a check
    written beside it (``baved-choice-MODEL``)."""
    key, options = model_options(spec)
    folds = baved_folds()
    # Fold 1's training speakers only: a manifest without its test speakers, fold 2's speakers as validation.
    manifest = work / "baved-fold1-train" / "manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with (BAVED / "MANIFEST.tsv").open(newline="") as fh, manifest.open("w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("file", "speaker", "sex", "arousal[-1:1]"))
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["speaker"] not in folds[0]:
                writer.writerow((BAVED / row["file"], row["speaker"], row["sex"], row["arousal"]))
    runs = {}
    prefix = "choice-" if key == "svm" else f"choice-{key.replace(':', '-')}-"
    for normalizer in ("speaker", "global"):
        for loss in ("ccc", "mse"):
            runs[f"{normalizer}-{loss}"] = train(
                work, f"{prefix}{normalizer}-{loss}", manifest.parent, "--test-speakers", ",".join(folds[1]),
                "--task", "dimensional", *options, "--normalizer", normalizer, "--regression-loss", loss,
                *BAVED_OPTIONS)
    best = max(runs, key=lambda k: runs[k]["ccc"])
    normalizer, loss = best.split("-")
    results["baved-choice" if key == "svm" else f"baved-choice-{key}"] = {
        "model": key, "features": options[-1], "provenance": provenance(sys.argv),
        "validation": "fold 1's training speakers; fold 2's test speakers held out as validation speakers",
        "validation_ccc": {k: round(v["ccc"], 4) for k, v in runs.items()}, "runs": runs,
        "chosen": {"normalizer": normalizer, "regression_loss": loss},
    }


def chosen(results: dict) -> list[str]:
    if "baved-choice" not in results:
        raise SystemExit("run --parts baved-choice first: the pooled and gossip runs use its choice")
    choice = results["baved-choice"]["chosen"]
    return ["--normalizer", choice["normalizer"], "--regression-loss", choice["regression_loss"]]


def baved_pooled(work: Path, results: dict, models: list[str], epochs: int | None, folds: str) -> None:
    entry = results.setdefault("baved-pooled", {"models": {}})
    shrink = ["--epochs", str(epochs)] if epochs else []
    for spec in models:
        key, options = model_options(spec)
        run = train(work, f"baved-{key.replace(':', '-')}", BAVED, "--fold", folds, "--task", "dimensional",
                    *options, *shrink, *chosen(results), *BAVED_OPTIONS)
        entry["models"][key] = run | {"features": options[-1], "epochs": epochs or "the model's recipe",
                                      "folds": folds, "provenance": provenance(sys.argv)}
        results["baved-pooled"] = _best(entry)
        write_results(NAME, results)  # after every model: a long part keeps what it has measured


def _best(entry: dict) -> dict:
    # Only models measured on all 5 folds compete for the target (fewer folds are a different mean).
    ranked = sorted(entry["models"], key=lambda m: (entry["models"][m]["folds"] == "all", entry["models"][m]["ccc"]),
                    reverse=True)
    best = ranked[0]
    return entry | {"mean_ccc": {m: round(entry["models"][m]["ccc"], 4) for m in ranked}, "best_model": best,
                    "target": 0.60, "met": entry["models"][best]["ccc"] >= 0.60}


def baved_gossip(work: Path, results: dict, spec: str, numbers: list[int]) -> None:
    key, options = model_options(spec)
    pooled = results.get("baved-pooled", {}).get("models", {}).get(key)
    if pooled is None:
        raise SystemExit(f"run --parts baved-pooled with {key} first: gossip is compared with its folds")
    pooled_folds = {f["fold"]: f["ccc"] for f in pooled["per_fold"]}
    entry_key = "baved-gossip" if key == "svm" else f"baved-gossip-{key}"
    # Folds measured by an earlier invocation are kept: a fold costs about 10 minutes here.
    done = {f["fold"]: f for f in results.get(entry_key, {}).get("folds", [])}
    for k in numbers:
        run = simulate(work, f"baved-gossip-{key.replace(':', '-')}-fold{k}", BAVED, "--fold", str(k), "--task",
                       "dimensional", *options, "--workers", "1", *chosen(results), *BAVED_OPTIONS, reuse=True)
        # A fold read back from an earlier invocation keeps that invocation's provenance (its commit and load).
        kept = done.get(k, {}).get("provenance") if k in done else None
        done[k] = {"fold": k, **run, "pooled_ccc": pooled_folds[k], "provenance": kept or provenance(sys.argv)}
    folds = [done[k] for k in sorted(done)]
    mean = float(np.mean([f["ccc_mean"] for f in folds]))
    same_folds = float(np.mean([f["pooled_ccc"] for f in folds]))
    results[entry_key] = {
        "model": key, "features": options[-1], "folds": folds, "mean_peer_ccc": round(mean, 4),
        "mean_average_model_ccc": round(float(np.mean([f["ccc_average_model"] for f in folds])), 4),
        "pooled_ccc_same_folds": round(same_folds, 4), "gap": round(same_folds - mean, 4), "target_gap": 0.03,
        "met": same_folds - mean <= 0.03,
    }


def synth(work: Path, results: dict, spec: str, gossip_folds: str) -> None:
    key, options = model_options(spec)
    corpus = work / "synth"
    if not (corpus / "manifest.csv").exists():
        run_timed(["data", "synth", str(corpus), "--speakers", "12", "--per-emotion", "10", "--seed", "0"],
                  work / "synth-data.log")
    name = "" if key == "svm" else f"-{key.replace(':', '-')}"
    pooled = train(work, f"synth{name}-pooled", corpus, "--fold", "all", "--task", "dimensional", *options,
                   "--normalizer", "global")
    numbers = range(1, len(pooled["per_fold"]) + 1) if gossip_folds == "all" else map(int, gossip_folds.split(","))
    folds = []
    for k in numbers:
        folds.append({"fold": k, **simulate(work, f"synth{name}-gossip-fold{k}", corpus, "--fold", str(k),
                                            "--task", "dimensional", *options, "--workers", "1",
                                            "--normalizer", "global")})
    gossip = {field: round(float(np.mean([f[field] for f in folds])), 4)
              for field in ("ccc_mean", *(f"ccc_{d}_mean" for d in DIMS), "ccc_average_model")}
    same = [pooled["per_fold"][f["fold"] - 1] for f in folds]
    pooled_same = {field: round(float(np.mean([f[field] for f in same])), 4)
                   for field in ("ccc", *(f"ccc_{d}" for d in DIMS))}
    results[f"synth{name}"] = {"corpus": "p2pser data synth --speakers 12 --per-emotion 10 --seed 0 (4 folds)",
                               "model": key, "features": options[-1], "normalizer": "global", "pooled": pooled,
                               "gossip_folds": folds, "gossip_means": gossip,
                               "pooled_means_gossip_folds": pooled_same, "provenance": provenance(sys.argv)}


def ravdess_multitask(work: Path, results: dict, spec: str, folds: str, seed: int | None) -> None:
    # A manifest over the shared files (no audio copied) with the intensity field as an arousal proxy.
    from p2pser.audio.corpora import RAVDESS_RE, load_corpus

    folder = work / "ravdess-intensity"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("file", "speaker", "emotion", "sex", "arousal[-1:1]"))
        for u in load_corpus(RAVDESS).utterances:
            intensity = int(RAVDESS_RE.fullmatch(u.path.stem).group(4))  # 01 normal, 02 strong
            writer.writerow((u.path, u.speaker, u.emotion, u.sex, -1 if intensity == 1 else 1))
    key, model = model_options(spec)
    options = ["--fold", folds, "--folds", str(RAVDESS / "folds.json"), *model]
    if seed is not None:  # another seed of both arms: the same folds, other initial weights and shuffles
        options += ["--seed", str(seed)]
        key += f"-seed{seed}"
    name = key.replace(":", "-")
    categorical = train(work, f"ravdess-{name}-categorical", folder, *options, "--task", "categorical")
    both = train(work, f"ravdess-{name}-both", folder, *options, "--task", "both")
    per_fold = [round(100 * (b["ua"] - c["ua"]), 2) for c, b in zip(categorical["per_fold"], both["per_fold"])]
    results[f"ravdess-multitask-{key}"] = {
        "model": model[1], "features": model[-1], "folds": folds, "seed": seed, "provenance": provenance(sys.argv),
        "ua_difference_points_per_fold": per_fold,
        "arousal_proxy": "RAVDESS intensity field: normal -1, strong +1 (not a rated arousal)",
        "categorical": categorical, "both": both,
        "ua_categorical": round(categorical["ua"], 4), "ua_both": round(both["ua"], 4),
        "ccc_arousal_proxy_both": round(both["ccc"], 4),
        "ua_difference_points": round(100 * (both["ua"] - categorical["ua"]), 2),
        "met": both["ua"] >= categorical["ua"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="baved-choice,baved-pooled,baved-gossip,synth,ravdess-multitask")
    parser.add_argument("--models", default="mlp,svm,cnn1d-shallow,cnn1d,cnn2d,crnn", help="baved-pooled models")
    parser.add_argument("--epochs", type=int, help="baved-pooled: epochs instead of each model's recipe")
    parser.add_argument("--pooled-folds", default="all", help="baved-pooled folds (comma list or all)")
    parser.add_argument("--gossip-model", default="svm", help="baved-gossip model")
    parser.add_argument("--gossip-folds", default="1,2,3,4,5", help="baved-gossip folds")
    parser.add_argument("--multitask-model", default="svm", help="ravdess-multitask model")
    parser.add_argument("--multitask-folds", default="all", help="ravdess-multitask folds (comma list or all)")
    parser.add_argument("--multitask-seed", type=int, help="ravdess-multitask: this seed instead of train's default")
    parser.add_argument("--synth-model", default="svm", help="synth model")
    parser.add_argument("--choice-model", default="svm", help="baved-choice model (svm: the choice the parts use)")
    parser.add_argument("--synth-gossip-folds", default="all", help="synth: folds simulated (comma list or all)")
    parser.add_argument("--work", default="/tmp/p2pser-bench-dimensional", help="run folders and feature cache")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for part in args.parts.split(","):
        if part == "baved-choice":
            baved_choice(work, results, args.choice_model)
        elif part == "baved-pooled":
            baved_pooled(work, results, args.models.split(","), args.epochs, args.pooled_folds)
        elif part == "baved-gossip":
            baved_gossip(work, results, args.gossip_model, [int(k) for k in args.gossip_folds.split(",")])
        elif part == "synth":
            synth(work, results, args.synth_model, args.synth_gossip_folds)
        elif part == "ravdess-multitask":
            ravdess_multitask(work, results, args.multitask_model, args.multitask_folds, args.multitask_seed)
        else:
            raise SystemExit(f"unknown part {part!r}")
        write_results(NAME, results)  # each entry carries its own provenance
        print(f"{part}: done", flush=True)


if __name__ == "__main__":
    main()
