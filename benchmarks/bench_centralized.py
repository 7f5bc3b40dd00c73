"""Centralized baseline accuracy and cost on the real corpora (speaker-independent folds).

Each case trains one (model, features) pair on the given folds of a corpus with ``train_experiment`` (the
code behind ``p2pser train``) and records mean UA over folds, per-fold UA/WA/F1, parameters and training
seconds. Run folders (models, confusion plots) go to a temporary folder, never into the repository; the
numbers go to benchmarks/results/centralized-<name>.json. ``--time-cli`` also times ``p2pser train`` on
fold 1 with its defaults, as a user would run it (warm feature cache).

    python benchmarks/bench_centralized.py --corpus ravdess --cases cnn1d:mfcc,svm:mfcc --folds 1
    python benchmarks/bench_centralized.py --corpus emodb --cases svm:mfcc --folds all --name emodb
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pser.experiments.centralized import parse_folds, prepare_pooled, train_experiment
from p2pser.features.spec import FeatureSpec
from p2pser.learn.models import MODEL_NAMES
from p2pser.learn.trainer import recommended_config
from p2pser.runtime import ensure_numba_cache, pin_threads

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def _cases(text: str) -> list[tuple[str, str]]:
    cases = []
    for item in text.split(","):
        model, _, kind = item.partition(":")
        if model == "all":
            cases += [(m, kind or "mfcc") for m in MODEL_NAMES]
        else:
            cases.append((model, kind or "mfcc"))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="ravdess", help="folder name under --data (ravdess, emodb)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the corpora")
    parser.add_argument("--cases", default="all:mfcc", help="model:features list, 'all:KIND' = every model")
    parser.add_argument("--folds", default="1", help="fold number, comma list or 'all'")
    parser.add_argument("--epochs", type=int, default=None, help="override the models' recipes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: the user cache)")
    parser.add_argument("--time-cli", action="store_true", help="also time `p2pser train --fold 1` (defaults)")
    parser.add_argument("--name", default=None, help="results file suffix (default: the corpus)")
    args = parser.parse_args()

    ensure_numba_cache()
    pin_threads(args.threads)
    data_dir = args.data / args.corpus
    out = HERE / "results" / f"centralized-{args.name or args.corpus}.json"
    results = json.loads(out.read_text()) if out.exists() else {"cases": []}
    results.update(corpus=args.corpus, machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                   threads=args.threads)
    pooled = {}
    with tempfile.TemporaryDirectory(prefix="bench-centralized-") as tmp:
        for model, kind in _cases(args.cases):
            if kind not in pooled:
                pooled[kind] = prepare_pooled(data_dir, FeatureSpec(kind=kind), cache_dir=args.cache_dir,
                                              progress=False)
            cfg = recommended_config(model, epochs=args.epochs)
            folds = parse_folds(args.folds, len(pooled[kind].experiment.folds))
            load = os.getloadavg()[0]
            summary = train_experiment(pooled[kind], folds, model, cfg, seed=args.seed,
                                       out_dir=Path(tmp) / f"{model}-{kind}", progress=False)
            case = {
                "model": model, "features": kind, "folds": folds, "ua": round(summary["ua"], 4),
                "wa": round(summary["wa"], 4), "macro_f1": round(summary["macro_f1"], 4),
                "params": summary["params"], "epochs": cfg.epochs,
                "train_s_per_fold": round(sum(r["train_s"] for r in summary["per_fold"]) / len(folds), 1),
                "per_fold": [{k: r[k] for k in ("fold", "ua", "wa", "macro_f1", "train_s")}
                             for r in summary["per_fold"]],
                "load_avg_at_start": round(load, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
            }
            results["cases"].append(case)
            print(json.dumps({k: case[k] for k in ("model", "features", "folds", "ua", "params",
                                                   "train_s_per_fold")}), flush=True)
            out.write_text(json.dumps(results, indent=1))
        if args.time_cli:
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "p2pser", "train", str(data_dir), "--fold", "1", "--no-progress",
                   "--out", str(Path(tmp) / "cli")]
            if args.cache_dir:
                cmd += ["--cache-dir", args.cache_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            summary = json.loads((Path(tmp) / "cli" / "summary.json").read_text())
            results["cli_fold1"] = {"command": "p2pser train DIR --fold 1 (defaults, warm cache)",
                                    "wall_s": round(time.perf_counter() - start, 1), "ua": round(summary["ua"], 4),
                                    "model": summary["model"], "features": summary["features"],
                                    "epochs": summary["train_config"]["epochs"],
                                    "load_avg_at_start": round(os.getloadavg()[0], 1)}
            print(proc.stdout, flush=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
