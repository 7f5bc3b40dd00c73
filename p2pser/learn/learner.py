"""The learner seam: what a peer trains, evaluates, snapshots, sends and mixes, behind one interface.

Algorithms, carriers, the codec and checkpoints speak to a ``Learner`` only. ``TorchLearner`` (a torch
model, ``LocalTrainer`` and the peer's data) is the first implementation; a learner that is not a torch
state_dict (an XGBoost ensemble) implements the same methods with its own state and mixing.

Behaviour that cuts across learners wraps one instead of being edited into it: ``LearnerWrapper`` forwards
everything, and a subclass overrides the one method it changes. A Byzantine attacker of an experiment
(``p2pser.exchange.attacks.Attacking``) overrides ``outgoing``; speaker-level differential privacy would
override ``outgoing`` and ``mix`` (clip and noise the change since the last mix).

Example, a wrapper that halves what is sent and leaves the learner itself untouched::

    class Halved(LearnerWrapper):
        def outgoing(self, state, round_):
            return {k: v / 2 for k, v in self.inner.outgoing(state, round_).items()}
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from p2pser.features.normalize import Normalizer
from p2pser.files import write_atomically
from p2pser.learn import evaluation
from p2pser.learn.data import PeerData, SharedStatistics
from p2pser.learn.models import build_model
from p2pser.learn.privacy import PrivacyPlan
from p2pser.learn.tasks import Task
from p2pser.learn.trainer import LocalTrainer, TrainConfig
from p2pser.report.run_folder import MODEL, NORMALIZER, write_json_atomic

State = Mapping[str, np.ndarray]


class Learner(Protocol):
    """What a peer learns with. ``State`` is what crosses the wire: named numpy arrays whose names, shapes
    and dtypes (``template``) every received message is checked against.

    Two optional members serve learners whose state is not a point of one parameter space
    (``p2pser.learn.bagging.BaggingLearner``, tree ensembles): ``averageable = False`` (no consensus distance,
    no average model) and ``check(state)``, which the codec calls on every received state after its own
    checks and which raises ``ValueError`` with the reason for content it refuses. A template dimension of
    ``None`` accepts any size (bytes of varying length)."""

    task: Task
    samples: int  # training examples: the weight of this learner in sample-weighted averages (fedavg)
    template: dict[str, tuple[tuple[int, ...], np.dtype]]
    timings: dict[str, float]  # seconds spent in "train" and "eval", to tell learning from overhead

    def train(self, steps: int, correction: State | None = None) -> float:
        """Run ``steps`` local steps; return the mean training loss. ``correction`` (named like the state)
        is a drift correction applied at every step (gradient tracking)."""

    def step_size(self) -> float:
        """How far the last ``train`` call could move the state per unit of update direction (the sum of
        its learning rates): turns a change of state into an average update direction."""

    def evaluate(self) -> dict[str, float]:
        """Validation and test metrics as row fields (``task.val_key()``, ``task.test_key(m)``)."""

    def snapshot(self) -> dict[str, np.ndarray]:
        """A copy of the shared state (it must not change while being sent)."""

    def load(self, state: State) -> None:
        """Replace the shared state."""

    def mix(self, own: State, own_weight: float, others: Sequence[Any], rule: Any) -> None:
        """Combine ``own`` with the neighbours' contributions by ``rule`` and adopt the result."""

    def outgoing(self, state: State, round_: int) -> State:
        """What is sent of ``state`` in ``round_`` (the state itself for an honest, non-private learner)."""

    def advance_to(self, step: int) -> None:
        """Move the learning-rate schedule to ``step`` local steps (after catching up with neighbours)."""

    def moments(self) -> dict[str, np.ndarray]:
        """Feature moments of the training data (``count``, ``sum``, ``sumsq``) for agreeing on global
        normalisation statistics; ``moments_template`` describes them for the codec."""

    def adopt_moments(self, moments: State) -> None:
        """Standardise inputs with the statistics of these (averaged) moments from now on."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume: tensors, arrays and plain containers (no pickled objects)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Load what ``checkpoint_state`` returned."""

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded by this learner (model, features, data size)."""

    def save(self, folder: str | Path, *, durable: bool = True) -> None:
        """Write what the report needs of this learner into the peer's folder (atomically; ``durable``: also
        fsynced, which the simulator skips: 12 ms a file here, 12 s for 1,000 peers)."""

    def privacy(self) -> dict[str, Any]:
        """Metrics-row fields of differential privacy: ``dp_epsilon`` spent so far, and ``dp_exhausted``
        when one more round would exceed the target; empty without DP. (Optional: a learner without it
        has no DP.)"""


class TorchLearner(SharedStatistics):
    """A torch model trained by ``LocalTrainer`` on one peer's data; its float parameters are the state."""

    averageable = True  # said outright: a learner in a worker process answers only for what it has

    def __init__(self, data: PeerData, model_name: str, features: str, train_cfg: TrainConfig, task: Task, *,
                 model_seed: int, trainer_seed: int, total_steps: int, optimizer_state: str = "keep",
                 momentum: float = 0.9, privacy: PrivacyPlan | None = None, dp_seed: int | None = None) -> None:
        """``optimizer_state`` says what becomes of the optimiser's local state when the parameters are
        replaced by a mix: ``keep`` it, ``reset`` it (AdamW moments and momentum restart from zero), or
        ``quasi-global``: plain SGD steps plus ``momentum`` times a momentum buffer that is updated once a
        round from how the *mixed* model moved (Lin et al. 2021, "Quasi-global momentum: accelerating
        decentralized deep learning on heterogeneous data", arXiv:2102.04761), so it follows the
        neighbourhood's direction instead of the peer's own data.

        ``privacy``: train by DP-SGD under this plan (utterance-level DP), noise seeded by ``dp_seed``
        (None: from the OS)."""
        self.data = data
        self.optimizer_state = optimizer_state
        self.momentum = momentum
        self.momentum_buffer: dict[str, np.ndarray] | None = None  # quasi-global momentum, once there is one
        self._round_start: dict[str, np.ndarray] | None = None
        self.task = task
        self.model_name = model_name
        self.features = features
        _, channels, frames = data.x_train.shape
        # Every peer starts from the same initial weights (same seed): the usual D-PSGD set-up, and the
        # consensus distance then measures only what training and mixing did.
        # Class scores and, for a task with dimensions, one regression output each: the regression head.
        self.model = build_model(model_name, channels, frames, task.n_outputs(len(data.classes)), seed=model_seed)
        shared = [name for name, t in self.model.state_dict().items() if torch.is_floating_point(t)]
        # DP-SGD may swap modules for per-sample-gradient ones (Opacus's DPGRU: the same names, as aliases of
        # its own parameters): the shared state keeps the original names, looked up after the swap.
        self.trainer = LocalTrainer(self.model, data.x_train, data.y_train, len(data.classes), train_cfg,
                                    seed=trainer_seed, total_steps=total_steps, task=task, privacy=privacy,
                                    dp_seed=dp_seed)
        tensors = self.model.state_dict(keep_vars=True)
        self._float_params = {name: tensors[name].data for name in shared}
        self._last_steps = 0
        self.samples = len(data.y_train)
        self.template = {name: (value.shape, value.dtype) for name, value in self.snapshot().items()}
        self.timings = {"train": 0.0, "eval": 0.0}

    def train(self, steps: int, correction: State | None = None) -> float:
        t0 = time.perf_counter()
        self.begin_train(steps, correction)
        try:
            loss = float(self.trainer.train_steps(steps))
        finally:
            self.trainer.correction = None
        self.timings["train"] += time.perf_counter() - t0
        return loss

    def begin_train(self, steps: int, correction: State | None = None) -> None:
        """What ``train`` does before the trainer's steps (the drift correction, quasi-global momentum's
        round start); the simulator's batched path (``p2pser.learn.batched``) calls it too, then steps many
        learners' trainers together."""
        if self.optimizer_state == "quasi-global":
            self._round_start = self.snapshot()
            if self.momentum_buffer is not None:
                heavy_ball = {k: self.momentum * v for k, v in self.momentum_buffer.items()}
                correction = heavy_ball if correction is None else {
                    k: correction[k] + heavy_ball[k] for k in heavy_ball}
        self.trainer.correction = None if correction is None else {
            name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in correction.items()
            if name in self.trainer.named_parameters}
        self._last_steps = steps

    def step_size(self) -> float:
        return self.trainer.last_lr_sum

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        data, task = self.data, self.task
        row: dict[str, float] = {}
        if len(data.y_val):
            value = task.score(data.y_val, evaluation.scores(self.model, data.x_val), data.classes)[task.primary]
            # CCC needs two labelled values: a peer holding back fewer has no validation score to report.
            if np.isfinite(value):
                row[task.val_key()] = value
        if len(data.y_test):
            report = task.score(data.y_test, evaluation.scores(self.model, data.test_inputs()), data.classes)
            row.update(task.test_row(report))
        self.timings["eval"] += time.perf_counter() - t0
        return row

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().copy() for name, t in self._float_params.items()}

    def load(self, state: State) -> None:
        with torch.no_grad():
            for name, t in self._float_params.items():
                t.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))

    def mix(self, own: State, own_weight: float, others: Sequence[Any], rule: Any) -> None:
        self.adopt_mix(rule.mix(own, own_weight, others) if others else None)

    def adopt_mix(self, mixed: State | None) -> None:
        """The rest of ``mix`` once the rule has combined the states: adopt ``mixed`` (None: nobody was
        heard), then treat the optimiser's state as ``optimizer_state`` says. The simulator's learner workers
        call this with a mix made in the main process, where the neighbours' models already are (instead of
        sending them all to the worker: ``p2pser.carriers.workers``)."""
        if mixed is not None:
            self.load(mixed)
        if self.optimizer_state == "reset":
            self.trainer.optimizer.state.clear()
        elif self.optimizer_state == "quasi-global" and self._round_start is not None:
            size = self.trainer.last_lr_sum
            if size > 0:
                now = self.snapshot()
                move = {k: (self._round_start[k] - now[k]) / size for k in now}
                old = self.momentum_buffer or {k: np.zeros_like(v) for k, v in move.items()}
                self.momentum_buffer = {k: (self.momentum * old[k] + (1 - self.momentum) * move[k]).astype(np.float32)
                                      for k in move}
            self._round_start = None

    def outgoing(self, state: State, round_: int) -> State:
        return state

    def advance_to(self, step: int) -> None:
        self.trainer.step = max(self.trainer.step, step)

    def _inputs_changed(self) -> None:  # SharedStatistics: the agreed statistics were adopted
        self.trainer.set_inputs(self.data.x_train)

    def checkpoint_state(self) -> dict[str, Any]:
        state = {"model": dict(self.model.state_dict()), "trainer": self.trainer.state_dict()}
        if self.momentum_buffer is not None:
            state["quasi_global"] = dict(self.momentum_buffer)
        if self.data.mode == "global" and self.data.raw is None:  # statistics agreed: a restart keeps them
            state["normalizer"] = {"mean": self.data.normalizer.mean, "std": self.data.normalizer.std}
        return state

    def restore(self, state: dict[str, Any]) -> None:
        model = {k: torch.as_tensor(np.ascontiguousarray(v)) if not isinstance(v, torch.Tensor) else v
                 for k, v in state["model"].items()}
        self.model.load_state_dict(model)
        self.trainer.load_state_dict(state["trainer"])
        self.momentum_buffer = state.get("quasi_global")
        if "normalizer" in state and self.data.raw is not None:
            self.data.adopt(Normalizer(state["normalizer"]["mean"], state["normalizer"]["std"]))
            self.trainer.set_inputs(self.data.x_train)

    def privacy(self) -> dict[str, Any]:
        dp = self.trainer.dp
        if dp is None:
            return {}
        return dp.accountant.row() | ({"dp_exhausted": True} if dp.accountant.would_exceed(self._last_steps) else {})

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_name, "features": self.features, "samples": self.samples,
                "task": self.task.name}

    def save(self, folder: str | Path, *, durable: bool = True) -> None:
        """``model.npz`` (the shared parameters, no pickle) and ``normalizer.json`` (the statistics the
        model's inputs were standardised with): what the report needs to score the average model."""
        state = self.snapshot()
        write_atomically(Path(folder) / MODEL, lambda fh: np.savez(fh, **state), durable=durable)
        write_json_atomic(Path(folder) / NORMALIZER, self.data.normalizer.to_dict())


class LearnerWrapper:
    """Forwards every ``Learner`` method to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Learner) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        # Attributes and methods not overridden (task, samples, template, data, model ...) are the inner
        # learner's; only called for names this wrapper does not define.
        return getattr(self.inner, name)

    def outgoing(self, state: State, round_: int) -> State:
        return self.inner.outgoing(state, round_)

    def mix(self, own: State, own_weight: float, others: Sequence[Any], rule: Any) -> None:
        self.inner.mix(own, own_weight, others, rule)
