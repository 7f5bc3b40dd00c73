"""What is learned and how it is scored: a task names its metrics and its one primary metric.

Training (best-epoch choice), the stop rule, metrics rows, summaries, sweeps and plots all ask the task for
the metric they need instead of spelling ``"ua"``: a regression task (arousal, valence, dominance scored by
CCC) then flows through the same code as classification.

Metric keys in rows and summaries are built here and nowhere else:

- a metrics row has ``val_<primary>`` and ``test_<metric>`` for every metric of the task (``val_ua``,
  ``test_ua``, ``test_wa``, ``test_macro_f1`` for classification);
- a run summary has ``<primary>_mean``, ``<primary>_min``, ``<primary>_max`` over the peers and
  ``<primary>_average_model`` (``ua_mean`` ... for classification).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from p2pser.learn.metrics import classification_report, concordance_cc


@dataclass(frozen=True)
class Task:
    """The common part of every task: the metric names and the keys derived from them."""

    name: str
    primary: str  # the metric that chooses epochs, stops runs and heads tables; higher is better
    metrics: tuple[str, ...]  # every scalar metric ``score`` returns, the primary first

    def val_key(self) -> str:
        """Row key of the validation score that model selection and the stop rule watch."""
        return f"val_{self.primary}"

    def test_key(self, metric: str | None = None) -> str:
        """Row key of a test metric (the primary one by default)."""
        return f"test_{metric or self.primary}"

    def summary_key(self, statistic: str) -> str:
        """Summary key of a statistic over peers: ``mean``, ``min``, ``max``, ``average_model``,
        ``mean_per_round``."""
        return f"{self.primary}_{statistic}"

    def test_row(self, report: dict) -> dict[str, float]:
        """The test metrics of ``report`` as metrics-row fields."""
        return {self.test_key(m): float(report[m]) for m in self.metrics}

    def label(self) -> str:
        """The primary metric as axis labels and tables print it."""
        return self.primary.upper()


@dataclass(frozen=True)
class Classification(Task):
    """Emotion categories, scored by UA (unweighted average recall: chance is 1/classes whatever the
    class balance), WA (accuracy) and macro-F1."""

    name: str = "categorical"
    primary: str = "ua"
    metrics: tuple[str, ...] = ("ua", "wa", "macro_f1")

    def score(self, y_true: np.ndarray, outputs: np.ndarray, classes: Sequence[str]) -> dict:
        """Full report (confusion matrix and per-class recall included) from class scores ``[N, K]``."""
        predicted = outputs.argmax(axis=1) if len(outputs) else np.zeros(0, dtype=np.int64)
        return classification_report(np.asarray(y_true), predicted.astype(np.int64), classes)


@dataclass(frozen=True)
class Regression(Task):
    """Emotion dimensions (arousal, valence, dominance), scored by the concordance correlation coefficient,
    the measure challenges rank by: it punishes bias and wrong scale, which Pearson's r forgives."""

    name: str = "dimensional"
    primary: str = "ccc"
    metrics: tuple[str, ...] = ("ccc",)
    dimensions: tuple[str, ...] = ("arousal", "valence", "dominance")

    def score(self, y_true: np.ndarray, outputs: np.ndarray, dimensions: Sequence[str] | None = None) -> dict:
        """CCC, Pearson's r and MAE per dimension (``ccc_arousal`` ...), and ``ccc``, their mean over the
        dimensions that are labelled (NaN in ``y_true`` marks an unlabelled value)."""
        names = list(dimensions or self.dimensions)
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
        return report


CLASSIFICATION = Classification()
TASKS = {"categorical": CLASSIFICATION, "dimensional": Regression()}


def task_named(name: str = "categorical") -> Task:
    """The task of a run; today every run is categorical (the dimensional task has its metrics here, its
    regression heads and labels come with the dimensional-emotions work)."""
    return TASKS[name]
