"""Many peers' local steps at once: one vectorised forward, backward and optimiser step for a group of peers
whose models share one architecture and training recipe (``p2pser simulate --batch-peers``).

A simulation steps many small models (a linear SVM of 1,928 parameters, an MLP, a shallow CNN) on batches of
16: each step is a few dozen tiny tensor operations whose cost is Python and dispatch, not arithmetic.
Stacking the peers' parameters (``[peers, ...]``) and running the model under ``torch.func.vmap`` does each
operation once for the whole group.

What stays exactly as in ``LocalTrainer.train_steps`` of each peer:

- every peer draws its own batch from its own data with its own generators (``LocalTrainer.draw_batch``
  under the peer's torch random state, then its dropout masks, in the order its own forward would draw
  them), so the random streams, the utterances seen and the augmentation are bit for bit the same;
- the loss is each peer's own (``LocalTrainer.batch_loss``: its class weights, label smoothing, mixup);
- the learning-rate schedule, gradient clipping per peer, AdamW or SGD (Nesterov) with the same formulas as
  ``torch.optim``'s single-tensor path, the drift correction, and the optimiser state, which is written back
  into each peer's own optimiser (checkpoints, ``--optimizer-state reset`` and mixing see it as usual).

What differs: the forward and backward run as batched kernels (a batched matrix product instead of one per
peer, a grouped convolution), whose sums may round differently in the last bits. The parameters therefore
differ from the per-peer path by floating-point noise (measured in BENCHMARKS.md, issue 12), and every
later quantity inherits that noise.

Groups: peers are stepped together when their models have the same class and parameter shapes, their
trainers the same recipe, batch size, input shape, schedule position and optimiser state age (so every
scalar of the optimiser is one Python number for the whole group, as in the per-peer path). Others train
alone through ``train_steps``. DP-SGD trainers and models with modules outside ``SUPPORTED`` are never
batched (``batchable``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from p2pser.learn import models
from p2pser.learn.trainer import Batch, LocalTrainer

# Modules whose forward is a function of their parameters and input alone (or dropout, whose masks are drawn
# per peer here): a model built of these only can run under vmap with stacked parameters.
SUPPORTED = (nn.Sequential, nn.Linear, nn.Conv1d, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.GELU, nn.Tanh,
             nn.MaxPool1d, nn.Dropout, models.LinearSVM, models.CNN1d, models.MLP)


def batchable(trainer: LocalTrainer) -> bool:
    """Whether this trainer's steps can run in a group (no DP-SGD, a model of ``SUPPORTED`` modules, an
    optimiser this module reproduces)."""
    opt = trainer.optimizer
    if trainer.dp is not None or type(opt) not in (torch.optim.AdamW, torch.optim.SGD):
        return False
    if any(g.get("amsgrad") or g.get("maximize") or g.get("dampening", 0) for g in opt.param_groups):
        return False
    return all(type(m) in SUPPORTED for m in trainer.model.modules())


def _state_age(trainer: LocalTrainer) -> tuple:
    """The optimiser state's age, the same for every parameter (all get gradients at every step), or None
    when the parameters disagree (then the trainer trains alone)."""
    opt = trainer.optimizer
    states = [opt.state.get(p) for g in opt.param_groups for p in g["params"]]
    if all(not s for s in states):
        return ("fresh",)
    if any(not s for s in states):
        return None
    if isinstance(opt, torch.optim.AdamW):
        steps = {float(s["step"]) for s in states}
        return ("adamw", steps.pop()) if len(steps) == 1 else None
    have = {s.get("momentum_buffer") is not None for s in states}
    return ("sgd", have.pop()) if len(have) == 1 else None


def group_key(trainer: LocalTrainer) -> tuple | None:
    """Trainers with equal keys step together; None: this one trains alone."""
    if not batchable(trainer):
        return None
    age = _state_age(trainer)
    if age is None:
        return None
    shapes = tuple((n, tuple(p.shape)) for n, p in trainer.named_parameters.items())
    correction = None if trainer.correction is None else tuple(sorted(trainer.correction))
    return (type(trainer.model), shapes, trainer.cfg, trainer._batch, tuple(trainer._x.shape[1:]),
            trainer._fixed is not None, trainer.step, trainer.total_steps, age, correction)


class _Mask(nn.Module):
    """Dropout with a mask drawn outside (per peer, from the peer's own generator): ``x * mask``, as
    ``nn.Dropout`` computes it on CPU (``bernoulli(1 - p) / (1 - p)``). Before any mask is set it records the
    shape it is called with."""

    def __init__(self, p: float, order: list) -> None:
        super().__init__()
        self.p, self.order = p, order
        self.mask: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.shape = tuple(x.shape)
            self.order.append(self)
            return x
        return x * self.mask


class _Call(nn.Module):
    """``model.from_features`` (the fixed-features path) or ``model.forward``, as a module to call."""

    def __init__(self, model: nn.Module, fixed: bool) -> None:
        super().__init__()
        self.m, self.fixed = model, fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.from_features(x) if self.fixed else self.m(x)


class _Program:
    """A copy of a group's model with dropout swapped for given masks, and the masks' order and shapes."""

    def __init__(self, trainer: LocalTrainer) -> None:
        model = copy.deepcopy(trainer.model)
        self.masks: list[_Mask] = []
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Dropout) and child.p > 0:  # p = 0: dropout draws nothing
                    setattr(module, name, _Mask(child.p, self.masks))
                elif isinstance(child, nn.Dropout):
                    setattr(module, name, nn.Identity())
        self.fixed = trainer._fixed is not None
        self.call = _Call(model, self.fixed).train()
        width = trainer._fixed.shape[1:] if self.fixed else trainer._x.shape[1:]
        with torch.no_grad():  # one dry run records where dropout is, in the order the forward meets it
            self.call(torch.zeros(trainer._batch, *width))
        self.names = list(trainer.named_parameters)

    def draw_masks(self) -> list[torch.Tensor]:
        """This step's dropout masks from the global generator (held at a peer's state by the caller)."""
        return [torch.empty(m.shape).bernoulli_(1 - m.p).div_(1 - m.p) for m in self.masks]

    def scores(self, params: dict[str, torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        def one(p, xb, ms):
            for module, mask in zip(self.masks, ms, strict=True):
                module.mask = mask
            try:
                return functional_call(self.call, {"m." + k: v for k, v in p.items()}, (xb,))
            finally:
                for module in self.masks:
                    module.mask = None

        return vmap(one)(params, x, tuple(masks))


_programs: dict[tuple, _Program] = {}


def _program(key: tuple, trainer: LocalTrainer) -> _Program:
    short = key[:6]  # architecture, recipe, batch and input: not the schedule position
    if short not in _programs:
        _programs[short] = _Program(trainer)
    return _programs[short]


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


def _per_peer(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[peers]`` vector shaped to broadcast against ``like`` ``[peers, ...]``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def train_steps_together(trainers: Sequence[LocalTrainer], n: int) -> list[float]:
    """``[t.train_steps(n) for t in trainers]``, vectorised over the trainers (all of one ``group_key``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    first = trainers[0]
    key = group_key(first)
    program = _program(key, first)
    names = program.names
    peers = len(trainers)
    params = {k: _stack([t.named_parameters[k] for t in trainers]).requires_grad_() for k in names}
    opt0 = first.optimizer
    adamw = isinstance(opt0, torch.optim.AdamW)
    group_of = {}  # parameter name -> its param group's index (weight decay or not)
    index = {id(p): k for k, p in first.named_parameters.items()}
    for g, group in enumerate(opt0.param_groups):
        for p in group["params"]:
            group_of[index[id(p)]] = g
    hyper = [dict(g) for g in opt0.param_groups]
    age = key[8]
    state: dict[str, dict[str, torch.Tensor]] = {}
    if age[0] == "adamw":
        state = {k: {s: _stack([t.optimizer.state[t.named_parameters[k]][s] for t in trainers])
                     for s in ("exp_avg", "exp_avg_sq")} for k in names}
        adam_step = age[1]
    elif age[0] == "sgd" and age[1]:
        state = {k: {"momentum_buffer": _stack([t.optimizer.state[t.named_parameters[k]]["momentum_buffer"]
                                                for t in trainers])} for k in names}
    elif adamw:
        state = {k: {"exp_avg": torch.zeros_like(params[k]), "exp_avg_sq": torch.zeros_like(params[k])}
                 for k in names}
        adam_step = 0.0
    correction = None
    if first.correction is not None:
        correction = {k: _stack([t.correction[k] for t in trainers]).to(params[k].dtype) for k in first.correction}
    for t in trainers:
        t.model.train()
        t.last_lr_sum = 0.0
    losses: list[torch.Tensor] = []
    lr = first.lr_at(first.step)
    with torch.random.fork_rng(devices=[]):
        for _ in range(n):
            lr = first.lr_at(first.step)  # the same for the group: same schedule, same position
            batches: list[Batch] = []
            masks: list[list[torch.Tensor]] = []
            for t in trainers:
                torch.set_rng_state(t._torch_rng)
                batches.append(t.draw_batch())
                masks.append(program.draw_masks())
                t._torch_rng = torch.get_rng_state()
            x = torch.stack([b.x for b in batches])
            stacked_masks = [torch.stack(ms) for ms in zip(*masks, strict=True)] if program.masks else []
            scores = program.scores(params, x, stacked_masks)
            step_losses = [t.batch_loss(scores[i], b) for i, (t, b) in enumerate(zip(trainers, batches, strict=True))]
            for p in params.values():
                p.grad = None
            loss = torch.stack(step_losses)
            loss.sum().backward()
            losses.append(loss.detach())
            with torch.no_grad():
                grads = {k: params[k].grad for k in names}
                if first.cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_, per peer
                    norms = torch.stack([torch.linalg.vector_norm(grads[k].reshape(peers, -1), 2, dim=1) for k in names])
                    total = torch.linalg.vector_norm(norms, 2, dim=0)
                    coef = torch.clamp(first.cfg.grad_clip / (total + 1e-6), max=1.0)
                    for k in names:
                        grads[k].mul_(_per_peer(coef, grads[k]))
                if adamw:
                    adam_step += 1
                    _adamw(params, grads, state, hyper, group_of, lr, adam_step)
                else:
                    _sgd(params, grads, state, hyper, group_of, lr)
                if correction is not None:
                    for k, c in correction.items():
                        params[k].add_(c, alpha=-lr)
            for t in trainers:
                t.last_lr_sum += lr
                t.step += 1
    _write_back(trainers, params, state, adamw, adam_step if adamw else None, lr)
    per_peer = torch.stack(losses, dim=1).tolist()
    return [float(np.mean(v)) for v in per_peer]


def _adamw(params, grads, state, hyper, group_of, lr: float, step: float) -> None:
    """``torch.optim.AdamW``'s single-tensor step (``_single_tensor_adam``, decoupled weight decay) on the
    stacked tensors, with the same Python scalars."""
    for k, param in params.items():
        h = hyper[group_of[k]]
        beta1, beta2 = h["betas"]
        grad, exp_avg, exp_avg_sq = grads[k], state[k]["exp_avg"], state[k]["exp_avg_sq"]
        if h["weight_decay"] != 0:
            param.mul_(1 - lr * h["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(h["eps"])
        param.addcdiv_(exp_avg, denom, value=-step_size)


def _sgd(params, grads, state, hyper, group_of, lr: float) -> None:
    """``torch.optim.SGD``'s single-tensor step (momentum, Nesterov, no dampening) on the stacked tensors."""
    for k, param in params.items():
        h = hyper[group_of[k]]
        grad = grads[k]
        if h["weight_decay"] != 0:
            grad = grad.add(param, alpha=h["weight_decay"])
        if h["momentum"] != 0:
            buf = state.get(k, {}).get("momentum_buffer")
            if buf is None:
                buf = grad.detach().clone()
                state[k] = {"momentum_buffer": buf}
            else:
                buf.mul_(h["momentum"]).add_(grad)
            grad = grad.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
        param.add_(grad, alpha=-lr)


def _write_back(trainers, params, state, adamw: bool, adam_step: float | None, lr: float) -> None:
    """Each peer's slice of the stacked parameters and optimiser state back into its own model and
    optimiser, as if it had stepped alone."""
    with torch.no_grad():
        for i, t in enumerate(trainers):
            for k, stacked in params.items():
                p = t.named_parameters[k]
                p.copy_(stacked[i])
                if k not in state:
                    continue
                s = t.optimizer.state[p]
                for name, value in state[k].items():
                    if name in s and s[name] is not None:
                        s[name].copy_(value[i])
                    else:
                        s[name] = value[i].clone()
                if adamw:
                    s["step"] = torch.tensor(adam_step, dtype=torch.get_default_dtype())
            for group in t.optimizer.param_groups:
                group["lr"] = lr


def train_learners(requests: Sequence[tuple[Any, int, Any]]) -> list[float]:
    """``[learner.train(steps, correction) for learner, steps, correction in requests]`` for
    ``TorchLearner`` s, with the trainers of one ``group_key`` (and the same ``steps``) stepped together."""
    for learner, steps, correction in requests:
        learner.begin_train(steps, correction)
    groups: dict[tuple, list[int]] = {}
    for i, (learner, steps, _) in enumerate(requests):
        key = group_key(learner.trainer)
        groups.setdefault(("alone", i) if key is None else (key, steps), []).append(i)
    losses: list[float] = [float("nan")] * len(requests)
    try:
        for members in groups.values():
            t0 = time.perf_counter()
            chosen = [requests[i][0] for i in members]
            steps = requests[members[0]][1]
            if len(members) == 1:
                values = [float(chosen[0].trainer.train_steps(steps))]
            else:
                values = train_steps_together([lr.trainer for lr in chosen], steps)
            share = (time.perf_counter() - t0) / len(members)
            for i, lr, v in zip(members, chosen, values, strict=True):
                losses[i] = v
                lr.timings["train"] += share
    finally:
        for learner, _, _ in requests:
            learner.trainer.correction = None
    return losses
