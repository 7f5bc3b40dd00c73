"""Every registered model: shapes, a training step that lowers the loss, deterministic init, bad names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from p2pser.errors import UserError
from p2pser.learn.models import MODEL_NAMES, build_model, count_parameters, frame_mask

C, T, K = 40, 120, 6


def _batch(seed: int = 0, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, T, generator=g)
    x[: n // 2, :, T // 2 :] = 0.0  # half the batch zero-padded like short utterances
    return x, torch.arange(n) % K


def _loss(model: torch.nn.Module, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model.loss_kind == "hinge":
        return F.multi_margin_loss(scores, y)
    return F.cross_entropy(scores, y)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_size(name):
    model = build_model(name, C, T, K, seed=0)
    x, _ = _batch()
    assert model(x).shape == (x.shape[0], K)
    assert model.loss_kind in ("ce", "hinge")
    assert 200 <= count_parameters(model) <= 1_000_000
    # other lengths work too: utterance statistics / attention pool over time
    assert model(torch.randn(2, C, 37)).shape == (2, K)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_step_lowers_the_loss_on_a_fixed_batch(name):
    model = build_model(name, C, T, K, seed=1)
    model.eval()  # no dropout: the same function before and after the step
    x, y = _batch(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _loss(model, model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = _loss(model, model(x), y)
    assert after < before


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seed_fixes_initial_weights_without_touching_global_rng(name):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(name, C, T, K, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model(name, C, T, K, seed=7)
    c = build_model(name, C, T, K, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_no_batchnorm_buffers_to_average(name):
    # Peers average every floating tensor of state_dict(); running statistics would average badly.
    model = build_model(name, C, T, K, seed=0)
    names = set(model.state_dict())
    assert names == {n for n, _ in model.named_parameters()}


def test_svm_functionals_skip_padding():
    # Utterance statistics over real frames only: zero padding must not change the linear model's scores.
    model = build_model("svm", C, T, K, seed=0).eval()
    x = torch.randn(1, C, 80)
    padded = torch.cat([x, torch.zeros(1, C, 40)], dim=2)
    torch.testing.assert_close(model(x), model(padded), atol=1e-5, rtol=1e-5)


def test_frame_mask_marks_zero_frames_as_padding():
    x = torch.randn(2, 3, 5)
    x[0, :, 3:] = 0
    assert frame_mask(x).tolist() == [[True, True, True, False, False], [True] * 5]
    assert frame_mask(torch.zeros(1, 3, 4)).all()  # an all-zero row counts as all real


def test_unknown_model_and_bad_sizes():
    with pytest.raises(UserError, match="unknown model 'resnet'.*svm"):
        build_model("resnet", C, T, K)
    with pytest.raises(UserError, match="1 output"):
        build_model("cnn1d", C, T, 0)
    assert build_model("cnn1d", C, T, 1)(torch.randn(2, C, T)).shape == (2, 1)  # one dimension: a regression head
