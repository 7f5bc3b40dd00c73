"""Local training: minibatch SGD on one peer's (or the pooled) features, with SER augmentation.

``LocalTrainer`` is the one training loop of the project: the centralized baseline calls ``train_epoch``
and gossip peers alternate ``train_steps(k)`` with loading a neighbour average into the model. It keeps
the model a plain ``nn.Module``; averaging must copy into the existing tensors (``model.load_state_dict``
does), so the optimizer keeps pointing at the live parameters.

Randomness (shuffling, augmentation, dropout) comes from the trainer's own generators, seeded once, so the
same seed gives the same run even when many trainers share one process (the simulator).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from p2pser.errors import UserError
from p2pser.learn.losses import REGRESSION_LOSSES, TaskLoss
from p2pser.learn.privacy import DPSGD, PrivacyPlan
from p2pser.learn.tasks import CLASSIFICATION, Task

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
GROUP_TAKE = 8  # DP-SGD by speaker: utterances a sampled speaker contributes to one step


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training; the defaults suit every model of the registry."""

    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"  # "adamw" or "sgd" (with Nesterov momentum)
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # "cosine" (linear warm-up, then cosine decay) or "constant"
    warmup: float = 0.05  # fraction of the total steps spent warming up the learning rate
    min_lr_ratio: float = 0.02  # the cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 5.0  # max global gradient norm; 0 disables
    class_weighted: bool = True  # weight the loss by inverse class frequency (imbalanced corpora)
    label_smoothing: float = 0.1  # cross-entropy models only
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixup of inputs and losses; 0 disables
    specaugment: bool = True  # random frequency (channel) and time masks
    freq_masks: int = 2
    freq_mask_frac: float = 0.15  # widest frequency mask as a fraction of the channels
    time_masks: int = 2
    time_mask_frac: float = 0.1  # widest time mask as a fraction of the frames
    time_shift: float = 0.1  # random circular shift of up to this fraction of the frames; 0 disables
    regression_loss: str = "ccc"  # dimensions: "ccc" (1 - CCC per batch) or "mse" (p2pser.learn.losses)

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> UserError:
            return UserError(f"training setting {key}={getattr(self, key)!r} is invalid: {want}")

        for key in ("epochs", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "use an integer >= 1")
        for key in ("freq_masks", "time_masks"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise bad(key, "use an integer >= 0")
        if not self.lr > 0:
            raise bad("lr", "use a learning rate > 0")
        for key in ("weight_decay", "grad_clip", "mixup_alpha"):
            if not getattr(self, key) >= 0:
                raise bad(key, "use a value >= 0")
        for key in ("momentum", "warmup", "min_lr_ratio", "freq_mask_frac", "time_mask_frac", "time_shift"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(key, "use a value between 0 and 1")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "use a value in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise bad("regression_loss", f"choose one of {', '.join(REGRESSION_LOSSES)}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# Where a model trains best away from TrainConfig's defaults (measured on RAVDESS and EmoDB folds): the
# linear model wants a larger step, and augmentation that helps CNNs only blurs its utterance statistics.
_RECIPES: dict[str, dict[str, Any]] = {
    "svm": {"lr": 0.02, "mixup_alpha": 0.0, "specaugment": False, "time_shift": 0.0},
}


def recommended_config(model_name: str, **overrides: Any) -> TrainConfig:
    """TrainConfig for ``model_name``: the defaults, the model's recipe, then ``overrides`` (None = unset)."""
    values = dict(_RECIPES.get(model_name, {}))
    unknown = sorted(set(overrides) - set(TrainConfig.keys()))
    if unknown:
        raise UserError(f"unknown training settings {unknown}; known: {', '.join(TrainConfig.keys())}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights with mean 1 over the classes present; absent classes get 0."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes)
    present = counts > 0
    w[present] = 1.0 / counts[present]
    return w * present.sum() / w.sum()


def _band_mask(size: int, n_rows: int, max_width: int, n_masks: int) -> torch.Tensor:
    """``[n_rows, size]`` boolean: ``n_masks`` random bands of width 0..max_width per row."""
    mask = torch.zeros(n_rows, size, dtype=torch.bool)
    if max_width < 1:
        return mask
    ar = torch.arange(size)
    for _ in range(n_masks):
        width = torch.randint(0, max_width + 1, (n_rows, 1))
        start = (torch.rand(n_rows, 1) * (size - width + 1)).long()
        mask |= (ar >= start) & (ar < start + width)
    return mask


def augment(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Random circular time shift and SpecAugment masks on a batch ``[B, C, T]`` (global torch RNG)."""
    b, c, t = x.shape
    if cfg.time_shift > 0 and t > 1:
        reach = int(cfg.time_shift * t)
        shift = torch.randint(-reach, reach + 1, (b, 1))
        idx = (torch.arange(t) - shift) % t
        x = x.gather(2, idx.unsqueeze(1).expand(b, c, t))
    if cfg.specaugment:
        # Features are normalised to zero mean per channel, so 0 is the neutral fill value.
        freq = _band_mask(c, b, int(cfg.freq_mask_frac * c), cfg.freq_masks)
        time = _band_mask(t, b, int(cfg.time_mask_frac * t), cfg.time_masks)
        x = x.masked_fill(freq.unsqueeze(2) | time.unsqueeze(1), 0.0)
    return x


@dataclass
class Batch:
    """One step's inputs ``x`` and targets ``y``; with mixup, ``x`` mixes each row with row ``other`` and
    the loss weighs the two labels by ``lam`` and ``1 - lam``."""

    x: torch.Tensor
    y: torch.Tensor
    lam: float = 1.0
    other: torch.Tensor | None = None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying norm gains and biases only pulls them toward 0 and hurts; decay the weight matrices alone.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class LocalTrainer:
    """Trains ``model`` on ``x`` ``[N, C, T]`` float32 and targets ``y`` in minibatch steps: class indices
    ``[N]``, or for a dimensional or multi-task ``task`` the float matrix of ``p2pser.learn.tasks``.

    Steps cycle over epochs, each a fresh shuffle; the last incomplete batch of an epoch is dropped (its
    utterances are seen in other epochs). ``total_steps`` sets the length of the learning-rate schedule
    (default ``cfg.epochs * steps_per_epoch``); after it the rate stays at its final value.
    """

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        cfg: TrainConfig,
        *,
        seed: int,
        total_steps: int | None = None,
        task: Task = CLASSIFICATION,
        privacy: PrivacyPlan | None = None,
        groups: np.ndarray | None = None,
        dp_seed: int | None = None,
    ) -> None:
        x = np.asarray(x)
        y = np.asarray(y)
        categorical = task.name == "categorical"
        if x.ndim != 3 or y.ndim != (1 if categorical else 2) or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"need x [N, C, T] and {task.name} targets with N > 0 rows, got {x.shape} and {y.shape}")
        classes = y if categorical else (y[:, 0].astype(np.int64) if task.name == "both" else None)
        if classes is not None:
            known = classes[classes >= 0]
            if (categorical and classes.min() < 0) or (len(known) and known.max() >= n_classes):
                raise ValueError(f"labels must lie in [0, {n_classes}), got {classes.min()}..{classes.max()}")
        self.model = model
        self.cfg = cfg
        self.n_classes = n_classes
        self.loss_kind = getattr(model, "loss_kind", "ce")
        self._x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self._y = torch.from_numpy(y.astype(np.int64) if categorical else y.astype(np.float32))
        self._fixed = self._fixed_features()
        self._n = int(y.shape[0])
        self._batch = min(cfg.batch_size, self._n)
        self.steps_per_epoch = self._n // self._batch
        self.total_steps = int(total_steps) if total_steps is not None else cfg.epochs * self.steps_per_epoch
        self._weight = (
            torch.as_tensor(class_weights(classes[classes >= 0], n_classes), dtype=torch.float32)
            if cfg.class_weighted and privacy is None and classes is not None and (classes >= 0).any() else None
        )
        self._task_loss = TaskLoss(task.name, n_classes, weight=self._weight, hinge=self.loss_kind == "hinge",
                                   label_smoothing=cfg.label_smoothing, regression_loss=cfg.regression_loss)
        if privacy is not None and not categorical:
            # DP-SGD clips each utterance's gradient: a CCC loss is a statistic of the whole batch, not a sum
            # over utterances, so it has none.
            raise UserError(f"--dp {privacy.mode} trains emotion categories only (--task categorical): the "
                            f"{task.name} task's loss is not a sum over utterances")
        # DP-SGD: per-unit clipping and noise; the model is prepared in place (same parameter names).
        self.dp = None if privacy is None else DPSGD(model, privacy, expected_units=self._expected_units(
            privacy, groups), seed=dp_seed)
        self._groups = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
        param_groups = _param_groups(model, cfg.weight_decay)
        if cfg.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr)
        else:
            self.optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        self.step = 0
        self.epoch = 0
        # A drift correction (gradient tracking, p2pser.exchange.algorithms.kgt): after every optimiser step
        # each named parameter also moves by -lr * correction. None: plain local training.
        self.correction: dict[str, torch.Tensor] | None = None
        self.named_parameters = dict(model.named_parameters())
        self.last_lr_sum = 0.0  # sum of the learning rates of the last train_steps call
        self._np_rng = np.random.default_rng(seed)
        self._perm = self._np_rng.permutation(self._n)
        self._pos = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._torch_rng = torch.get_rng_state()

    def set_inputs(self, x: np.ndarray) -> None:
        """Replace the training inputs by a re-standardised version of the same utterances (same order)."""
        x = np.asarray(x)
        if x.shape[0] != self._n:
            raise ValueError(f"new inputs have {x.shape[0]} rows, the trainer has {self._n}")
        self._x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self._fixed = self._fixed_features()

    def _fixed_features(self) -> torch.Tensor | None:
        """Every training utterance's features through the model's parameter-free front (the linear SVM's
        functionals), computed once instead of at every step, when nothing random changes the inputs
        between steps (no augmentation, no mixup, so no random numbers are drawn for them either). Each row
        is bit-identical to what the step would compute on its batch; None for other models and recipes."""
        cfg = self.cfg
        if not (hasattr(self.model, "fixed_features") and hasattr(self.model, "from_features")):
            return None
        if cfg.time_shift > 0 or cfg.specaugment or cfg.mixup_alpha > 0:
            return None
        with torch.no_grad():
            return torch.cat([self.model.fixed_features(self._x[i : i + 256]) for i in range(0, len(self._x), 256)])

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based) under the configured schedule."""
        cfg = self.cfg
        if cfg.schedule == "constant":
            return cfg.lr
        warm = int(cfg.warmup * self.total_steps)
        if step < warm:
            return cfg.lr * (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _next_batch(self) -> np.ndarray:
        if self._pos + self._batch > self._n:
            self._perm = self._np_rng.permutation(self._n)
            self._pos = 0
            self.epoch += 1
        idx = self._perm[self._pos : self._pos + self._batch]
        self._pos += self._batch
        return idx

    def _loss(self, scores: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction == "mean":
            return self._task_loss(scores, y)
        # Per utterance (DP-SGD; categories only, checked at construction).
        if self.loss_kind == "hinge":
            return F.multi_margin_loss(scores, y, weight=self._weight, reduction=reduction)
        return F.cross_entropy(scores, y, weight=self._weight, label_smoothing=self.cfg.label_smoothing,
                               reduction=reduction)

    def _expected_units(self, plan: PrivacyPlan, groups: np.ndarray | None) -> float:
        units = self._n if groups is None else len(np.unique(groups))
        return max(plan.sample_rate * units, 1e-9)

    def _poisson_batch(self) -> tuple[np.ndarray, np.ndarray | None]:
        """DP-SGD's sample: each utterance (or group) independently with the plan's rate; rows, and per row
        its group for clipping (None: each row is its own unit)."""
        q = self.dp.plan.sample_rate
        if self._groups is None:
            return np.flatnonzero(self._np_rng.random(self._n) < q), None
        chosen = np.flatnonzero(self._np_rng.random(int(self._groups.max()) + 1) < q)
        idx = [self._np_rng.permutation(np.flatnonzero(self._groups == g))[:GROUP_TAKE] for g in chosen]
        idx = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
        return idx, self._groups[idx]

    def _dp_gradient(self) -> float:
        """One DP-SGD gradient into ``.grad`` (the optimiser then steps as usual); returns the mean loss of
        the sample (nan for an empty one)."""
        idx, groups = self._poisson_batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float("nan")
        if len(idx):
            rows = torch.from_numpy(idx)
            xb, yb = augment(self._x[rows], self.cfg), self._y[rows]
            per = self._loss(self.dp.forward(xb), yb, reduction="none")
            weight = torch.ones(len(idx))
            if groups is not None:  # a group's gradient is the mean of its rows'
                weight = 1.0 / torch.from_numpy(np.bincount(groups)[groups]).float()
            (per * weight).sum().backward()
            loss_value = float(per.detach().mean())
        self.dp.privatize(None if groups is None else torch.from_numpy(groups))
        self.epoch = self.step // max(self.steps_per_epoch, 1)
        return loss_value

    def _one_step(self) -> float:
        if self.dp is not None:
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_value = self._dp_gradient()
            self.optimizer.step()
            self._after_step(lr)
            return loss_value
        batch = self.draw_batch()
        if self._fixed is not None:
            return self._finish_step(self.model.from_features(batch.x), batch.y)
        scores = self.model(batch.x)
        return self._finish_step(scores, batch.y, self.batch_loss(scores, batch))

    def draw_batch(self) -> Batch:
        """The next step's inputs and targets, drawn as the step draws them (the shuffle from the trainer's
        numpy generator; augmentation and mixup from the global torch generator, which ``train_steps``
        holds at the trainer's own state). ``x`` is the fixed features when the model has them.
        ``p2pser.learn.batched`` draws every peer's batch through here too."""
        idx = torch.from_numpy(self._next_batch())
        if self._fixed is not None:
            return Batch(self._fixed[idx], self._y[idx])
        xb, yb = augment(self._x[idx], self.cfg), self._y[idx]
        if self.cfg.mixup_alpha > 0:
            a = torch.tensor(self.cfg.mixup_alpha)
            lam = float(torch.distributions.Beta(a, a).sample())
            lam = max(lam, 1 - lam)  # keep the first utterance dominant: its label is the one we trust most
            other = torch.randperm(xb.shape[0])
            return Batch(lam * xb + (1 - lam) * xb[other], yb, lam, other)
        return Batch(xb, yb)

    def batch_loss(self, scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The step's loss on ``batch``'s scores (mixup's two labels weighted by its ``lam``)."""
        loss = self._loss(scores, batch.y)
        if batch.lam < 1.0:
            loss = batch.lam * loss + (1 - batch.lam) * self._loss(scores, batch.y[batch.other])
        return loss

    def _finish_step(self, scores: torch.Tensor, yb: torch.Tensor, loss: torch.Tensor | None = None) -> float:
        """The optimiser's part of a step, from the batch's scores (and its loss, when mixup made one)."""
        if loss is None:
            loss = self._loss(scores, yb)
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self._after_step(lr)
        return float(loss.detach())

    def _after_step(self, lr: float) -> None:
        if self.correction is not None:
            # In parameter space, after the optimiser: the same as correcting the gradient for plain SGD,
            # and still a correction in the optimiser's own units for AdamW or momentum.
            with torch.no_grad():
                for name, c in self.correction.items():
                    self.named_parameters[name].add_(c, alpha=-lr)
        self.last_lr_sum += lr
        self.step += 1

    def train_steps(self, n: int) -> float:
        """Run ``n`` minibatch steps; return their mean training loss."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.model.train()
        self.last_lr_sum = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._torch_rng)
            losses = [self._one_step() for _ in range(n)]
            self._torch_rng = torch.get_rng_state()
        losses = [v for v in losses if not math.isnan(v)]  # DP-SGD's empty Poisson samples have no loss
        return float(np.mean(losses)) if losses else float("nan")

    def train_epoch(self) -> float:
        """Run ``steps_per_epoch`` steps; return their mean training loss."""
        return self.train_steps(self.steps_per_epoch)

    def state_dict(self) -> dict:
        """Optimizer, RNG and position, for checkpoints: plain tensors and containers only (no pickled objects).

        The model's weights are not included: save ``model.state_dict()`` beside it.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "pos": self._pos,
            "perm": torch.from_numpy(self._perm.copy()),
            "np_rng": self._np_rng.bit_generator.state,
            "torch_rng": self._torch_rng.clone(),
        } | ({} if self.dp is None else {"dp_steps": self.dp.accountant.steps,
                                         "dp_rng": self.dp.generator.get_state()})

    def load_state_dict(self, state: dict) -> None:
        perm = state["perm"].numpy()
        if perm.shape != (self._n,):
            raise ValueError(f"checkpoint was made for {perm.shape[0]} examples, this trainer has {self._n}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self._pos = int(state["step"]), int(state["epoch"]), int(state["pos"])
        self._perm = perm.astype(np.int64)
        self._np_rng.bit_generator.state = state["np_rng"]
        self._torch_rng = state["torch_rng"].clone()
        if self.dp is not None and "dp_steps" in state:
            self.dp.accountant.steps = int(state["dp_steps"])
            self.dp.generator.set_state(state["dp_rng"])


def predict_scores(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class scores ``[N, n_classes]`` in eval mode (no dropout, no augmentation)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
                out.append(model(xb).float().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted class indices ``[N]`` (int64)."""
    scores = predict_scores(model, x, batch_size)
    return scores.argmax(axis=1).astype(np.int64) if len(scores) else np.zeros(0, dtype=np.int64)


def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, classes: Sequence[str], batch_size: int = 256,
    task: Task = CLASSIFICATION,
) -> dict:
    """The task's full report (for classification: UA, WA, macro-F1, confusion) of ``model`` on ``x``, ``y``."""
    return task.score(np.asarray(y), predict_scores(model, x, batch_size), classes)
