"""Gradient-boosted trees (XGBoost) on utterance vectors, and their wire form.

Trees cannot be averaged, so the ``xgb`` model learns differently from the torch models: a peer boosts trees
on its own data, and peers exchange whole ensembles (``p2pser.learn.bagging``). This module is the pure
part: the recipe, fitting, predicting, and turning an ensemble into bytes and back.

The wire form is xgboost's own JSON model format (no pickle). A received model is untrusted input to
xgboost's C++ parser, so ``from_wire`` first parses it with Python's ``json`` and checks every field it
hands on against a whitelist: the objective, the number of classes and features this run has, a bounded
number of trees and nodes, child and parent links inside each tree, split features that exist, finite
numbers. Only then does xgboost load it. Every refusal is an ``EnsembleError`` saying what was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# The recipe, chosen on validation speakers of RAVDESS and EmoDB (benchmarks/bench_ser.py): shallow trees,
# a small step and column subsampling suit a few hundred utterances of 88 to 6373 correlated functionals.
XGB_RECIPE: dict[str, Any] = {
    "objective": "multi:softprob",
    "max_depth": 4,
    "eta": 0.1,
    "subsample": 0.8,
    "colsample_bynode": 0.3,
    "min_child_weight": 1.0,
    "lambda": 1.0,
    "tree_method": "hist",
    "max_bin": 64,
}
XGB_TREES = 200  # boosting rounds of the pooled model, and the most one peer boosts
MAX_TREES = 20_000  # the most trees (boosting rounds x classes) a received ensemble may hold
MAX_NODES = 1 << 12  # per tree: depth 11 at most, far beyond any recipe here


class EnsembleError(ValueError):
    """A received ensemble was refused; the text says why."""


def utterance_vectors(x: np.ndarray) -> np.ndarray:
    """``[N, D]`` float32 inputs for the trees from features ``[N, C, T]``: utterance-level features
    (``T == 1``) as they are; frame-level ones as the mean and standard deviation of each channel over the
    real frames (an all-zero frame is padding, as ``p2pser.learn.models.frame_mask`` says)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[2] == 1:
        return np.ascontiguousarray(x[:, :, 0])
    real = np.abs(x).max(axis=1) > 0  # [N, T]
    real |= ~real.any(axis=1, keepdims=True)
    w = real[:, None, :].astype(np.float32)
    n = w.sum(axis=2)
    mean = (x * w).sum(axis=2) / n
    std = np.sqrt((((x - mean[:, :, None]) ** 2) * w).sum(axis=2) / n + 1e-5)
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def class_balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-utterance weights that give every class present the same total weight (UA is the target)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    per_class = np.where(counts > 0, len(y) / (np.maximum(counts, 1) * max((counts > 0).sum(), 1)), 0.0)
    return per_class[y].astype(np.float32)


def boost(x: np.ndarray, y: np.ndarray, n_classes: int, rounds: int, *, seed: int, init=None,
          threads: int = 1):
    """``rounds`` more boosting rounds on ``x`` ``[N, D]``, ``y`` ``[N]``, continuing ``init`` if given;
    class-balanced sample weights. Returns the booster."""
    import xgboost as xgb

    params = XGB_RECIPE | {"num_class": n_classes, "seed": seed, "nthread": threads, "verbosity": 0}
    data = xgb.DMatrix(x, label=y, weight=class_balanced_weights(y, n_classes), nthread=threads)
    return xgb.train(params, data, num_boost_round=rounds, xgb_model=init)


def probabilities(booster, x: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, K]`` of ``x`` ``[N, D]``."""
    import xgboost as xgb

    return np.asarray(booster.predict(xgb.DMatrix(x, nthread=1)), dtype=np.float64).reshape(len(x), -1)


def to_wire(booster) -> np.ndarray:
    """The ensemble as xgboost JSON bytes in a uint8 array (what crosses the wire and the checkpoint)."""
    return np.frombuffer(bytes(booster.save_raw("json")), dtype=np.uint8).copy()


def from_wire(raw: np.ndarray | bytes, *, n_features: int, n_classes: int):
    """The booster in ``raw`` after ``check_model`` passed; ``EnsembleError`` otherwise."""
    import xgboost as xgb

    blob = bytes(raw)
    try:
        doc = json.loads(blob)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EnsembleError(f"not xgboost JSON ({type(exc).__name__})") from None
    check_model(doc, n_features=n_features, n_classes=n_classes)
    booster = xgb.Booster(params={"nthread": 1})
    try:
        booster.load_model(bytearray(blob))
    except xgb.core.XGBoostError as exc:
        raise EnsembleError(f"xgboost refused the model: {str(exc).splitlines()[0][:200]}") from None
    probe = probabilities(booster, np.zeros((1, n_features), dtype=np.float32))
    if probe.shape != (1, n_classes) or not np.isfinite(probe).all():
        raise EnsembleError(f"the model predicts {probe.shape} non-finite or misshaped probabilities")
    return booster


def _field(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            raise EnsembleError(f"field {'/'.join(path)} is missing")
        doc = doc[key]
    return doc


def _int_text(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EnsembleError(f"{what} is {str(value)[:40]!r}, not an integer") from None


def check_model(doc: Any, *, n_features: int, n_classes: int) -> None:
    """Check an xgboost JSON model (parsed) against this run: every field xgboost will read is checked."""
    learner = _field(doc, "learner")
    if _field(learner, "objective", "name") != "multi:softprob":
        raise EnsembleError(f"objective {str(_field(learner, 'objective', 'name'))[:40]!r}, expected multi:softprob")
    param = _field(learner, "learner_model_param")
    if _int_text(_field(param, "num_class"), "num_class") != n_classes:
        raise EnsembleError(f"the model has {param['num_class']} classes, this run {n_classes}")
    if _int_text(_field(param, "num_feature"), "num_feature") != n_features:
        raise EnsembleError(f"the model reads {param['num_feature']} features, this run has {n_features}")
    if _int_text(_field(param, "num_target"), "num_target") != 1:
        raise EnsembleError("the model has more than one target")
    if _field(learner, "gradient_booster", "name") != "gbtree":
        raise EnsembleError("the booster is not gbtree")
    model = _field(learner, "gradient_booster", "model")
    trees, info = _field(model, "trees"), _field(model, "tree_info")
    if not isinstance(trees, list) or not isinstance(info, list) or not 0 < len(trees) <= MAX_TREES:
        raise EnsembleError(f"a model holds 1 to {MAX_TREES} trees")
    if len(info) != len(trees) or _int_text(_field(model, "gbtree_model_param", "num_trees"), "num_trees") != len(trees):
        raise EnsembleError("tree counts disagree")
    if any(not isinstance(c, int) or not 0 <= c < n_classes for c in info):
        raise EnsembleError("a tree is assigned to a class that does not exist")
    for k, tree in enumerate(trees):
        _check_tree(tree, k, n_features)


_INT_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_type", "default_left")
_FLOAT_ARRAYS = ("split_conditions", "base_weights", "loss_changes", "sum_hessian")


def _check_tree(tree: Any, k: int, n_features: int) -> None:
    if not isinstance(tree, dict):
        raise EnsembleError(f"tree {k} is not an object")
    n = _int_text(_field(tree, "tree_param", "num_nodes"), f"tree {k} num_nodes")
    if not 1 <= n <= MAX_NODES:
        raise EnsembleError(f"tree {k} has {n} nodes, at most {MAX_NODES}")
    arrays: Mapping[str, list] = {name: _field(tree, name) for name in (*_INT_ARRAYS, *_FLOAT_ARRAYS)}
    for name, values in arrays.items():
        if not isinstance(values, list) or len(values) != n:
            raise EnsembleError(f"tree {k}: {name} does not have {n} entries")
    for name in _FLOAT_ARRAYS:
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in arrays[name]):
            raise EnsembleError(f"tree {k}: {name} holds a value that is not a finite number")
    for name in _INT_ARRAYS:
        if any(not isinstance(v, int) or isinstance(v, bool) for v in arrays[name]):
            raise EnsembleError(f"tree {k}: {name} holds a value that is not an integer")
    if any(v != 0 for v in arrays["split_type"]) or _field(tree, "categories"):
        raise EnsembleError(f"tree {k} has categorical splits; this run's features are numerical")
    left, right, parents = arrays["left_children"], arrays["right_children"], arrays["parents"]
    for i in range(n):
        leaf = left[i] == -1
        if leaf != (right[i] == -1):
            raise EnsembleError(f"tree {k}: node {i} has one child")
        if not leaf:
            # Children come after their parent, so links cannot form a cycle.
            if not (i < left[i] < n and i < right[i] < n and left[i] != right[i]):
                raise EnsembleError(f"tree {k}: node {i} links to children outside the tree")
            if parents[left[i]] != i or parents[right[i]] != i:
                raise EnsembleError(f"tree {k}: node {i}'s children name another parent")
            if not 0 <= arrays["split_indices"][i] < n_features:
                raise EnsembleError(f"tree {k}: node {i} splits on feature {arrays['split_indices'][i]}, "
                                    f"which does not exist")


def fit_pooled(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
               *, seed: int, score, every: int = 25):
    """The pooled ``xgb`` baseline: ``XGB_TREES`` boosting rounds on ``[N, D]`` vectors; with validation
    data, the number of rounds (a multiple of ``every``) whose ensemble scores best there (``score(y,
    probabilities)``; ties to the larger). Returns (booster, rounds kept, [(rounds, validation score)])."""
    booster = boost(x_train, y_train, n_classes, XGB_TREES, seed=seed)
    if not len(y_val):
        return booster, XGB_TREES, []
    import xgboost as xgb

    data = xgb.DMatrix(x_val, nthread=1)
    history = [(k, float(score(y_val, booster.predict(data, iteration_range=(0, k)))))
               for k in range(every, XGB_TREES + 1, every)]
    best = max(history, key=lambda h: (h[1], h[0]))[0]
    return booster[:best], best, history


def count_nodes(booster) -> int:
    """Tree nodes of an ensemble: the size figure a summary gives for tree models (torch ones give weights)."""
    return sum(int(t["tree_param"]["num_nodes"])
               for t in json.loads(bytes(booster.save_raw("json")))["learner"]["gradient_booster"]["model"]["trees"])
