"""Per-channel standardisation of features, in three modes (``--normalizer``):

- ``speaker``: every speaker's features standardised with that speaker's own statistics, in training and
  test alike. It needs no labels, only the speaker's own audio: on a device that is its user's speech, and
  for the test speakers it is their own unlabelled test audio. It removes most of what makes one speaker's
  features differ from another's (vocal tract, microphone, level), which is what a peer holding one speaker
  cannot otherwise learn to ignore.
- ``global``: the statistics of all training data; decentralized peers agree on them by gossiping
  (count, sum, sum of squares) before training (``p2pser.exchange.algorithms.agree_statistics``).
- ``local``: each peer its own training data's statistics (a pooled model: all training data).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pser.errors import UserError


class Normalizer:
    """Per-channel mean/std standardisation. Fit it on training data only (a peer: its own data only)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, lengths: np.ndarray | None = None) -> Normalizer:
        """Statistics over all frames of ``x`` [N, C, T], or only the valid ones when ``lengths`` is given."""
        if x.ndim != 3 or x.shape[0] == 0:
            raise ValueError(f"Normalizer.fit needs a non-empty [N, C, T] array, got shape {x.shape}")
        mask = np.ones((x.shape[0], x.shape[2]), dtype=bool) if lengths is None else _valid_mask(x, lengths)
        weights = mask[:, None, :].astype(np.float64)
        count = max(float(mask.sum()), 1.0)
        mean = (x * weights).sum(axis=(0, 2)) / count
        var = (((x - mean[None, :, None]) ** 2) * weights).sum(axis=(0, 2)) / count
        std = np.sqrt(var)
        return cls(mean, np.where(std < 1e-6, 1.0, std))  # a constant channel stays centred, not blown up

    def apply(self, x: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Standardised float32 copy of ``x`` [..., C, T]; with ``lengths`` padding frames become exactly 0."""
        out = ((x - self.mean[:, None]) / self.std[:, None]).astype(np.float32)
        if lengths is not None:
            out *= _valid_mask(out, lengths)[:, None, :]
        return out

    @classmethod
    def identity(cls, channels: int) -> Normalizer:
        """Leaves inputs as they are (features already standardised per speaker)."""
        return cls(np.zeros(channels), np.ones(channels))

    @classmethod
    def from_moments(cls, moments: dict[str, np.ndarray]) -> Normalizer:
        """From (frame count, per-channel sum, per-channel sum of squares), e.g. averaged over peers."""
        count = max(float(np.asarray(moments["count"]).reshape(-1)[0]), 1e-12)
        mean = np.asarray(moments["sum"], dtype=np.float64) / count
        var = np.maximum(np.asarray(moments["sumsq"], dtype=np.float64) / count - mean**2, 0.0)
        std = np.sqrt(var)
        return cls(mean, np.where(std < 1e-6, 1.0, std))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalizer:
        try:
            mean = np.asarray(values["mean"], dtype=np.float64)
            std = np.asarray(values["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"normalizer statistics need numeric lists 'mean' and 'std' ({exc})") from exc
        if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and (std > 0).all()):
            raise UserError("normalizer statistics 'mean' and 'std' must be equal-length lists, std > 0")
        return cls(mean, std)


def _valid_mask(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[N, T] True where frame t < lengths[n]."""
    return np.arange(x.shape[-1])[None, :] < np.asarray(lengths)[:, None]


def moments(x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """(frame count, per-channel sum, per-channel sum of squares) over the valid frames of ``x`` [N, C, T], in
    float64: what peers average to agree on the statistics of all their data without showing any of it."""
    mask = _valid_mask(x, lengths)[:, None, :]
    xs = np.where(mask, x, 0.0).astype(np.float64)
    return {"count": np.array([float(mask.sum())]), "sum": xs.sum(axis=(0, 2)), "sumsq": (xs**2).sum(axis=(0, 2))}


def standardize_by_speaker(x: np.ndarray, lengths: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """``x`` with every speaker's rows standardised by that speaker's own statistics (padding stays 0)."""
    out = np.empty_like(x, dtype=np.float32)
    speakers = np.asarray(speakers)
    for speaker in np.unique(speakers):
        idx = np.flatnonzero(speakers == speaker)
        out[idx] = Normalizer.fit(x[idx], lengths[idx]).apply(x[idx], lengths[idx])
    return out
