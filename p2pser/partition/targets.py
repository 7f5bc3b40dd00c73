"""What a task's targets ``y`` look like, per task name: built from classes and dimensions, which rows can
be learned from, and the groups that stratify hold-outs and label-skewed partitions.

The shapes (the tasks of ``p2pser.learn.tasks`` delegate here, so the data path and the learner agree):

- ``categorical``: int64 ``[N]`` class indices (-1: no category);
- ``dimensional``: float32 ``[N, D]``, one column per labelled dimension, NaN where a value is unknown;
- ``both``: float32 ``[N, 1 + D]``, the class index (-1: none) then the dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from p2pser.audio.corpora import DIMENSIONS
from p2pser.config import TASKS

TASK_NAMES = TASKS  # the config validates --task without importing numpy


def make_targets(task: str, labels: np.ndarray, dims: np.ndarray, dimensions: Sequence[str]) -> np.ndarray:
    """``labels`` int ``[N]`` and ``dims`` ``[N, 3]`` (``DIMENSIONS`` order) -> the task's ``y``."""
    if task == "categorical":
        return np.asarray(labels, dtype=np.int64)
    chosen = np.asarray(dims, dtype=np.float32)[:, [DIMENSIONS.index(d) for d in dimensions]]
    if task == "dimensional":
        return chosen
    return np.column_stack([np.asarray(labels, dtype=np.float32), chosen]).astype(np.float32)


def usable(task: str, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``y`` that carry a label the task learns from."""
    y = np.asarray(y)
    if task == "categorical":
        return y >= 0
    if task == "dimensional":
        return np.isfinite(y.astype(np.float64)).any(axis=1)
    return (y[:, 0] >= 0) | np.isfinite(y[:, 1:].astype(np.float64)).any(axis=1)


def strata(task: str, y: np.ndarray) -> np.ndarray:
    """An int group per row (-1: unusable): the class, or for dimensions alone the tertile of the first
    dimension (rows labelled on other dimensions only form one more group)."""
    y = np.asarray(y)
    if task == "categorical":
        return y.astype(np.int64)
    if task == "both":
        out = y[:, 0].astype(np.int64)
        out[(out < 0) & usable(task, y)] = int(out.max(initial=0)) + 1  # rows with dimensions only
        return out
    first = y[:, 0].astype(np.float64)
    known = np.isfinite(first)
    out = np.full(len(y), -1, dtype=np.int64)
    if known.any():
        edges = np.quantile(first[known], [1 / 3, 2 / 3])
        out[known] = np.searchsorted(edges, first[known], side="right")
    out[~known & usable(task, y)] = 3
    return out
