"""What to extract (FeatureSpec) and what extraction gives back (FeatureSet)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from p2pser.audio.corpora import Utterance
from p2pser.audio.decode import NORMALIZATIONS
from p2pser.errors import UserError
from p2pser.features.kinds import KINDS


@dataclass(frozen=True)
class FeatureSpec:
    """What to extract. ``kind`` is one of KINDS or a '+'-combination such as ``mfcc+chroma``."""

    kind: str = "mfcc"
    sample_rate: int = 16000
    n_mfcc: int = 40
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    max_seconds: float = 4.0  # fixed length T: longer utterances are cropped (from the start), shorter padded
    min_seconds: float = 0.25  # shorter sound (after trimming) is skipped as too short
    trim_db: float | None = 40.0  # trim edges quieter than this many dB below the peak; None keeps them
    normalize: str = "rms"  # per-waveform level: "rms" (to -20 dBFS), "peak" (to full scale) or "none"

    def __post_init__(self) -> None:
        parts = self.parts
        unknown = [p for p in parts if p not in KINDS]
        if unknown or not parts:
            raise UserError(
                f"unknown feature kind {self.kind!r}; known kinds: {', '.join(KINDS)} "
                "(combine with '+', e.g. mfcc+chroma)"
            )
        if len(set(parts)) != len(parts):
            raise UserError(f"feature kind {self.kind!r} names a part twice")
        if len({KINDS[p].level for p in parts}) > 1:
            raise UserError(f"feature kind {self.kind!r} combines frame-level and utterance-level kinds")
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"unknown level normalisation {self.normalize!r}; use one of {NORMALIZATIONS}")
        if not 4000 <= self.sample_rate <= 192000:
            raise UserError(f"feature sample_rate {self.sample_rate} must be between 4000 and 192000 Hz")
        if not 1 <= self.n_mfcc <= self.n_mels:
            raise UserError(f"n_mfcc ({self.n_mfcc}) must be between 1 and n_mels ({self.n_mels})")
        if self.hop_length < 1 or self.win_length < 16 or self.hop_length > self.win_length:
            raise UserError(
                f"window {self.win_ms} ms / hop {self.hop_ms} ms: need a window of at least 16 samples "
                "and a hop no longer than the window"
            )
        if not 0 <= self.min_seconds < self.max_seconds:
            raise UserError(
                f"need 0 <= min_seconds ({self.min_seconds}) < max_seconds ({self.max_seconds})"
            )
        if self.trim_db is not None and self.trim_db <= 0:
            raise UserError(f"trim_db must be positive (or None to keep silence), got {self.trim_db}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "feature spec") -> FeatureSpec:
        """Rebuild from ``asdict(spec)`` (e.g. a checkpoint's JSON); unknown keys are a UserError."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(values) - known)
        if extra:
            raise UserError(f"{source}: unknown feature settings {extra}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.kind.split("+") if p.strip())

    @property
    def level(self) -> str:
        """"frame" (values over time, [C, T]) or "utterance" (one vector per utterance, T = 1)."""
        return KINDS[self.parts[0]].level

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()

    @property
    def frames(self) -> int:
        """T: frames of a ``max_seconds`` signal (centred STFT frames, as librosa computes them)."""
        if self.level == "utterance":
            return 1
        return 1 + round(self.max_seconds * self.sample_rate) // self.hop_length

    @property
    def min_frames(self) -> int:
        """Frames of a ``min_seconds`` sound; utterance-level values have no frames to count, so only the
        decoder's minimum (one analysis window of sound) applies to them."""
        if self.level == "utterance":
            return 1
        return 1 + round(self.min_seconds * self.sample_rate) // self.hop_length

    @property
    def channels(self) -> int:
        """C: feature dimension, the sum over parts."""
        return sum(self.part_channels(p) for p in self.parts)

    def part_channels(self, part: str) -> int:
        return KINDS[part].channels(self)


@dataclass
class FeatureSet:
    """Fixed-length features of the usable utterances, row i describing ``utterances[i]``."""

    x: np.ndarray  # float32 [N, C, T]; frames >= lengths[i] are zero padding
    lengths: np.ndarray  # int64 [N] valid frames
    labels: np.ndarray  # int64 [N] indices into classes
    speakers: np.ndarray  # str [N]
    classes: list[str]
    utterances: list[Utterance]
    spec: FeatureSpec
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stats: dict[str, float] = field(default_factory=dict)  # counts and timing of this extraction

    def __len__(self) -> int:
        return len(self.utterances)


def encode_labels(emotions: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """int64 label of each emotion: its index in ``classes``, or -1 for an emotion that is not a class.

    The one place labels are encoded, so a FeatureSet's labels and an experiment's agree by construction.
    """
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(e, -1) for e in emotions], dtype=np.int64)
