"""Centralized baseline: pool the training speakers' data, train one model per fold, test on held-out speakers.

This is the upper reference the decentralized runs are compared with (``p2pser train``, and the
simulator's ``--baseline centralized``). It resolves folds, classes and labels as the peers do
(``p2pser.partition.experiment``) and uses their normalisation rule (training statistics only), model
registry and ``LocalTrainer``.

Run folder::

    summary.json                 mode, task, the task's metrics (mean over folds: ua/wa/macro_f1; ccc,
                                 ccc_arousal, pearson_arousal, mae_arousal ...), per_fold, model, features,
                                 wall_s ...
    confusion.png                confusion matrix summed over the folds (tasks with categories)
    fold-K/metrics.json          test report (UA, WA, F1, per-class recall, confusion; CCC, Pearson, MAE per
                                 dimension) and per-epoch history
    fold-K/model.pt              the trained model's state_dict (torch.save; load with weights_only=True);
                                 model.json for xgb (xgboost's JSON format)
    fold-K/normalizer.json       the per-channel statistics the model's inputs were standardised with
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p2pser.config import ENSEMBLE_MODELS, RunConfig, check_model_name
from p2pser.errors import UserError
from p2pser.features.augment import Copies, extract_copies
from p2pser.features.normalize import Normalizer, standardize_by_speaker
from p2pser.features.spec import FeatureSet, FeatureSpec
from p2pser.learn.metrics import classification_report
from p2pser.learn.models import build_model, count_parameters
from p2pser.learn.tasks import CLASSIFICATION, Task, experiment_task
from p2pser.learn.trainer import LocalTrainer, TrainConfig, predict_scores, recommended_config
from p2pser.partition.experiment import Experiment, load_experiment, rows
from p2pser.partition.folds import Split, hold_out
from p2pser.report.plots import confusion_plot
from p2pser.report.run_folder import SUMMARY, prepare_out_dir

log = logging.getLogger(__name__)

# The same defaults as a decentralized run: both arms of a comparison start alike.
DEFAULT_MODEL = RunConfig.model
DEFAULT_FEATURES = RunConfig.features
DEFAULT_NORMALIZER = RunConfig.normalizer


@dataclass(frozen=True)
class PooledDP:
    """Differential privacy of the pooled model (``p2pser train --dp``): DP-SGD per utterance, or per
    speaker (each step samples speakers; a speaker's gradient is clipped as one unit)."""

    mode: str  # "utterance" or "speaker"
    epsilon: float | None
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float | None = None
    accountant: str = "rdp"


def pooled_privacy_plan(dp: PooledDP, cfg: TrainConfig, speakers: np.ndarray):
    """The DP-SGD plan of pooled training: sampling rate batch/utterances (or expected speakers per step
    over speakers), ``epochs * steps_per_epoch`` steps."""
    from p2pser.learn.privacy import PrivacyPlan
    from p2pser.learn.trainer import GROUP_TAKE

    n = len(speakers)
    steps = cfg.epochs * max(n // min(cfg.batch_size, n), 1)
    if dp.mode == "speaker":
        units = len(np.unique(speakers))
        rate = min(1.0, max(cfg.batch_size / GROUP_TAKE, 1.0) / units)
    else:
        units, rate = n, min(1.0, cfg.batch_size / n)
    return PrivacyPlan.make(dp.mode, epsilon=dp.epsilon, noise_multiplier=dp.noise_multiplier, clip=dp.clip,
                            delta=dp.delta, sample_rate=rate, steps=steps, records=units, accountant=dp.accountant)


@dataclass
class Pooled:
    """An experiment with the features of all its utterances, pooled as centralized training uses them."""

    experiment: Experiment
    features: FeatureSet
    row_of: dict[int, int]  # corpus utterance index -> row of features
    augment: tuple[str, ...] = ()  # perturbations of the training utterances (p2pser.features.augment)
    cache_dir: str | Path | None = None
    workers: int | None = None

    def copies(self, train: np.ndarray) -> Copies:
        """The perturbed copies of these training rows (``augment``; extracted once into the cache)."""
        return extract_copies(self.features, train, self.augment, cache_dir=self.cache_dir, workers=self.workers)

    @property
    def classes(self) -> list[str]:
        return self.experiment.classes

    @property
    def task(self) -> Task:
        return experiment_task(self.experiment)

    @property
    def y(self) -> np.ndarray:
        """The task's targets of each feature row."""
        return self.experiment.row_targets(self.features, self.row_of)

    def split(self, number: int, *, val_fraction: float = 0.0, seed: int = 0) -> Split:
        """Rows of ``features`` for fold ``number``: its test speakers, and its training speakers' usable
        utterances less a class-stratified (for dimensions: tertile-stratified) ``val_fraction`` held out
        for validation."""
        train, test = (rows(self.row_of, part) for part in self.experiment.split(number))
        val = hold_out(train, self.task.strata(self.y), val_fraction, seed)
        return Split(train=np.setdiff1d(train, val).astype(np.int64), val=val, test=test)


def prepare_pooled(
    data_dir: str | Path,
    spec: FeatureSpec,
    *,
    folds_path: str | Path | None = None,
    test_speakers: list[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    task: str = "categorical",
    augment: Sequence[str] = (),
) -> Pooled:
    """Resolve the data folder's experiment (``load_experiment``) and extract (or load cached) features.
    ``augment``: perturbation tokens (``p2pser.features.augment.perturbations``) whose copies of each fold's
    training utterances are added to its training part."""
    experiment = load_experiment(data_dir, folds_path=folds_path, test_speakers=test_speakers, task=task)
    # Categories: every utterance, not only the labelled ones, so that the extractor reports those outside
    # the classes. Dimensions: the labelled ones (the extractor does not filter them).
    wanted = np.arange(len(experiment.corpus.utterances)) if task == "categorical" else experiment.labelled
    features, row_of = experiment.extract(wanted, spec, cache_dir=cache_dir, workers=workers, progress=progress)
    return Pooled(experiment, features, row_of, tuple(augment), cache_dir, workers)


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
    data: Pooled,
    number: int,
    model_name: str,
    cfg: TrainConfig,
    *,
    seed: int,
    val_fraction: float,
    fold_dir: Path,
    progress: bool,
    task: Task,
    normalizer: str,
    dp: PooledDP | None = None,
) -> dict:
    fs = data.features
    split = data.split(number, val_fraction=val_fraction, seed=seed)
    if len(split.train) == 0 or len(split.test) == 0:
        raise UserError(f"fold {number} leaves {len(split.train)} usable training and {len(split.test)} test "
                        "utterances")
    if normalizer == "speaker":
        # Each speaker by their own audio, test speakers included (their unlabelled test utterances).
        norm = Normalizer.identity(fs.x.shape[1])
        own = np.concatenate([split.train, split.val])  # training speakers: all their utterances
        scaled = standardize_by_speaker(fs.x[own], fs.lengths[own], fs.speakers[own])
        x_train, x_val = scaled[: len(split.train)], scaled[len(split.train):]
        x_test = standardize_by_speaker(fs.x[split.test], fs.lengths[split.test], fs.speakers[split.test])
    else:
        # Pooled data is one site: "local" and "global" both mean the training part's statistics (test
        # speakers must not leak into the model's inputs).
        norm = Normalizer.fit(fs.x[split.train], fs.lengths[split.train])
        x_train = norm.apply(fs.x[split.train], fs.lengths[split.train])
        x_val = norm.apply(fs.x[split.val], fs.lengths[split.val])
        x_test = norm.apply(fs.x[split.test], fs.lengths[split.test])
    y = data.y
    y_train, y_val, y_test = y[split.train], y[split.val], y[split.test]
    classes = data.classes
    extra = data.copies(split.train)  # validation and test utterances are never augmented
    if len(extra):
        if dp is not None:
            raise UserError(f"--dp {dp.mode} with --augment: a perturbed copy is another record of the same "
                            "utterance, which the privacy accounting does not count; use one of them")
        x_extra = (standardize_by_speaker(extra.x, extra.lengths, extra.speakers) if normalizer == "speaker"
                   else norm.apply(extra.x, extra.lengths))
        x_train, y_train = np.concatenate([x_train, x_extra]), np.concatenate([y_train, y[extra.source]])

    if model_name in ENSEMBLE_MODELS:
        if task.name != CLASSIFICATION.name:
            raise UserError(f"--model {model_name} learns categories only: use --task categorical, or an "
                            "averageable model for dimensions")
        if dp is not None:
            raise UserError(f"--dp {dp.mode} protects gradients; --model {model_name} has none (use an "
                            "averageable model)")
        return _fit_fold_trees(x_train, y_train, x_val, y_val, x_test, y_test, classes, norm, task, seed=seed,
                               number=number, fold_dir=fold_dir, test_speakers=fs.speakers[split.test])
    model = build_model(model_name, x_train.shape[1], x_train.shape[2], task.n_outputs(len(classes)), seed=seed)
    plan = None if dp is None else pooled_privacy_plan(dp, cfg, fs.speakers[split.train])
    trainer = LocalTrainer(model, x_train, y_train, len(classes), cfg, seed=seed, task=task, privacy=plan,
                           groups=fs.speakers[split.train] if plan is not None and plan.mode == "speaker" else None,
                           dp_seed=seed)
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"fold {number}", unit="epoch", disable=not progress, leave=False)
    val_key = task.val_key()
    for epoch in bar:
        row: dict = {"epoch": epoch, "loss": round(trainer.train_epoch(), 5)}
        if len(y_val):
            row[val_key] = round(task.score(y_val, predict_scores(model, x_val), classes)[task.primary], 5)
            # Ties go to the later epoch: the schedule has annealed further.
            if best is None or row[val_key] >= best[0]:
                best = (row[val_key], epoch, copy.deepcopy(model.state_dict()))
        history.append(row)
        bar.set_postfix({k: v for k, v in row.items() if k != "epoch"})
    train_s = time.perf_counter() - t0
    chosen_epoch = cfg.epochs
    if best is not None:
        chosen_epoch = best[1]
        model.load_state_dict(best[2])

    report = task.score(y_test, predict_scores(model, x_test), classes)
    if trainer.dp is not None:
        report.update(dp_epsilon=trainer.dp.accountant.epsilon(), dp_noise_multiplier=plan.noise_multiplier)
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
    log.info("fold %d: %s %.4f (%d test utterances, %.1f s)", number, task.label(), report[task.primary],
             len(y_test), train_s)
    return report


def _fit_fold_trees(x_train, y_train, x_val, y_val, x_test, y_test, classes, norm, task: Task, *, seed: int,
                    number: int, fold_dir: Path, test_speakers: np.ndarray) -> dict:
    """The pooled ``xgb`` model of one fold (``p2pser.learn.trees.fit_pooled``); ``model.json`` is xgboost's
    own format."""
    from p2pser.learn import trees

    t0 = time.perf_counter()
    booster, rounds, history = trees.fit_pooled(
        trees.utterance_vectors(x_train), y_train, trees.utterance_vectors(x_val), y_val, len(classes), seed=seed,
        score=lambda y, p: task.score(y, p, classes)[task.primary])
    train_s = time.perf_counter() - t0
    report = task.score(y_test, trees.probabilities(booster, trees.utterance_vectors(x_test)), classes)
    report.update(fold=number, test_speakers=sorted(set(test_speakers.tolist())), n_train=len(y_train),
                  n_val=len(y_val), n_test=len(y_test), epoch=rounds, train_s=round(train_s, 2),
                  history=[{"trees": k, task.val_key(): round(v, 5)} for k, v in history],
                  params=trees.count_nodes(booster))
    fold_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(fold_dir / "model.json")
    (fold_dir / "normalizer.json").write_text(json.dumps(norm.to_dict()))
    (fold_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    log.info("fold %d: %s %.4f (%d test utterances, %d boosting rounds, %.1f s)", number, task.label(),
             report[task.primary], len(y_test), rounds, train_s)
    return report


def train_experiment(
    data: Pooled,
    fold_numbers: Sequence[int],
    model_name: str,
    train_cfg: TrainConfig,
    *,
    seed: int,
    out_dir: str | Path,
    val_fraction: float = 0.0,
    progress: bool = True,
    task: Task = CLASSIFICATION,
    normalizer: str = DEFAULT_NORMALIZER,
    dp: PooledDP | None = None,
) -> dict:
    """Train and test one model per fold of a pooled experiment; write the run folder; return the summary.

    ``val_fraction`` > 0 holds out that share of the training speakers' utterances and keeps the epoch
    with the best validation UA; 0 trains on everything and keeps the last epoch.
    """
    check_model_name(model_name)
    out = Path(out_dir)
    start = time.perf_counter()
    folds = list(fold_numbers)
    reports = []
    for number in tqdm(folds, desc="folds", unit="fold", disable=not progress or len(folds) == 1):
        reports.append(
            _fit_fold(data, number, model_name, train_cfg, seed=seed, val_fraction=val_fraction,
                      fold_dir=out / f"fold-{number}", progress=progress, task=task, normalizer=normalizer,
                      dp=dp)
        )
    fs = data.features
    classes = data.classes
    has_classes = "confusion" in reports[0]
    confusion = np.sum([np.asarray(r["confusion"]) for r in reports], axis=0) if has_classes else None
    summary = {
        "mode": "centralized",
        "task": task.name,
        # A metric a fold cannot score (a dimension with no labelled test utterance) is left out of its mean.
        **{m: float(np.mean([r[m] for r in reports if m in r])) for m in task.metrics if any(m in r for r in reports)},
        **({"ua_pooled": _report_from_confusion(confusion, classes)["ua"]} if has_classes else {}),
        "per_fold": [
            {k: r[k] for k in ("fold", *task.metrics, "test_speakers", "n_test", "epoch", "train_s") if k in r}
            for r in reports
        ],
        "model": model_name,
        "params": reports[-1]["params"] if model_name in ENSEMBLE_MODELS  # tree nodes
        else count_parameters(build_model(model_name, fs.x.shape[1], fs.x.shape[2], task.n_outputs(len(classes)))),
        "features": fs.spec.kind,
        "feature_spec": fs.spec.to_dict(),
        "classes": classes,
        "dimensions": list(task.dimension_names),
        "confusion": None if confusion is None else confusion.tolist(),
        "train_config": asdict(train_cfg),
        "seed": seed,
        "normalizer": normalizer,
        "augment": list(data.augment),
        "val_fraction": val_fraction,
        "folds_source": data.experiment.folds_source,
        "n_utterances": len(fs),
        "wall_s": round(time.perf_counter() - start, 2),  # training and testing; callers may add preparation
        "dp_mode": "none" if dp is None else dp.mode,
        "dp_epsilon": None if dp is None else max(r["dp_epsilon"] for r in reports),
        "dp_delta": None if dp is None else dp.delta,
    }
    if confusion is not None:
        confusion_plot(confusion, classes, out / "confusion.png",
                       title=f"{model_name} on {fs.spec.kind}: UA {100 * summary['ua']:.1f}% ({len(reports)} folds)")
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
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
    normalizer: str = DEFAULT_NORMALIZER,
    task: str = "categorical",
    dp: PooledDP | None = None,
    augment: Sequence[str] = (),
) -> dict:
    """``p2pser train`` as a function: prepare the data folder's experiment and run ``train_experiment``.

    ``spec`` overrides ``features`` (a feature kind with default settings); ``train_cfg`` defaults to the
    model's recommended configuration. Returns the summary also written to ``out_dir/summary.json``.
    """
    check_model_name(model_name)
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist or is not a folder")
    start = time.perf_counter()
    out = prepare_out_dir(out_dir)
    spec = spec or FeatureSpec(kind=features)
    if isinstance(test_speakers, str):
        test_speakers = [s for s in test_speakers.split(",") if s.strip()]
    pooled = prepare_pooled(
        data_dir, spec, folds_path=folds_path, test_speakers=list(test_speakers) if test_speakers else None,
        cache_dir=cache_dir, workers=workers, progress=progress, task=task, augment=augment,
    )
    numbers = parse_folds(fold if not test_speakers else 1, len(pooled.experiment.folds))
    cfg = train_cfg or recommended_config(model_name)
    summary = train_experiment(pooled, numbers, model_name, cfg, seed=seed, out_dir=out,
                               val_fraction=val_fraction, progress=progress, normalizer=normalizer,
                               task=pooled.task, dp=dp)
    summary.update(data_dir=str(data_dir), wall_s=round(time.perf_counter() - start, 2))
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def format_results(summary: dict, task: Task = CLASSIFICATION) -> str:
    """The short results table ``p2pser train`` prints: one column per metric of the task (for dimensions
    their CCC; Pearson's r and MAE are in summary.json)."""
    shown = [m for m in task.metrics if m in summary and not m.startswith(("pearson_", "mae_"))]
    heads = {"macro_f1": "F1", **{m: m.removeprefix("ccc_") for m in shown if m.startswith("ccc_")}}

    def cell(metric: str, value: float | None) -> str:
        if value is None:
            return f"{'-':>9}"
        return f"{100 * value:8.1f}%" if metric in ("ua", "wa", "macro_f1") else f"{value:9.3f}"

    lines = ["fold " + " ".join(f"{heads.get(m, m.upper()):>9}" for m in shown) + "   test   train s"]
    for r in summary["per_fold"]:
        lines.append(f"{r['fold']:>4} " + " ".join(cell(m, r.get(m)) for m in shown)
                     + f"  {r['n_test']:>5}  {r['train_s']:>8.1f}")
    lines.append("mean " + " ".join(cell(m, summary[m]) for m in shown))
    lines.append(f"model {summary['model']} ({summary['params']} params) on {summary['features']}; "
                 f"{summary['wall_s']:.1f} s")
    return "\n".join(lines)
