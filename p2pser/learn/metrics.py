"""Speech emotion recognition metrics: UA, WA, macro-F1, confusion matrices and CCC.

SER papers report unweighted average recall (UA, the mean of per-class recalls) because emotional corpora
are imbalanced; weighted accuracy (WA) is plain accuracy. Everything here is numpy only, so peers and
reports can compute metrics without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_labels(y: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _pair(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    return t, p


def confusion_matrix(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], n_classes: int
) -> np.ndarray:
    """Counts ``[n_classes, n_classes]``: row = true class, column = predicted class."""
    t, p = _pair(y_true, y_pred)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _n_classes(t: np.ndarray, p: np.ndarray) -> int:
    return int(max(t.max(initial=-1), p.max(initial=-1))) + 1


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for classes with no true examples."""
    support = cm.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def unweighted_average_recall(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """UA: mean of per-class recalls over the classes present in ``y_true`` (0.0 for empty input)."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return 0.0
    recalls = per_class_recall(confusion_matrix(t, p, _n_classes(t, p)))
    return float(np.nanmean(recalls))


def weighted_accuracy(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """WA: the fraction of correct predictions (plain accuracy; 0.0 for empty input)."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def macro_f1(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """Mean F1 over classes present in ``y_true`` or ``y_pred``; a class never predicted scores 0."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return 0.0
    cm = confusion_matrix(t, p, _n_classes(t, p))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); defined wherever the class appears at all.
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def concordance_cc(y_true: np.ndarray | Sequence[float], y_pred: np.ndarray | Sequence[float]) -> float:
    """Lin's concordance correlation coefficient for dimensional labels (arousal, valence, dominance)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.size < 2:
        return 0.0
    mt, mp = t.mean(), p.mean()
    cov = ((t - mt) * (p - mp)).mean()
    denom = t.var() + p.var() + (mt - mp) ** 2
    return float(2 * cov / denom) if denom > 0 else 0.0


def classification_report(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], classes: Sequence[str]
) -> dict:
    """UA, WA, macro-F1, per-class recall and the confusion matrix (as lists, JSON-ready)."""
    t, p = _pair(y_true, y_pred)
    cm = confusion_matrix(t, p, len(classes))
    recalls = per_class_recall(cm)
    return {
        "ua": unweighted_average_recall(t, p),
        "wa": weighted_accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "n": int(t.size),
        "classes": list(classes),
        "recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recalls, strict=True)},
        "confusion": cm.tolist(),
    }
