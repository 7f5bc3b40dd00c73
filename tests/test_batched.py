"""Peers stepped together (``p2pser.learn.batched``, ``simulate --batch-peers``) train as they do one by one,
up to floating-point rounding: the same random streams and schedule bit for bit, parameters and losses within
a small tolerance."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from p2pser.learn.batched import group_key, train_steps_together
from p2pser.learn.models import build_model
from p2pser.learn.trainer import LocalTrainer, recommended_config

PEERS = 4
TOL = 1e-5  # losses and optimiser moments
# Parameters: AdamW divides by the root of the second moment, so a rounding difference in a gradient near 0
# moves its parameter by up to a few per cent of the learning rate (2e-3) in the first steps.
PARAM_TOL = 1e-4


def _trainers(name: str, frames: int, **recipe) -> list[LocalTrainer]:
    out = []
    for k in range(PEERS):
        rng = np.random.default_rng(k)
        x = rng.normal(size=(20 + 3 * k, 8, frames)).astype(np.float32)
        y = rng.integers(0, 4, size=len(x))
        model = build_model(name, 8, frames, 4, seed=1)
        cfg = recommended_config(name, batch_size=8, **recipe)
        out.append(LocalTrainer(model, x, y, 4, cfg, seed=100 + k, total_steps=12))
    return out


def _compare(alone: list[LocalTrainer], together: list[LocalTrainer]) -> float:
    worst = 0.0
    for a, b in zip(alone, together, strict=True):
        # The schedule and the random streams: identical.
        assert (a.step, a.epoch, a._pos, a.last_lr_sum) == (b.step, b.epoch, b._pos, b.last_lr_sum)
        assert np.array_equal(a._perm, b._perm)
        assert torch.equal(a._torch_rng, b._torch_rng)
        assert a._np_rng.bit_generator.state == b._np_rng.bit_generator.state
        # Parameters and optimiser state: within rounding.
        for k, p in a.named_parameters.items():
            worst = max(worst, float((p - b.named_parameters[k]).detach().abs().max()))
            sa, sb = a.optimizer.state[p], b.optimizer.state[b.named_parameters[k]]
            assert set(sa) == set(sb)
            for key, value in sa.items():
                assert torch.allclose(value, sb[key], atol=TOL), (k, key)
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
    return worst


@pytest.mark.parametrize(("name", "frames", "recipe"), [
    ("svm", 30, {}),                                  # the fixed-features path, AdamW
    ("mlp", 30, {}),                                  # dropout masks, mixup, augmentation
    ("cnn1d-shallow", 30, {}),                        # convolutions, group norm, pooling
    ("mlp", 1, {"optimizer": "sgd", "momentum": 0.9}),  # Nesterov SGD on utterance-level features
])
def test_steps_together_equal_steps_alone(name, frames, recipe):
    alone = _trainers(name, frames, **recipe)
    together = copy.deepcopy(alone)
    assert len({group_key(t) for t in together}) == 1
    for _ in range(2):  # twice: the second call starts from optimiser state
        expected = [t.train_steps(3) for t in alone]
        got = train_steps_together(together, 3)
        assert np.allclose(got, expected, atol=TOL, rtol=0)
    assert _compare(alone, together) < PARAM_TOL


@pytest.mark.parametrize(("name", "shape", "light"), [
    ("svm", (1, 120, 300), True),             # a head on functionals computed once
    ("mlp", (1, 120, 300), False),            # pools the frames at every step: measured slower batched
    ("mlp", (1, 88, 1), False),
    ("cnn1d-shallow", (1, 120, 300), False),  # convolutions: left to --workers
])
def test_auto_batches_only_models_on_features_computed_once(name, shape, light):
    from p2pser.config import RunConfig
    from p2pser.experiments.simulate import _light

    assert _light(RunConfig(model=name), shape, 8) is light
