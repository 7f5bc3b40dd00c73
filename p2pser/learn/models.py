"""Model zoo for speech emotion recognition on feature sequences, and a registry by name.

Every model takes features ``x`` of shape ``[batch, channels, frames]`` (the layout of
``p2pser.features.spec.FeatureSet.x``) and returns ``[batch, n_outputs]``: class scores, then one regression
output per emotion dimension when the task has them (``p2pser.learn.tasks``: the last linear layer is then
the class head and the regression head side by side, so every model of the registry, and any added to it,
gets a regression head from its output size alone). Models are plain
``nn.Module`` objects whose floating-point ``state_dict()`` tensors are exactly what gossip peers average.

Normalisation is GroupNorm/LayerNorm, never BatchNorm: BatchNorm's running statistics are buffers that
each peer estimates on its own speakers and emotions, and their average under label/speaker skew does not
match any peer's activations. GroupNorm normalises each utterance on its own, so there is nothing to
average but weights. Each model declares the loss it is trained with in ``loss_kind``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from p2pser.config import ENSEMBLE_MODELS, MODELS
from p2pser.errors import UserError

LossKind = str  # "ce" (softmax cross-entropy) or "hinge" (multi-class hinge, Weston-Watkins)


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


def frame_mask(x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` True on real frames of ``x`` ``[B, C, T]``.

    Features are zero-padded to a fixed length after normalisation (``Normalizer.apply`` with lengths), so
    a frame that is exactly 0 in every channel is padding (or a SpecAugment time mask, which pooling may
    skip as well). A row with no such frame, or only such frames, counts as all real.
    """
    mask = x.detach().abs().amax(dim=1) > 0
    return mask | ~mask.any(dim=1, keepdim=True)


def _resize_mask(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The mask of a time axis downsampled to ``frames``: a pooled frame is real if any input frame was."""
    if mask.shape[1] == frames:
        return mask
    return F.adaptive_max_pool1d(mask.float().unsqueeze(1), frames).squeeze(1) > 0


def _stats_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over the real frames of the last axis: ``[B, C, T] -> [B, 2C]``.

    Pooling over padding would make the statistics depend on the utterance's length rather than its sound.
    """
    w = _resize_mask(mask, h.shape[-1]).to(h.dtype).unsqueeze(1)
    n = w.sum(dim=-1)
    mean = (h * w).sum(dim=-1) / n
    var = (((h - mean.unsqueeze(-1)) ** 2) * w).sum(dim=-1) / n
    return torch.cat([mean, (var + 1e-5).sqrt()], dim=1)


class AttentionPool(nn.Module):
    """Softmax attention over time: emotional cues are concentrated in a few frames of an utterance."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # h: [B, T, D]
        scores = self.score(h).squeeze(-1).masked_fill(~_resize_mask(mask, h.shape[1]), float("-inf"))
        w = torch.softmax(scores, dim=1)
        return torch.einsum("bt,btd->bd", w, h)


class LinearSVM(nn.Module):
    """Linear classifier on per-channel mean+std functionals, trained with the multi-class hinge loss.

    This is the classic SER pipeline (utterance functionals + linear SVM) in a form SGD can train and
    peers can average. Inputs are standardised per channel, so the means are O(1); the standard deviations
    enter as logarithms, which keeps them O(1) too.
    """

    loss_kind: LossKind = "hinge"

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.fc = nn.Linear(2 * in_channels, n_classes)

    def fixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """The parameter-free front of the model, ``[B, C, T] -> [B, 2C]``: an utterance's functionals never
        change while the model learns, so callers may compute them once (``p2pser.learn.evaluation``). Each
        row depends on its own utterance alone, bit for bit, whatever else is in the batch."""
        stats = _stats_pool(x, frame_mask(x))
        mean, std = stats[:, : self.in_channels], stats[:, self.in_channels :]
        return torch.cat([mean, std.log()], dim=1)

    def from_features(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.fixed_features(x))


def _conv1d_block(cin: int, cout: int, kernel: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool1d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class CNN1d(nn.Module):
    """Temporal convolutions over feature channels, statistics pooling, a linear head."""

    loss_kind: LossKind = "ce"

    def __init__(
        self, in_channels: int, n_classes: int, widths: tuple[int, ...], kernels: tuple[int, ...], dropout: float
    ) -> None:
        super().__init__()
        blocks, cin = [], in_channels
        for i, (w, k) in enumerate(zip(widths, kernels, strict=True)):
            blocks.append(_conv1d_block(cin, w, k, pool=i < len(widths) - 1))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_stats_pool(self.features(x), frame_mask(x)))


def _conv2d_block(cin: int, cout: int, pool: tuple[int, int]) -> nn.Sequential:
    # Pooling before the ReLU computes the same function (max commutes with a monotone map) on a quarter
    # of the activations, which matters on CPU where these element-wise passes cost as much as the conv.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(_groups(cout), cout),
        nn.MaxPool2d(pool, ceil_mode=True),
        nn.ReLU(inplace=True),
    )


def _conv2d_stem(cout: int) -> nn.Sequential:
    """A strided first convolution: halves both axes without running a full-resolution block."""
    return nn.Sequential(
        nn.Conv2d(1, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU()
    )


class CNN2d(nn.Module):
    """A small VGG-style 2-D CNN over the (channel x frame) image of a spectrogram.

    The frequency bins left after pooling are max-pooled and time is summarised by mean+std statistics
    pooling, so utterances of any length work.
    """

    loss_kind: LossKind = "ce"

    def __init__(self, in_channels: int, n_classes: int, widths: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        blocks, cin = [_conv2d_stem(widths[0])], widths[0]
        for w in widths[1:]:
            blocks.append(_conv2d_block(cin, w, (2, 2)))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * cin, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # [B, W, F', T']
        return self.head(_stats_pool(h.amax(dim=2), frame_mask(x)))


class CRNN(nn.Module):
    """2-D convolutions for local spectral patterns, a bidirectional GRU for their course over time, and
    attention pooling to weight the frames that carry emotion."""

    loss_kind: LossKind = "ce"

    def __init__(
        self, in_channels: int, n_classes: int, widths: tuple[int, ...], hidden: int, dropout: float
    ) -> None:
        super().__init__()
        blocks, cin, freq = [_conv2d_stem(widths[0])], widths[0], -(-in_channels // 2)
        for w in widths[1:]:
            # Time is pooled once more, frequency in every block: the GRU still needs a sequence to read.
            blocks.append(_conv2d_block(cin, w, (2, 2) if len(blocks) < 2 else (2, 1)))
            cin, freq = w, -(-freq // 2)
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Sequential(nn.Linear(cin * freq, 2 * hidden), nn.LayerNorm(2 * hidden), nn.ReLU())
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True, bidirectional=True)
        self.pool = AttentionPool(2 * hidden)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # [B, W, F', T']
        h = h.flatten(1, 2).transpose(1, 2)  # [B, T', W*F']
        h, _ = self.gru(self.proj(h))
        return self.head(self.pool(h, frame_mask(x)))


class MLP(nn.Module):
    """A multi-layer perceptron on one vector per utterance: the functionals of an utterance-level kind
    (eGeMAPS, ComParE: ``frames == 1``) as they are, or a frame-level kind's mean and standard deviation
    over the real frames. Dropout on the input too: 6373 correlated ComParE functionals overfit a few hundred
    utterances otherwise."""

    loss_kind: LossKind = "ce"

    def __init__(self, in_channels: int, n_frames: int, n_classes: int, hidden: tuple[int, ...],
                 dropout: float) -> None:
        super().__init__()
        width = in_channels if n_frames == 1 else 2 * in_channels
        layers: list[nn.Module] = [nn.Dropout(dropout / 2)]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, 0] if x.shape[2] == 1 else _stats_pool(x, frame_mask(x))
        return self.head(self.features(v))


_Factory = Callable[[int, int, int], nn.Module]

_REGISTRY: dict[str, _Factory] = {
    "svm": lambda c, t, k: LinearSVM(c, k),
    "cnn1d-shallow": lambda c, t, k: CNN1d(c, k, widths=(64, 128), kernels=(5, 5), dropout=0.3),
    "cnn1d": lambda c, t, k: CNN1d(c, k, widths=(96, 128, 160, 192), kernels=(5, 5, 3, 3), dropout=0.3),
    "cnn2d": lambda c, t, k: CNN2d(c, k, widths=(16, 32, 64, 128), dropout=0.3),
    "crnn": lambda c, t, k: CRNN(c, k, widths=(16, 32, 64), hidden=64, dropout=0.3),
    "mlp": lambda c, t, k: MLP(c, t, k, hidden=(256, 128), dropout=0.3),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# The config validates names without importing torch; both lists must name the same models (tree ensembles
# are not torch models: p2pser.learn.trees).
assert MODEL_NAMES == tuple(m for m in MODELS if m not in ENSEMBLE_MODELS), (MODEL_NAMES, MODELS)


def build_model(name: str, in_channels: int, n_frames: int, n_classes: int, *, seed: int | None = None) -> nn.Module:
    """Build model ``name`` for inputs ``[B, in_channels, n_frames]`` and ``n_classes`` outputs (class
    scores and regression outputs together: ``Task.n_outputs``).

    With ``seed`` the initial weights are a function of the seed alone (the global torch RNG is left as it
    was), so every peer of a run can start from the same model.
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if in_channels < 1 or n_frames < 1 or n_classes < 1:
        raise UserError(
            f"model {name!r} needs at least 1 feature channel, 1 frame and 1 output "
            f"(got {in_channels} channels, {n_frames} frames, {n_classes} outputs)"
        )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return _REGISTRY[name](in_channels, n_frames, n_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
