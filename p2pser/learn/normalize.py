"""Per-channel standardisation of features, fitted on training data only (a peer: its own data only)."""

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
