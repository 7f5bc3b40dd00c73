"""Centralized baseline: pool the training speakers' data, train one model per fold, test on held-out speakers.

This is the upper reference the decentralized runs are compared with (``p2pser train``, and the
simulator's ``--baseline centralized``). It uses the same experiment preparation, normalisation rule
(training statistics only), model registry and ``LocalTrainer`` as the peers.

Run folder::

    summary.json                 mode, ua/wa/macro_f1 (mean over folds), per_fold, model, features, wall_s ...
    confusion.png                confusion matrix summed over the folds
    fold-K/metrics.json          test report (UA, WA, F1, per-class recall, confusion) and per-epoch history
    fold-K/model.pt              the trained model's state_dict (torch.save; load with weights_only=True)
    fold-K/normalizer.json       the per-channel statistics the model's inputs were standardised with
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p2pser.config import RunConfig
from p2pser.data.dataset import Experiment, prepare_experiment
from p2pser.data.features import FeatureSpec, Normalizer
from p2pser.errors import UserError
from p2pser.learn.metrics import classification_report
from p2pser.learn.models import MODEL_NAMES, build_model, count_parameters
from p2pser.learn.trainer import LocalTrainer, TrainConfig, evaluate, recommended_config
from p2pser.report.plots import confusion_plot
from p2pser.report.run_folder import prepare_out_dir

log = logging.getLogger(__name__)

# The same defaults as a decentralized run: both arms of a comparison start alike.
DEFAULT_MODEL = RunConfig.model
DEFAULT_FEATURES = RunConfig.features


def parse_folds(fold: int | str | Sequence[int], n_folds: int) -> list[int]:
    """``"all"``, ``3``, ``"1,3"`` or ``[1, 3]`` -> fold numbers, checked against ``n_folds``."""
    if isinstance(fold, str):
        if fold.strip().lower() == "all":
            return list(range(1, n_folds + 1))
        try:
            numbers = [int(part) for part in fold.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--fold {fold!r}: give a fold number, a comma list (1,3) or 'all'") from None
    elif isinstance(fold, int):
        numbers = [fold]
    else:
        numbers = [int(f) for f in fold]
    bad = [k for k in numbers if not 1 <= k <= n_folds]
    if not numbers or bad:
        raise UserError(f"fold {bad or fold} does not exist: the folds run 1..{n_folds} (or use 'all')")
    return list(dict.fromkeys(numbers))


def _fit_fold(
    experiment: Experiment,
    number: int,
    model_name: str,
    cfg: TrainConfig,
    *,
    seed: int,
    val_fraction: float,
    fold_dir: Path,
    progress: bool,
) -> dict:
    fs = experiment.features
    split = experiment.fold(number, val_fraction=val_fraction, seed=seed)
    if len(split.train) == 0:
        raise UserError(f"fold {number} leaves no training utterances")
    # Statistics from the training part only: test speakers must not leak into the model's inputs.
    norm = Normalizer.fit(fs.x[split.train], fs.lengths[split.train])
    x_train = norm.apply(fs.x[split.train], fs.lengths[split.train])
    x_val = norm.apply(fs.x[split.val], fs.lengths[split.val])
    x_test = norm.apply(fs.x[split.test], fs.lengths[split.test])
    y_train, y_val, y_test = fs.labels[split.train], fs.labels[split.val], fs.labels[split.test]
    classes = experiment.classes

    model = build_model(model_name, x_train.shape[1], x_train.shape[2], len(classes), seed=seed)
    trainer = LocalTrainer(model, x_train, y_train, len(classes), cfg, seed=seed)
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"fold {number}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        row: dict = {"epoch": epoch, "loss": round(trainer.train_epoch(), 5)}
        if len(y_val):
            row["val_ua"] = round(evaluate(model, x_val, y_val, classes)["ua"], 5)
            # Ties go to the later epoch: the schedule has annealed further.
            if best is None or row["val_ua"] >= best[0]:
                best = (row["val_ua"], epoch, copy.deepcopy(model.state_dict()))
        history.append(row)
        bar.set_postfix({k: v for k, v in row.items() if k != "epoch"})
    train_s = time.perf_counter() - t0
    chosen_epoch = cfg.epochs
    if best is not None:
        chosen_epoch = best[1]
        model.load_state_dict(best[2])

    report = evaluate(model, x_test, y_test, classes)
    report.update(
        fold=number,
        test_speakers=sorted(set(fs.speakers[split.test].tolist())),
        n_train=len(y_train),
        n_val=len(y_val),
        n_test=len(y_test),
        epoch=chosen_epoch,
        train_s=round(train_s, 2),
        history=history,
    )
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), fold_dir / "model.pt")
    (fold_dir / "normalizer.json").write_text(json.dumps(norm.to_dict()))
    (fold_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    log.info("fold %d: UA %.4f WA %.4f (%d test utterances, %.1f s)", number, report["ua"], report["wa"],
             len(y_test), train_s)
    return report


def train_experiment(
    experiment: Experiment,
    fold_numbers: Sequence[int],
    model_name: str,
    train_cfg: TrainConfig,
    *,
    seed: int,
    out_dir: str | Path,
    val_fraction: float = 0.0,
    progress: bool = True,
) -> dict:
    """Train and test one model per fold of a prepared experiment; write the run folder; return the summary.

    ``val_fraction`` > 0 holds out that share of the training speakers' utterances and keeps the epoch
    with the best validation UA; 0 trains on everything and keeps the last epoch.
    """
    if model_name not in MODEL_NAMES:
        raise UserError(f"unknown model {model_name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    out = Path(out_dir)
    start = time.perf_counter()
    folds = list(fold_numbers)
    reports = []
    for number in tqdm(folds, desc="folds", unit="fold", disable=not progress or len(folds) == 1):
        reports.append(
            _fit_fold(experiment, number, model_name, train_cfg, seed=seed, val_fraction=val_fraction,
                      fold_dir=out / f"fold-{number}", progress=progress)
        )
    fs = experiment.features
    classes = experiment.classes
    confusion = np.sum([np.asarray(r["confusion"]) for r in reports], axis=0)
    pooled = _report_from_confusion(confusion, classes)
    summary = {
        "mode": "centralized",
        "ua": float(np.mean([r["ua"] for r in reports])),
        "wa": float(np.mean([r["wa"] for r in reports])),
        "macro_f1": float(np.mean([r["macro_f1"] for r in reports])),
        "ua_pooled": pooled["ua"],
        "per_fold": [
            {k: r[k] for k in ("fold", "ua", "wa", "macro_f1", "test_speakers", "n_test", "epoch", "train_s")}
            for r in reports
        ],
        "model": model_name,
        "params": count_parameters(build_model(model_name, fs.x.shape[1], fs.x.shape[2], len(classes))),
        "features": fs.spec.kind,
        "feature_spec": fs.spec.to_dict(),
        "classes": classes,
        "confusion": confusion.tolist(),
        "train_config": asdict(train_cfg),
        "seed": seed,
        "val_fraction": val_fraction,
        "folds_source": experiment.folds_source,
        "n_utterances": len(fs),
        "wall_s": round(time.perf_counter() - start, 2),  # training and testing; callers may add preparation
    }
    confusion_plot(confusion, classes, out / "confusion.png",
                   title=f"{model_name} on {fs.spec.kind}: UA {100 * summary['ua']:.1f}% ({len(reports)} folds)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _report_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """UA etc. of all folds' test predictions pooled, rebuilt from the summed confusion matrix."""
    true = np.repeat(np.arange(len(classes)), cm.sum(axis=1))
    pred = np.concatenate([np.repeat(np.arange(len(classes)), row) for row in cm])
    return classification_report(true, pred, classes)


def train_centralized(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    folds_path: str | Path | None = None,
    fold: int | str | Sequence[int] = "all",
    test_speakers: str | Sequence[str] | None = None,
    model_name: str = DEFAULT_MODEL,
    features: str = DEFAULT_FEATURES,
    spec: FeatureSpec | None = None,
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """``p2pser train`` as a function: prepare the data folder's experiment and run ``train_experiment``.

    ``spec`` overrides ``features`` (a feature kind with default settings); ``train_cfg`` defaults to the
    model's recommended configuration. Returns the summary also written to ``out_dir/summary.json``.
    """
    if model_name not in MODEL_NAMES:
        raise UserError(f"unknown model {model_name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist or is not a folder")
    start = time.perf_counter()
    out = prepare_out_dir(out_dir)
    spec = spec or FeatureSpec(kind=features)
    if isinstance(test_speakers, str):
        test_speakers = [s for s in test_speakers.split(",") if s.strip()]
    experiment = prepare_experiment(
        data_dir, spec, folds_path=folds_path, test_speakers=list(test_speakers) if test_speakers else None,
        cache_dir=cache_dir, workers=workers, progress=progress,
    )
    numbers = parse_folds(fold if not test_speakers else 1, len(experiment.folds))
    cfg = train_cfg or recommended_config(model_name)
    summary = train_experiment(experiment, numbers, model_name, cfg, seed=seed, out_dir=out,
                               val_fraction=val_fraction, progress=progress)
    summary.update(data_dir=str(data_dir), wall_s=round(time.perf_counter() - start, 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_results(summary: dict) -> str:
    """The short results table ``p2pser train`` prints."""
    lines = [f"{'fold':>5}  {'UA':>6}  {'WA':>6}  {'F1':>6}  {'test':>5}  {'train s':>8}"]
    for r in summary["per_fold"]:
        lines.append(f"{r['fold']:>5}  {100 * r['ua']:5.1f}%  {100 * r['wa']:5.1f}%  {100 * r['macro_f1']:5.1f}%  "
                     f"{r['n_test']:>5}  {r['train_s']:>8.1f}")
    lines.append(f"{'mean':>5}  {100 * summary['ua']:5.1f}%  {100 * summary['wa']:5.1f}%  "
                 f"{100 * summary['macro_f1']:5.1f}%")
    lines.append(f"model {summary['model']} ({summary['params']} params) on {summary['features']}; "
                 f"{summary['wall_s']:.1f} s")
    return "\n".join(lines)
