"""What is learned and how it is scored: a task names its metrics and its one primary metric.

Training (best-epoch choice), the stop rule, metrics rows, summaries, sweeps and plots all ask the task for
the metric they need instead of spelling ``"ua"``: a regression task (arousal, valence, dominance scored by
CCC) then flows through the same code as classification.

Metric keys in rows and summaries are built here and nowhere else:

- a metrics row has ``val_<primary>`` and ``test_<metric>`` for every metric of the task (``val_ua``,
  ``test_ua``, ``test_wa``, ``test_macro_f1`` for classification);
- a run summary has ``<metric>_mean``, ``<metric>_min``, ``<metric>_max`` over the peers and
  ``<metric>_average_model`` for each *headline* metric of the task (``ua_mean`` ... for classification,
  ``ccc_mean`` ... for dimensions, both sets for the multi-task ``both``).

Each task also says what its targets ``y`` look like (``p2pser.partition.targets``: categorical class
indices ``[N]``; dimensional ``[N, D]`` with NaN for unknown values; both ``[N, 1 + D]``), so the data path,
the trainer and the report need no case analysis of their own.

A model has ``n_outputs`` outputs: the class scores first, then one regression output per dimension (the
regression head: any model of the registry gets one by being built with more outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pser.learn.metrics import classification_report, concordance_cc
from p2pser.partition import targets as _targets
from p2pser.partition.targets import DIMENSIONS, TASK_NAMES


@dataclass(frozen=True)
class Task:
    """The common part of every task: the metric names and the keys derived from them."""

    name: str
    primary: str  # the metric that chooses epochs, stops runs and heads tables; higher is better
    metrics: tuple[str, ...]  # every scalar metric ``score`` returns, the primary first

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics a run summary reports over peers (mean, min, max, average model)."""
        return (self.primary,)

    def val_key(self) -> str:
        """Row key of the validation score that model selection and the stop rule watch."""
        return f"val_{self.primary}"

    def test_key(self, metric: str | None = None) -> str:
        """Row key of a test metric (the primary one by default)."""
        return f"test_{metric or self.primary}"

    def summary_key(self, statistic: str, metric: str | None = None) -> str:
        """Summary key of a statistic over peers: ``mean``, ``min``, ``max``, ``average_model``,
        ``mean_per_round`` (of the primary metric unless ``metric`` is given)."""
        return f"{metric or self.primary}_{statistic}"

    def test_row(self, report: dict) -> dict[str, float]:
        """The test metrics of ``report`` as metrics-row fields (a dimension with too few labelled test
        utterances to score has none)."""
        return {self.test_key(m): float(report[m]) for m in self.metrics
                if m in report and np.isfinite(report[m])}

    def label(self, metric: str | None = None) -> str:
        """A metric as axis labels and tables print it."""
        return (metric or self.primary).upper()

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return getattr(self, "dimensions", ())

    def targets(self, labels: np.ndarray, dims: np.ndarray) -> np.ndarray:
        """``labels`` int ``[N]`` and ``dims`` ``[N, 3]`` (``DIMENSIONS`` order) -> this task's ``y``."""
        return _targets.make_targets(self.name, labels, dims, self.dimension_names)

    def usable(self, y: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows of ``y`` that carry a label this task learns from."""
        return _targets.usable(self.name, y)

    def strata(self, y: np.ndarray) -> np.ndarray:
        """An int group per row (-1: unusable) to stratify validation hold-outs and partitions by."""
        return _targets.strata(self.name, y)


@dataclass(frozen=True)
class Classification(Task):
    """Emotion categories, scored by UA (unweighted average recall: chance is 1/classes whatever the
    class balance), WA (accuracy) and macro-F1."""

    name: str = "categorical"
    primary: str = "ua"
    metrics: tuple[str, ...] = ("ua", "wa", "macro_f1")

    def n_outputs(self, n_classes: int) -> int:
        return n_classes

    def score(self, y_true: np.ndarray, outputs: np.ndarray, classes: Sequence[str]) -> dict:
        """Full report (confusion matrix and per-class recall included) from class scores ``[N, K]``."""
        predicted = outputs.argmax(axis=1) if len(outputs) else np.zeros(0, dtype=np.int64)
        return classification_report(np.asarray(y_true), predicted.astype(np.int64), classes)


def _dimension_metrics(dimensions: Sequence[str]) -> tuple[str, ...]:
    return ("ccc", *(f"{m}_{d}" for d in dimensions for m in ("ccc", "pearson", "mae")))


@dataclass(frozen=True)
class Regression(Task):
    """Emotion dimensions (arousal, valence, dominance), scored by the concordance correlation coefficient,
    the measure challenges rank by: it punishes bias and wrong scale, which Pearson's r forgives."""

    name: str = "dimensional"
    primary: str = "ccc"
    metrics: tuple[str, ...] = _dimension_metrics(DIMENSIONS)
    dimensions: tuple[str, ...] = DIMENSIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _dimension_metrics(self.dimensions))

    def n_outputs(self, n_classes: int) -> int:
        return len(self.dimensions)

    def score(self, y_true: np.ndarray, outputs: np.ndarray, classes: Sequence[str] | None = None) -> dict:
        """CCC, Pearson's r and MAE per dimension (``ccc_arousal`` ...), and ``ccc``, their mean over the
        dimensions that are labelled (NaN in ``y_true`` marks an unlabelled value)."""
        names = list(self.dimensions)
        y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
        outputs = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
        report: dict[str, float] = {}
        for j, name in enumerate(names):
            known = np.isfinite(y_true[:, j])
            if known.sum() < 2:
                continue
            t, p = y_true[known, j], outputs[known, j]
            report[f"ccc_{name}"] = concordance_cc(t, p)
            report[f"pearson_{name}"] = float(np.corrcoef(t, p)[0, 1]) if t.std() > 0 and p.std() > 0 else 0.0
            report[f"mae_{name}"] = float(np.mean(np.abs(t - p)))
        per_dim = [report[f"ccc_{n}"] for n in names if f"ccc_{n}" in report]
        report["ccc"] = float(np.mean(per_dim)) if per_dim else float("nan")
        report["n"] = len(y_true)
        return report


@dataclass(frozen=True)
class MultiTask(Task):
    """Categories and dimensions learned together by one model (shared layers, class scores and regression
    outputs side by side). Categories lead: UA is the primary metric that picks epochs and stops runs; CCC
    is reported beside it."""

    name: str = "both"
    primary: str = "ua"
    metrics: tuple[str, ...] = ()
    dimensions: tuple[str, ...] = DIMENSIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", (*Classification().metrics, *_dimension_metrics(self.dimensions)))

    @property
    def headline(self) -> tuple[str, ...]:
        return ("ua", "ccc")

    @property
    def parts(self) -> tuple[Classification, Regression]:
        return CLASSIFICATION, Regression(dimensions=self.dimensions)

    def n_outputs(self, n_classes: int) -> int:
        return n_classes + len(self.dimensions)

    def score(self, y_true: np.ndarray, outputs: np.ndarray, classes: Sequence[str]) -> dict:
        """The classification report on rows with a category, and the dimensions' report beside it."""
        y_true, outputs = np.asarray(y_true), np.asarray(outputs)
        k = len(classes)
        has_class = y_true[:, 0] >= 0
        report = CLASSIFICATION.score(y_true[has_class, 0].astype(np.int64), outputs[has_class, :k], classes)
        dims = self.parts[1].score(y_true[:, 1:], outputs[:, k:])
        return report | {key: value for key, value in dims.items() if key != "n"}


CLASSIFICATION = Classification()
TASKS = {"categorical": CLASSIFICATION, "dimensional": Regression(), "both": MultiTask()}


def task_named(name: str = "categorical", dimensions: Sequence[str] | None = None) -> Task:
    """The task called ``name`` (one of ``TASK_NAMES``), for the ``dimensions`` a corpus labels."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    if name == "categorical" or dimensions is None:
        return TASKS[name]
    return Regression(dimensions=tuple(dimensions)) if name == "dimensional" else MultiTask(dimensions=tuple(dimensions))


def experiment_task(experiment) -> Task:
    """The task of a resolved experiment (``p2pser.partition.experiment.Experiment``)."""
    return task_named(experiment.task, experiment.dimensions)


def task_of_summary(summary: dict) -> Task:
    """The task a run summary was written for (its ``task`` field; older summaries are categorical)."""
    return TASKS.get(summary.get("task", "categorical"), CLASSIFICATION)
