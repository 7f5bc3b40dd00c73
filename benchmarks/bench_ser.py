"""Issue 14: the openSMILE feature kinds, pitch, and the mlp and xgb models, on the real corpora.

Parts (each writes its own results file, ``benchmarks/results/ser-<part>[-<name>].json``):

``matrix``  every model x feature kind on fold 1 of a corpus (``--corpus``): test UA, validation UA (15% of
            the training speakers' utterances held out, class-stratified; the epoch or number of trees is
            chosen on it) and training seconds. Frame-level models (cnn*, crnn) need frames, so they run on
            the frame-level kinds only. The default model and features are chosen from these files by the
            mean *validation* UA over the corpora, never by test UA.
``folds``   one model x features on every fold of a corpus (the targets: RAVDESS 6-fold, EmoDB 5-fold).
``gossip``  xgb by gossip in the simulator (8 peers, one per training speaker of EmoDB fold 1, exponential
            graph; ``--boosting own``, ``cyclic`` or ``histogram``) beside the pooled xgb of the same run;
            bytes per peer, wall and CPU seconds.
``histogram-rule``  ``--boosting histogram`` against pooled xgb on validation speakers (never test ones).
``bagging-rule``  how a peer combines ensembles and how many trees it boosts, chosen on validation data.
``speed``   extraction speed of each feature kind on EmoDB: seconds of audio per CPU-second cold (a fresh
            cache, one process) and utterances per second warm.
``validate`` validation UA on held-out *speakers* of a fold's training speakers (never its test speakers):
            the training speakers are dealt into ``--inner`` groups, each in turn held out while the model
            trains on the others (all epochs, no early stopping, as ``p2pser train`` runs). A case is
            ``model:features:augment[:copies][:key=value/key=value]`` (recipe overrides); results accumulate
            in ``ser-validate-<corpus>-fold<K>.json``. Augmentation and recipe choices are made here.

    python benchmarks/bench_ser.py matrix --corpus emodb
    python benchmarks/bench_ser.py folds --corpus ravdess --model mlp --features egemaps
    python benchmarks/bench_ser.py gossip
    python benchmarks/bench_ser.py gossip --boosting histogram --rounds 1604 --final-mixing 1
    python benchmarks/bench_ser.py histogram-rule --seeds 2
    python benchmarks/bench_ser.py speed
    python benchmarks/bench_ser.py validate --corpus emodb --cases mlp:compare:none,mlp:compare:speed:2
    python benchmarks/bench_ser.py table     # the matrix files as markdown tables
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bench_common import DATA, RESULTS, provenance, write_results

from p2pser.config import ENSEMBLE_MODELS
from p2pser.experiments.centralized import Pooled, parse_folds, prepare_pooled, train_experiment
from p2pser.features.extract import extract_features
from p2pser.features.spec import FeatureSpec
from p2pser.learn.models import MODEL_NAMES
from p2pser.learn.trainer import recommended_config
from p2pser.partition.experiment import rows
from p2pser.partition.folds import Split
from p2pser.runtime import ensure_numba_cache, pin_threads

UTTERANCE_KINDS = ("egemaps", "compare")
FRAME_KINDS = ("mfcc", "mfcc+pitch", "egemaps-lld", "compare-lld", "logmel")
VECTOR_MODELS = ("svm", "mlp", "xgb")  # work on one vector per utterance as well as on frames
VAL_FRACTION = 0.15


def _case(pooled, model: str, kind: str, folds: list[int], tmp: Path, seed: int,
          val_fraction: float = VAL_FRACTION) -> dict:
    load = os.getloadavg()[0]
    summary = train_experiment(pooled, folds, model, recommended_config(model), seed=seed,
                               out_dir=tmp / f"{model}-{kind}", val_fraction=val_fraction, progress=False)
    per_fold = []
    for r, fold in zip(summary["per_fold"], folds):
        metrics = json.loads((tmp / f"{model}-{kind}" / f"fold-{fold}" / "metrics.json").read_text())
        history = [h.get("val_ua") for h in metrics["history"] if h.get("val_ua") is not None]
        per_fold.append({"fold": fold, "ua": round(r["ua"], 4), "wa": round(r["wa"], 4),
                         "val_ua": round(max(history), 4) if history else None, "train_s": r["train_s"],
                         "epochs_or_trees": r["epoch"]})
    return {"model": model, "features": kind, "ua": round(summary["ua"], 4), "params": summary["params"],
            "val_ua": round(sum(f["val_ua"] or 0 for f in per_fold) / len(per_fold), 4),
            "train_s_per_fold": round(sum(f["train_s"] for f in per_fold) / len(per_fold), 1),
            "per_fold": per_fold, "load_avg_at_start": round(load, 1)}


def matrix(args) -> None:
    cases = [(m, k) for k in UTTERANCE_KINDS for m in VECTOR_MODELS]
    cases += [(m, k) for k in FRAME_KINDS for m in MODEL_NAMES + ENSEMBLE_MODELS]
    wanted = set(args.models.split(",")) if args.models else None
    kinds = set(args.kinds.split(",")) if args.kinds else None
    cases = [(m, k) for m, k in cases if (wanted is None or m in wanted) and (kinds is None or k in kinds)]
    name = f"ser-matrix-{args.corpus}"
    path = Path(__file__).parent / "results" / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"cases": []}
    results |= {"corpus": args.corpus, "fold": 1, "val_fraction": VAL_FRACTION, "seed": args.seed}
    done = {(c["model"], c["features"]) for c in results["cases"]}
    with tempfile.TemporaryDirectory(prefix="bench-ser-") as tmp:
        for kind in dict.fromkeys(k for _, k in cases):
            pooled = prepare_pooled(DATA / args.corpus, FeatureSpec(kind=kind), progress=False)
            for model, _ in [c for c in cases if c[1] == kind and c not in done]:
                case = _case(pooled, model, kind, [1], Path(tmp), args.seed)
                results["cases"] = [c for c in results["cases"] if (c["model"], c["features"]) != (model, kind)]
                results["cases"].append(case)
                print(json.dumps({k: case[k] for k in ("model", "features", "ua", "val_ua", "train_s_per_fold")}),
                      flush=True)
                write_results(name, results | provenance(sys.argv))


def folds(args) -> None:
    """``--val-fraction 0`` trains as ``p2pser train`` does by default (every epoch, the last kept);
    ``--augment`` adds the perturbed copies of each fold's training utterances."""
    from p2pser.features.augment import perturbations

    tokens = perturbations(args.augment, args.copies)
    with tempfile.TemporaryDirectory(prefix="bench-ser-") as tmp:
        pooled = prepare_pooled(DATA / args.corpus, FeatureSpec(kind=args.features), progress=False, augment=tokens)
        numbers = parse_folds(args.folds, len(pooled.experiment.folds))
        case = _case(pooled, args.model, args.features, numbers, Path(tmp), args.seed, args.val_fraction)
    print(json.dumps(case, indent=1))
    suffix = (f"-{args.augment.replace(',', '+')}{args.copies}" if tokens else "") \
        + ("-all-epochs" if args.val_fraction == 0 else "") + (f"-folds{args.folds}" if args.folds != "all" else "")
    write_results(f"ser-folds-{args.corpus}-{args.model}-{args.features}{suffix}",
                  {"corpus": args.corpus, "val_fraction": args.val_fraction, "seed": args.seed, "augment": tokens,
                   **case} | provenance(sys.argv))


def peers_augment(args) -> None:
    """``simulate`` with every default (mlp on compare, one peer per training speaker, dpsgd) and each peer
    perturbing its own audio (``--augment``), on one fold; the run without is issue 11's
    (``gossip-folds.json``)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-ser-") as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "p2pser", "simulate", str(DATA / args.corpus), "--fold", str(args.fold),
               "--augment", args.augment, "--augment-copies", str(args.copies), "--out", str(run)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        summary = json.loads((run / "summary.json").read_text())
    results = {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - start, 1),
               "load_avg_at_start": round(load, 1), "ua_mean": round(summary["ua_mean"], 4),
               "ua_min": round(summary["ua_min"], 4), "ua_average_model": summary.get("ua_average_model"),
               "peers": summary["peers"], "bytes_sent_max_peer": summary["bytes_sent_max_peer"]}
    print(json.dumps(results, indent=1))
    write_results(f"ser-peers-{args.corpus}-fold{args.fold}-{args.augment}{args.copies}", results | provenance(sys.argv))


def join(args) -> None:
    """Join ``folds`` runs made one fold at a time (``--folds K``, separate processes) into the file a run
    of every fold would have written; each part's file, commit and command are kept under ``parts``."""
    from p2pser.features.augment import perturbations

    tokens = perturbations(args.augment, args.copies)
    stem = f"ser-folds-{args.corpus}-{args.model}-{args.features}" \
        + (f"-{args.augment.replace(',', '+')}{args.copies}" if tokens else "") \
        + ("-all-epochs" if args.val_fraction == 0 else "")
    parts = sorted(RESULTS.glob(f"{stem}-folds*.json"))
    docs = [json.loads(p.read_text()) for p in parts]
    per_fold = sorted((f for d in docs for f in d["per_fold"]), key=lambda f: f["fold"])
    joined = {"corpus": args.corpus, "val_fraction": args.val_fraction, "augment": tokens, "model": args.model,
              "features": args.features, "ua": round(float(np.mean([f["ua"] for f in per_fold])), 4),
              "folds": [f["fold"] for f in per_fold], "per_fold": per_fold,
              "train_s_per_fold": round(float(np.mean([f["train_s"] for f in per_fold])), 1),
              "parts": [{"file": p.name, "commit": d["commit"], "command": d["command"], "date": d["date"],
                         "load_avg_at_start": d["load_avg_at_start"]} for p, d in zip(parts, docs)]}
    print(json.dumps({k: joined[k] for k in ("ua", "folds")}))
    write_results(stem, joined | provenance(sys.argv))


def gossip(args) -> None:
    """``--boosting histogram`` grows one ensemble level by level: ``--rounds`` must cover the diameter (2)
    times (1 + iterations x depth) steps; ``--local-steps`` does not apply to it. ``--eval-every`` thins the
    evaluated rounds; the per-round UA kept in the file is thinned to at most ~100 points. ``--seeds`` n
    runs seeds 0 .. n-1 (peers and pooled model alike) and adds their means; ``--val-fraction`` is the
    share of its data each peer holds back for validation (the pooled model trains on all)."""
    runs = [_gossip_run(args, seed) for seed in range(args.seeds)]
    results = runs[0]
    if args.seeds > 1:
        keys = ("ua_mean", "pooled_xgb_ua", "gap_points", "bytes_sent_mean_per_peer", "wall_s", "cpu_s")
        results = results | {
            "per_seed": [{"seed": s, **{k: r[k] for k in (*keys, "test_recall_per_class")}}
                         for s, r in enumerate(runs)],
            **{f"{k}_over_seeds": round(float(np.mean([r[k] for r in runs])), 4) for k in keys[:3]}}
    print(json.dumps({k: v for k, v in results.items() if k != "peers"}, indent=1))
    suffix = "" if args.boosting == "own" else f"-{args.boosting}"
    suffix += "" if args.val_fraction == VAL_FRACTION else f"-val{args.val_fraction:g}"
    suffix += "" if args.seeds == 1 else f"-seeds{args.seeds}"
    write_results(f"ser-gossip-{args.features}{suffix}", results | provenance(sys.argv))


def _gossip_run(args, seed: int) -> dict:
    import resource
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-ser-") as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "p2pser", "simulate", str(DATA / "emodb"), "--fold", "1", "--peers", "8",
               "--model", "xgb", "--algorithm", "bagging", "--features", args.features,
               "--rounds", str(args.rounds), "--local-steps", str(args.trees),
               "--final-mixing", str(args.final_mixing), "--eval-every", str(args.eval_every),
               "--boosting", args.boosting, "--baseline", "centralized", "--out", str(run)]
        cmd += ([] if args.val_fraction == VAL_FRACTION else ["--val-fraction", f"{args.val_fraction:g}"])
        cmd += ([] if seed == 0 else ["--seed", str(seed)])
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = json.loads((run / "summary.json").read_text())
        pooled_recall = json.loads((run / "baseline-centralized" / "fold-1" / "metrics.json").read_text())["recall"]
        recall = _histogram_recall(run / "peer-000" / "histboost.npz", args.features)
        peers = []
        for k in range(8):
            rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
            scored = [r for r in rows if "test_ua" in r]
            every = max(1, len(scored) // 100)
            peers.append({"peer": k, "test_ua": round(rows[-1]["test_ua"], 4), "bag_size": rows[-1]["bag_size"],
                          "bytes_sent": rows[-1]["bytes_sent"], "bytes_received": rows[-1]["bytes_received"],
                          "rejected": rows[-1]["rejected"],
                          **({"boosting_iterations": rows[-1]["boosting_iterations"]}
                             if "boosting_iterations" in rows[-1] else {}),
                          "ua_per_round": {r["round"]: round(r["test_ua"], 4) for r in scored[::every]}
                          | {scored[-1]["round"]: round(scored[-1]["test_ua"], 4)}})
    results = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
               "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
               "load_avg_at_start": round(load, 1), "load_avg_at_end": round(os.getloadavg()[0], 1),
               "ua_mean": round(summary["ua_mean"], 4), "ua_min": round(summary["ua_min"], 4),
               "ua_max": round(summary["ua_max"], 4),
               "pooled_xgb_ua": round(summary["baseline_centralized_ua"], 4),
               "gap_points": round(100 * (summary["baseline_centralized_ua"] - summary["ua_mean"]), 2),
               "bytes_sent_mean_per_peer": round(sum(p["bytes_sent"] for p in peers) / len(peers)),
               "bytes_sent_max_peer": summary["bytes_sent_max_peer"],
               "test_recall_per_class": {"pooled_xgb": pooled_recall, **({"peer_0": recall} if recall else {})},
               "peers": peers}
    print(json.dumps({k: v for k, v in results.items() if k != "peers"}), flush=True)
    return results


def _histogram_recall(path: Path, features: str) -> dict | None:
    """Per-class test recall of the ensemble a ``--boosting histogram`` peer saved (``histboost.npz``), on
    EmoDB fold 1's test speakers standardised as the run does (each by its own statistics); None for
    another mode. Its UA must equal the peer's reported one."""
    if not path.exists():
        return None
    from p2pser.features.normalize import standardize_by_speaker
    from p2pser.learn import trees
    from p2pser.learn.histboost import margins
    from p2pser.learn.metrics import classification_report

    pooled = prepare_pooled(DATA / "emodb", FeatureSpec(kind=features), progress=False)
    fs, test = pooled.features, pooled.split(1).test
    v = trees.utterance_vectors(standardize_by_speaker(fs.x[test], fs.lengths[test], fs.speakers[test]))
    with np.load(path, allow_pickle=False) as model:
        m = margins(model, v, int(model["n_classes"]), int(model["max_depth"]), len(model["roots"]))
    report = classification_report(pooled.y[test], m.argmax(1), pooled.classes)
    counts = np.bincount(pooled.y[test], minlength=len(pooled.classes))
    return {"ua": round(report["ua"], 4), "recall": report["recall"],
            "test_utterances": dict(zip(pooled.classes, counts.tolist()))}


def bagging_rule(args) -> None:
    """How a peer should combine ensembles, chosen on validation data only: one xgb per training speaker of
    EmoDB fold 1 (as 8 peers hold them), combined by the sample-weighted mean of probabilities, of margins
    or of log-probabilities, for 50 and 200 boosting rounds, scored on 15% of the training speakers'
    utterances held out (two hold-out seeds)."""
    import xgboost as xgb

    from p2pser.features.normalize import standardize_by_speaker
    from p2pser.learn import trees
    from p2pser.learn.metrics import classification_report

    pooled = prepare_pooled(DATA / "emodb", FeatureSpec(kind=args.features), progress=False)
    fs = pooled.features
    rows = []
    for n_trees in (50, 200):
        scores: dict[str, list[float]] = {}
        for seed in (0, 1):
            split = pooled.split(1, val_fraction=VAL_FRACTION, seed=seed)
            own = np.concatenate([split.train, split.val])
            x = np.zeros_like(fs.x)
            x[own] = standardize_by_speaker(fs.x[own], fs.lengths[own], fs.speakers[own])
            v = trees.utterance_vectors(x)
            models = []
            for speaker in sorted(set(fs.speakers[split.train])):
                mine = split.train[fs.speakers[split.train] == speaker]
                models.append((len(mine), trees.boost(v[mine], fs.labels[mine], len(pooled.classes), n_trees,
                                                      seed=0)))
            data, total = xgb.DMatrix(v[split.val]), sum(n for n, _ in models)
            combined = {
                "probabilities": sum(n / total * m.predict(data) for n, m in models),
                "margins": sum(n / total * m.predict(data, output_margin=True) for n, m in models),
                "log_probabilities": sum(n / total * np.log(np.maximum(m.predict(data), 1e-9)) for n, m in models),
            }
            for rule, score in combined.items():
                ua = classification_report(fs.labels[split.val], score.argmax(1), pooled.classes)["ua"]
                scores.setdefault(rule, []).append(ua)
        rows.append({"trees": n_trees, **{rule: round(float(np.mean(v)), 4) for rule, v in scores.items()}})
        print(json.dumps(rows[-1]), flush=True)
    write_results(f"ser-bagging-rule-{args.features}", {"corpus": "emodb", "fold": 1, "val_fraction": VAL_FRACTION,
                                                         "validation_ua": rows} | provenance(sys.argv))


def _held_out_groups(args):
    """EmoDB under ``--features``: the pooled data, labels, speaker-standardised utterance vectors, and for
    each of ``--inner`` groups of the outer fold's training speakers (``validate``'s groups): the group, its
    rows (validation), the other training rows and those rows per speaker (one peer each)."""
    from p2pser.features.normalize import standardize_by_speaker
    from p2pser.learn import trees

    pooled = prepare_pooled(DATA / "emodb", FeatureSpec(kind=args.features), progress=False)
    fs, y = pooled.features, pooled.y
    train = rows(pooled.row_of, pooled.experiment.split(args.fold)[0])
    speakers = sorted(set(fs.speakers[train].tolist()))
    groups = [speakers[k :: args.inner] for k in range(args.inner)]
    v = trees.utterance_vectors(standardize_by_speaker(fs.x, fs.lengths, fs.speakers))
    splits = []
    for group in groups:
        held = np.isin(fs.speakers[train], group)
        val, fit = train[held], train[~held]
        splits.append((group, val, fit, [fit[fs.speakers[fit] == s] for s in sorted(set(fs.speakers[fit].tolist()))]))
    return pooled, y, v, splits


def cyclic_rule(args) -> None:
    """How peers should boost trees by gossip, chosen on held-out training speakers of EmoDB fold 1 (the
    ``validate`` groups; its test speakers are never used): one peer per remaining training speaker, and
    (a) ``bag``: each peer boosts its own ensemble, predictions average the peers' probabilities;
    (b) ``cyclic``: as many travelling ensembles as peers, in round r peer p adds k trees on its own data
    to ensemble (p - r) mod n and passes it to peer p + 1; predictions average the ensembles;
    (c) the pooled model of the same speakers, for reference. Validation UA on the held-out speakers."""
    from p2pser.learn import trees
    from p2pser.learn.metrics import classification_report
    from p2pser.learn.trees import XGB_TREES

    pooled, y, v, splits = _held_out_groups(args)
    groups = [group for group, *_ in splits]
    methods = ["pooled", "bag"] + [f"cyclic-{k}" for k in (5, 10, 25)] + [f"averaged-{k}" for k in args.averaged]
    if args.only_averaged:
        methods = [f"averaged-{k}" for k in args.averaged]
    scores: dict[str, list[float]] = {m: [] for m in methods}
    t0 = time.process_time()
    for _, val, fit, peers in splits:
        n, k_classes = len(peers), len(pooled.classes)

        def ua(probs: np.ndarray, truth: np.ndarray = y[val]) -> float:
            return classification_report(truth, probs.argmax(1), pooled.classes)["ua"]

        for k in args.averaged:
            scores[f"averaged-{k}"].append(ua(_averaged_boosting(v, y, peers, val, k_classes, k, args.seed)))
        if args.only_averaged:
            print(json.dumps({m: round(s[-1], 4) for m, s in scores.items()}), flush=True)
            continue
        model = trees.boost(v[fit], y[fit], k_classes, XGB_TREES, seed=args.seed)
        scores["pooled"].append(ua(trees.probabilities(model, v[val])))
        bag = [trees.boost(v[p], y[p], k_classes, 50, seed=args.seed + i) for i, p in enumerate(peers)]
        scores["bag"].append(ua(np.mean([trees.probabilities(m, v[val]) for m in bag], axis=0)))
        for k in (5, 10, 25):
            chains: list = [None] * n
            for r in range(XGB_TREES // k):
                for p in range(n):
                    c = (p - r) % n
                    chains[c] = trees.boost(v[peers[p]], y[peers[p]], k_classes, k, seed=args.seed + p,
                                            init=chains[c])
            scores[f"cyclic-{k}"].append(ua(np.mean([trees.probabilities(m, v[val]) for m in chains], axis=0)))
        print(json.dumps({m: round(s[-1], 4) for m, s in scores.items()}), flush=True)
    result = {m: {"val_ua": round(float(np.mean(s)), 4), "per_group": [round(x, 4) for x in s]}
              for m, s in scores.items()}
    print(json.dumps(result), flush=True)
    write_results(f"ser-cyclic-rule-{args.features}" + ("-averaged" if args.only_averaged else ""),
                  {"corpus": "emodb", "outer_fold": args.fold, "groups": groups, "methods": result,
                   "trees_per_ensemble": XGB_TREES, "cpu_s": round(time.process_time() - t0, 1),
                   "load_avg": round(os.getloadavg()[0], 1)} | provenance(sys.argv))


def _averaged_boosting(v, y, peers, val, n_classes: int, k: int, seed: int) -> np.ndarray:
    """Boosting by averaging: in every round each peer fits ``k`` trees on its own data from the margin of
    the shared model, and the model adds the mean of the peers' tree sets (functional gradient steps
    averaged over peers, as FedAvg averages weight updates). Returns validation probabilities."""
    import xgboost as xgb

    from p2pser.learn.trees import XGB_RECIPE, XGB_TREES, class_balanced_weights

    params = XGB_RECIPE | {"num_class": n_classes, "nthread": 1, "verbosity": 0}
    margin = {i: np.zeros((len(p), n_classes), np.float32) for i, p in enumerate(peers)}
    margin_val = np.zeros((len(val), n_classes), np.float32)
    zero_val = xgb.DMatrix(v[val], base_margin=np.zeros((len(val), n_classes)))
    for r in range(XGB_TREES // k):
        sets = []
        for i, p in enumerate(peers):
            data = xgb.DMatrix(v[p], label=y[p], weight=class_balanced_weights(y[p], n_classes),
                               base_margin=margin[i])
            sets.append(xgb.train(params | {"seed": seed + i + 1000 * r}, data, num_boost_round=k))
        for m in sets:
            for i, p in enumerate(peers):
                own = xgb.DMatrix(v[p], base_margin=np.zeros((len(p), n_classes)))
                margin[i] += m.predict(own, output_margin=True) / len(peers)
            margin_val += m.predict(zero_val, output_margin=True) / len(peers)
    e = np.exp(margin_val - margin_val.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def histogram_rule(args) -> None:
    """``--boosting histogram`` on the validation speakers of EmoDB fold 1 (the ``cyclic-rule`` groups; the
    fold's test speakers are never used): one peer per remaining training speaker growing one ensemble on
    summed histograms (``p2pser.learn.histboost``, the exchange emulated in one process: every peer gets
    every contribution each step), the same learner with one peer holding all their data (the pooled
    histogram boosting it equals up to row subsampling and bin edges), and pooled xgb, for ``--seeds``
    seeds each. Validation UA on the held-out speakers; the recipe is ``trees.XGB_RECIPE`` unchanged."""
    from p2pser.learn import trees
    from p2pser.learn.metrics import classification_report
    from p2pser.learn.trees import XGB_TREES

    pooled, y, v, splits = _held_out_groups(args)
    groups = [group for group, *_ in splits]
    methods = ("pooled-xgb", "histogram-1-peer", "histogram-peers")
    scores: dict[str, list[float]] = {m: [] for m in methods}
    t0 = time.process_time()
    for group, val, fit, peers in splits:
        k_classes = len(pooled.classes)
        def ua(probs: np.ndarray, truth: np.ndarray = y[val]) -> float:
            return classification_report(truth, probs.argmax(1), pooled.classes)["ua"]

        for seed in range(args.seeds):
            model = trees.boost(v[fit], y[fit], k_classes, XGB_TREES, seed=seed)
            scores["pooled-xgb"].append(ua(trees.probabilities(model, v[val])))
            scores["histogram-1-peer"].append(ua(_histogram_boosting(v, y, [fit], val, pooled.classes, seed)))
            scores["histogram-peers"].append(ua(_histogram_boosting(v, y, peers, val, pooled.classes, seed)))
            print(json.dumps({"group": group, "seed": seed} | {m: round(s[-1], 4) for m, s in scores.items()}),
                  flush=True)
    result = {m: {"val_ua": round(float(np.mean(s)), 4), "per_group_and_seed": [round(x, 4) for x in s]}
              for m, s in scores.items()}
    print(json.dumps({m: r["val_ua"] for m, r in result.items()}), flush=True)
    write_results(f"ser-histogram-rule-{args.features}",
                  {"corpus": "emodb", "outer_fold": args.fold, "groups": groups, "seeds": args.seeds,
                   "methods": result, "iterations": XGB_TREES, "cpu_s": round(time.process_time() - t0, 1),
                   "load_avg": round(os.getloadavg()[0], 1)} | provenance(sys.argv))


def _histogram_boosting(v, y, peers, val, classes, seed: int) -> np.ndarray:
    """``HistogramLearner`` peers holding rows ``peers`` (lists of row numbers), the exchange emulated in
    one process (each step, every peer files every other's contributions); validation probabilities."""
    from p2pser.exchange.mixing import Contribution
    from p2pser.features.normalize import Normalizer
    from p2pser.learn.data import PeerData
    from p2pser.learn.histboost import HistogramLearner
    from p2pser.learn.tasks import CLASSIFICATION

    none = np.zeros(0, np.int64)
    learners = []
    for i, p in enumerate(peers):
        data = PeerData(x_train=v[p][:, :, None], y_train=y[p], x_val=v[none][:, :, None], y_val=y[none],
                        x_test=v[none][:, :, None], y_test=y[none], lengths_test=none, classes=list(classes),
                        normalizer=Normalizer.identity(v.shape[1]))
        data.mode = "speaker"  # inputs are standardised already
        learners.append(HistogramLearner(data, "", CLASSIFICATION, peer_id=i, seed=seed, n_peers=len(peers)))
    while not all(learner.finished for learner in learners):
        for learner in learners:
            learner.train(1)
        offers = [learner.snapshot() for learner in learners]
        for learner in learners:
            learner.mix({}, 1.0, [Contribution(j, 1.0, o) for j, o in enumerate(offers) if j != learner.id], None)
    return learners[0].predict_proba(v[val][:, :, None])


def speed(args) -> None:
    from p2pser.audio.corpora import load_corpus

    utterances = load_corpus(DATA / "emodb").utterances[:: args.step]
    rows = []
    for kind in ("mfcc", "pitch", "egemaps", "egemaps-lld", "compare", "compare-lld"):
        with tempfile.TemporaryDirectory(prefix="bench-ser-cache-") as cache:
            cold = extract_features(utterances, FeatureSpec(kind=kind), cache_dir=cache, workers=1, progress=False)
            warm = extract_features(utterances, FeatureSpec(kind=kind), cache_dir=cache, workers=1, progress=False)
        s = cold.stats
        rows.append({"kind": kind, "files": s["files"], "audio_s": s["audio_seconds_extracted"],
                     "cold_cpu_s": s["cpu_seconds"],
                     "cold_audio_s_per_cpu_s": round(s["audio_seconds_extracted"] / s["cpu_seconds"], 1),
                     "warm_wall_s": warm.stats["wall_seconds"],
                     "warm_utterances_per_s": round(s["files"] / warm.stats["wall_seconds"], 1),
                     "warm_audio_s_per_cpu_s": round(s["audio_seconds_extracted"] / max(warm.stats["cpu_seconds"], 1e-3), 1),
                     "load_avg": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    write_results("ser-speed", {"corpus": "emodb", "every_nth_file": args.step, "kinds": rows,
                                "pyin": _pyin_speed(utterances[:3])} | provenance(sys.argv))


def _pyin_speed(utterances) -> dict:
    """librosa's pyin, the other pitch tracker considered for ``pitch``: seconds of audio per CPU-second."""
    import librosa

    from p2pser.audio.decode import load_audio, read_file

    spec = FeatureSpec(kind="pitch")
    audio = 0.0
    t0 = time.process_time()
    for u in utterances:
        y, seconds, _ = load_audio(read_file(str(u.path)), sample_rate=spec.sample_rate, trim_db=spec.trim_db,
                                   trim_block=spec.hop_length, min_samples=spec.n_fft, normalize=spec.normalize)
        librosa.pyin(y, fmin=60, fmax=600, sr=spec.sample_rate, frame_length=1024, hop_length=spec.hop_length)
        audio += seconds
    cpu = time.process_time() - t0
    return {"files": len(utterances), "audio_s": round(audio, 1), "cpu_s": round(cpu, 1),
            "audio_s_per_cpu_s": round(audio / cpu, 2)}


@dataclass
class _InnerFolds(Pooled):
    """A pooled experiment whose "folds" hold out groups of one outer fold's training speakers: fold k
    tests on ``groups[k - 1]`` and trains on the outer fold's other training speakers."""

    groups: list[list[str]] = field(default_factory=list)
    outer: int = 1

    def split(self, number: int, *, val_fraction: float = 0.0, seed: int = 0) -> Split:
        train = rows(self.row_of, self.experiment.split(self.outer)[0])
        held = np.isin(self.features.speakers[train], self.groups[number - 1])
        return Split(train=train[~held], val=np.zeros(0, np.int64), test=train[held])


def _parse_case(text: str) -> dict:
    model, kind, augment, *rest = text.split(":")
    copies = int(rest.pop(0)) if rest and rest[0].isdigit() else 1
    overrides = {}
    for item in (rest[0].split("/") if rest else []):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return {"case": text, "model": model, "features": kind, "augment": augment, "copies": copies,
            "overrides": overrides}


def validate(args) -> None:
    from p2pser.features.augment import perturbations

    name = f"ser-validate-{args.corpus}-fold{args.fold}"
    path = Path(__file__).parent / "results" / f"{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"cases": []}
    pooled: dict[str, Pooled] = {}
    for case in map(_parse_case, args.cases.split(",")):
        kind = case["features"]
        if kind not in pooled:
            base = prepare_pooled(DATA / args.corpus, FeatureSpec(kind=kind), progress=False)
            train = rows(base.row_of, base.experiment.split(args.fold)[0])
            speakers = sorted(set(base.features.speakers[train].tolist()))
            groups = [speakers[k :: args.inner] for k in range(args.inner)]
            pooled[kind] = _InnerFolds(base.experiment, base.features, base.row_of, groups=groups, outer=args.fold)
        data = dataclasses.replace(pooled[kind], augment=tuple(perturbations(case["augment"], case["copies"])))
        cfg = recommended_config(case["model"], **case["overrides"])
        load = os.getloadavg()[0]
        t0 = time.process_time()
        with tempfile.TemporaryDirectory(prefix="bench-ser-") as tmp:
            summary = train_experiment(data, list(range(1, args.inner + 1)), case["model"], cfg, seed=args.seed,
                                       out_dir=tmp, progress=False)
        row = case | {"val_ua": round(summary["ua"], 4),
                      "val_ua_per_group": [round(r["ua"], 4) for r in summary["per_fold"]],
                      "groups": data.groups, "seed": args.seed,
                      "train_s_per_group": round(np.mean([r["train_s"] for r in summary["per_fold"]]), 1),
                      "cpu_s": round(time.process_time() - t0, 1), "load_avg_at_start": round(load, 1)}
        print(json.dumps({k: row[k] for k in ("case", "val_ua", "val_ua_per_group", "cpu_s")}), flush=True)
        results["cases"] = [c for c in results["cases"] if (c["case"], c["seed"]) != (row["case"], args.seed)]
        results["cases"].append(row)
        results |= {"corpus": args.corpus, "outer_fold": args.fold, "inner_groups": args.inner,
                    "protocol": "validation UA on held-out training speakers; the outer fold's test speakers "
                                "are never used"}
        write_results(name, results | provenance(sys.argv))


def table(args) -> None:
    """Markdown of the matrix files (for BENCHMARKS.md): one row per feature kind, one column per model."""
    results = Path(__file__).parent / "results"
    for corpus in ("ravdess", "emodb"):
        path = results / f"ser-matrix-{corpus}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        cells = {(c["model"], c["features"]): c for c in doc["cases"]}
        models = [m for m in (*MODEL_NAMES, *ENSEMBLE_MODELS) if any(k[0] == m for k in cells)]
        kinds = [k for k in (*UTTERANCE_KINDS, *FRAME_KINDS) if any(c[1] == k for c in cells)]
        print(f"\n{corpus} fold 1 (commit {doc['commit'][:7]}): test UA / validation UA / training s\n")
        print("| features | " + " | ".join(models) + " |")
        print("|---|" + "---|" * len(models))
        for kind in kinds:
            row = []
            for m in models:
                c = cells.get((m, kind))
                row.append(f"{100 * c['ua']:.1f} / {100 * c['val_ua']:.1f} / {c['train_s_per_fold']:.0f} s" if c else "-")
            print(f"| {kind} | " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("matrix", "folds", "gossip", "speed", "table", "bagging-rule", "validate",
                                           "cyclic-rule", "join", "peers-augment", "histogram-rule"))
    parser.add_argument("--corpus", default="emodb")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--features", default="egemaps")
    parser.add_argument("--models", default=None, help="matrix: only these models (comma list)")
    parser.add_argument("--kinds", default=None, help="matrix: only these feature kinds (comma list)")
    parser.add_argument("--trees", type=int, default=100, help="gossip: boosting rounds per peer and round")
    parser.add_argument("--rounds", type=int, default=1, help="gossip: rounds of boosting")
    parser.add_argument("--boosting", default="own", help="gossip: --boosting own, cyclic or histogram")
    parser.add_argument("--final-mixing", type=int, default=3, help="gossip: --final-mixing")
    parser.add_argument("--eval-every", type=int, default=1, help="gossip: --eval-every")
    parser.add_argument("--averaged", type=lambda t: [int(k) for k in t.split(",") if k], default=[],
                        help="cyclic-rule: also boosting by averaged tree sets, k trees per round (comma list)")
    parser.add_argument("--only-averaged", action="store_true", help="cyclic-rule: only the averaged methods")
    parser.add_argument("--seeds", type=int, default=1, help="histogram-rule: seeds per group; gossip: seeds")
    parser.add_argument("--step", type=int, default=4, help="speed: every n-th EmoDB file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=1, help="validate: the outer fold")
    parser.add_argument("--folds", default="all", help="folds: which folds (comma list or all)")
    parser.add_argument("--augment", default="none", help="folds: --augment of p2pser train")
    parser.add_argument("--copies", type=int, default=1, help="folds: --augment-copies")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help="folds: validation share for early stopping (0: all epochs, as p2pser train); "
                             "gossip: --val-fraction of the peers")
    parser.add_argument("--inner", type=int, default=4, help="validate: groups of held-out training speakers")
    parser.add_argument("--cases", default="mlp:compare:none", help="validate: model:features:augment[:copies]")
    args = parser.parse_args()
    ensure_numba_cache()
    pin_threads(1)
    parts = {"matrix": matrix, "folds": folds, "gossip": gossip, "speed": speed, "table": table,
             "bagging-rule": bagging_rule, "validate": validate,
             "cyclic-rule": cyclic_rule, "join": join,
             "peers-augment": peers_augment, "histogram-rule": histogram_rule}
    parts[args.part](args)


if __name__ == "__main__":
    main()
