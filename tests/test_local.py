"""LocalTrainer: learns, is deterministic by seed, resumes from its state_dict, rejects bad settings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from p2pser.errors import UserError
from p2pser.learn.models import build_model
from p2pser.learn.trainer import (
    LocalTrainer,
    TrainConfig,
    augment,
    class_weights,
    evaluate,
    predict,
    recommended_config,
)

C, T, K = 16, 48, 4


def _data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class k raises channels 4k..4k+3: separable, but only after training."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % K
    x = rng.normal(size=(n, C, T)).astype(np.float32)
    for k in range(K):
        x[y == k, 4 * k : 4 * k + 4] += 1.0
    return x, y


def _trainer(model_name: str = "cnn1d-shallow", seed: int = 0, **cfg) -> LocalTrainer:
    x, y = _data()
    model = build_model(model_name, C, T, K, seed=seed)
    return LocalTrainer(model, x, y, K, TrainConfig(batch_size=16, **cfg), seed=seed)


@pytest.mark.parametrize("name", ["svm", "cnn1d-shallow"])
def test_training_learns_a_separable_task(name):
    trainer = _trainer(name, epochs=6, **({"lr": 0.02} if name == "svm" else {}))
    x, y = _data(seed=1)
    before = evaluate(trainer.model, x, y, list("abcd"))["ua"]
    losses = [trainer.train_epoch() for _ in range(6)]
    after = evaluate(trainer.model, x, y, list("abcd"))["ua"]
    assert losses[-1] < losses[0]
    assert after > 0.9 > before
    assert trainer.step == 6 * trainer.steps_per_epoch == 6 * (96 // 16)


def test_same_seed_same_run_even_when_interleaved():
    a, b, c = _trainer(seed=3), _trainer(seed=3), _trainer(seed=4)
    # Interleaving a and c in one process must not change a's run: each trainer owns its RNG streams.
    la = [a.train_steps(2), c.train_steps(3), a.train_steps(2)]
    lb = [b.train_steps(4)]
    assert np.mean([la[0], la[2]]) == pytest.approx(lb[0])
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_state_dict_resumes_exactly_and_loads_without_pickle_objects():
    full = _trainer(seed=5)
    full.train_steps(9)
    full.train_steps(4)

    first = _trainer(seed=5)
    first.train_steps(9)
    buf = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "trainer": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # the safe loader: plain tensors and containers only
    resumed = _trainer(seed=99)  # a different seed: everything must come from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["trainer"])
    resumed.train_steps(4)
    sf, sr = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert resumed.step == 13 and resumed.epoch == full.epoch


def test_averaging_into_the_model_keeps_the_optimizer_bound():
    # What a gossip peer does between train_steps: load averaged weights in place.
    trainer = _trainer(seed=0)
    trainer.train_steps(2)
    zeros = {k: torch.zeros_like(v) for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(zeros)
    trainer.train_steps(1)
    assert any(v.abs().sum() > 0 for v in trainer.model.state_dict().values())


def test_schedule_warms_up_and_decays():
    trainer = _trainer(epochs=10, lr=0.01, warmup=0.1)
    total = trainer.total_steps
    assert trainer.lr_at(0) < trainer.lr_at(int(0.1 * total)) == pytest.approx(0.01)
    assert trainer.lr_at(total - 1) < 0.001
    assert trainer.lr_at(10 * total) == pytest.approx(0.01 * trainer.cfg.min_lr_ratio)


def test_augment_masks_and_shifts_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.ones(8, 20, 50)
    out = augment(x, TrainConfig(time_shift=0.2, freq_masks=2, freq_mask_frac=0.2, time_masks=2))
    assert out.shape == x.shape
    assert (out == 0).any() and (out == 1).any()
    assert torch.equal(augment(x, TrainConfig(specaugment=False, time_shift=0.0)), x)


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    assert w[3] == 0 and w[0] < w[2] < w[1]
    assert w[:3].mean() == pytest.approx(1.0)
    weighted = np.bincount([0, 0, 0, 1, 2, 2], minlength=4) * w
    assert weighted[0] == pytest.approx(weighted[1]) == pytest.approx(weighted[2])


def test_predict_restores_training_mode_and_handles_batches():
    trainer = _trainer()
    x, _ = _data(n=37)
    trainer.model.train()
    pred = predict(trainer.model, x, batch_size=10)
    assert pred.shape == (37,) and pred.dtype == np.int64 and trainer.model.training


@pytest.mark.parametrize(
    ("setting", "match"),
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"optimizer": "lion"}, "optimizer"),
     ({"label_smoothing": 1.0}, "label_smoothing"), ({"time_shift": 2.0}, "time_shift")],
)
def test_bad_settings_are_user_errors(setting, match):
    with pytest.raises(UserError, match=match):
        TrainConfig(**setting)


def test_recommended_config_applies_the_model_recipe_then_overrides():
    assert recommended_config("svm").specaugment is False
    assert recommended_config("cnn2d").specaugment is True
    assert recommended_config("svm", lr=0.5, epochs=None).lr == 0.5
    with pytest.raises(UserError, match="unknown training settings"):
        recommended_config("svm", learning_rate=0.1)


def test_bad_arrays_are_rejected():
    model = build_model("svm", C, T, K)
    x, y = _data()
    with pytest.raises(ValueError):
        LocalTrainer(model, x[:, 0], y, K, TrainConfig(), seed=0)
    with pytest.raises(ValueError):
        LocalTrainer(model, x, y + K, K, TrainConfig(), seed=0)
