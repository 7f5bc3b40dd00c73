"""The average of the peers' models: the one model a decentralized run would hand over, scored on the test set.

``average_model_scores`` scores the average of the final models a run folder holds (every way a run can end);
``AverageModelTracker`` scores it round by round in a simulation, where one process holds every peer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from p2pser.learn.tasks import CLASSIFICATION, Task
from p2pser.report.summary import load_models


def score_state(state: Mapping[str, np.ndarray], model_name: str, seed: int, test_inputs: list[np.ndarray],
                y_test: np.ndarray, classes: list[str], task: Task = CLASSIFICATION) -> float:
    """The primary metric of one set of shared parameters (an average of peers' models) on the test set,
    averaged over the ways peers normalise it (``test_inputs``: one array per normalisation)."""
    return score_state_metrics(state, model_name, seed, test_inputs, y_test, classes, task)[task.primary]


def score_state_metrics(state: Mapping[str, np.ndarray], model_name: str, seed: int,
                        test_inputs: list[np.ndarray], y_test: np.ndarray, classes: list[str],
                        task: Task = CLASSIFICATION) -> dict[str, float]:
    """``score_state`` for every headline metric of the task and, for dimensions, each one's CCC."""
    import torch

    from p2pser.learn.evaluation import scores
    from p2pser.learn.models import build_model

    model = build_model(model_name, test_inputs[0].shape[1], test_inputs[0].shape[2],
                        task.n_outputs(len(classes)), seed=seed)
    params = model.state_dict()
    for k, v in state.items():
        params[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    model.load_state_dict(params)
    reports = [task.score(y_test, scores(model, x), classes) for x in test_inputs]
    names = (*task.headline, *(f"ccc_{d}" for d in task.dimension_names))
    return {m: float(np.mean([r[m] for r in reports])) for m in names if all(m in r for r in reports)}


def spread(items: list, at_most: int = 16) -> list:
    """At most ``at_most`` of ``items``, spread over them: enough for a mean over peers' normalisers, cheap
    with hundreds of peers."""
    return items[:: max(1, len(items) // at_most)]


def average_model_scores(run_dir: Path, model_name: str, seed: int,
                         test: tuple[np.ndarray, np.ndarray, np.ndarray], classes: list[str],
                         task: Task = CLASSIFICATION) -> dict[str, float] | None:
    """The headline metrics of the plain average of all peers' final models: how good the consensus model is.

    Each peer normalises inputs with its own statistics, so the average model is scored under peers'
    normalisers and the scores are averaged: the figure a randomly chosen peer would see with that model.
    """
    from p2pser.features.normalize import Normalizer

    x_test, y_test, lengths = test
    saved = load_models(Path(run_dir))
    if not saved or len(y_test) == 0:
        return None
    names = saved[0][1].keys()
    mean = {k: np.mean([params[k] for _, params, _ in saved], axis=0) for k in names}
    # Peers that standardise alike (the speaker and global modes) need one evaluation, not one each.
    distinct = {json.dumps(norm, sort_keys=True): norm for _, _, norm in spread(saved)}
    inputs = [Normalizer.from_dict(norm).apply(x_test, lengths) for norm in distinct.values()]
    return score_state_metrics(mean, model_name, seed, inputs, y_test, classes, task)


class AverageModelTracker:
    """Sums the peers' parameters at every evaluation round (as each peer records it) and scores their
    average at the end: the per-round curve of the model a run would hand over.

    Memory is one parameter sum per evaluation round, whatever the number of peers.
    """

    def __init__(self, peers: list, model_name: str, seed: int, classes: list[str],
                 task: Task = CLASSIFICATION) -> None:
        self.model_name, self.seed, self.classes, self.task = model_name, seed, classes, task
        self._peers = {p.id: p for p in peers}
        self._sums: dict[int, dict[str, np.ndarray]] = {}
        self._counts: dict[int, int] = {}

    def add(self, peer_id: int, row: dict) -> None:
        if self.task.test_key() not in row:
            return
        round_ = int(row["round"])
        state = self._peers[peer_id].snapshot()
        if round_ not in self._sums:
            self._sums[round_] = {k: v.astype(np.float64) for k, v in state.items()}
            self._counts[round_] = 1
            return
        for k, v in state.items():
            self._sums[round_][k] += v
        self._counts[round_] += 1

    def scores(self) -> dict[int, float]:
        peers = spread(sorted(self._peers.values(), key=lambda p: p.id))
        data = peers[0].learner.data
        if data.mode == "speaker":  # every peer sees the test set alike
            peers = peers[:1]
        if not len(data.y_test):
            return {}
        inputs = [p.learner.data.test_inputs() for p in peers]
        return {r: score_state({k: v / self._counts[r] for k, v in sums.items()}, self.model_name, self.seed,
                               inputs, data.y_test, self.classes, self.task)
                for r, sums in sorted(self._sums.items())}
