"""Data augmentation that suits speech: perturbed copies of the *training* utterances, never of test ones.

``--augment speed,pitch,noise`` with ``--augment-copies K`` gives every training utterance K perturbed
copies per named kind, taking the first K settings of each kind's list:

- ``speed``: the waveform resampled so that it plays 0.9x, 1.1x, 0.95x, 1.05x as fast (tempo and pitch
  change together, as in Kaldi's speed perturbation, Ko et al. 2015);
- ``pitch``: pitch shifted by -2, +2, -1, +1 semitones at the same tempo (librosa's phase vocoder);
- ``noise``: white Gaussian noise at 20, 15, 25, 10 dB SNR (to the utterance's own power), drawn from a
  seed derived from the file's content, so a copy is the same in every run and on every peer.

A copy is computed from the clean waveform (decoded, trimmed, level-normalised) and normalised to the same
level again, then goes through the same feature kinds and the same content-keyed cache as the original:
the perturbation is part of the cache key (``Cache(..., augment=...)``), so a copy is extracted once.
Every copy counts as a speaker of its own (``speaker~speed0.9``) for the ``speaker`` normaliser, as Kaldi
gives speed-perturbed copies their own speaker ids: the test speakers are standardised by their own
statistics, and a copy's shift (a higher voice, a noise floor) is seen the same way.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pser.errors import UserError

SETTINGS: dict[str, tuple[float, ...]] = {
    "speed": (0.9, 1.1, 0.95, 1.05),  # playback rate
    "pitch": (-2.0, 2.0, -1.0, 1.0),  # semitones
    "noise": (20.0, 15.0, 25.0, 10.0),  # SNR in dB
}
MAX_COPIES = 4
_TOKEN = re.compile(r"^(speed|pitch|noise)(-?[0-9.]+)$")


def perturbations(augment: str | None, copies: int = 1) -> list[str]:
    """The perturbation tokens of ``--augment`` (``"speed,noise"``; ``"none"`` or empty: no copies), each
    kind's first ``copies`` settings: ``("speed,noise", 2)`` -> speed0.9, speed1.1, noise20, noise15."""
    names = [n.strip() for n in (augment or "").split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise UserError(f"--augment {augment!r}: unknown {unknown}; use a comma list of {', '.join(SETTINGS)} "
                        "(or none)")
    if len(set(names)) != len(names):
        raise UserError(f"--augment {augment!r} names a kind twice")
    if names and not 1 <= copies <= MAX_COPIES:
        raise UserError(f"--augment-copies must be between 1 and {MAX_COPIES}, got {copies}")
    return [f"{name}{value:g}" for name in names for value in SETTINGS[name][:copies]]


def perturb(y: np.ndarray, sample_rate: int, token: str, seed: bytes) -> np.ndarray:
    """``y`` perturbed as ``token`` (one of ``perturbations``) says; ``seed`` (bytes of the file's content
    hash) makes the noise of a copy reproducible."""
    import librosa

    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(f"not a perturbation: {token!r}")
    kind, value = match.group(1), float(match.group(2))
    if kind == "speed":
        # Played at the original rate, fewer samples sound faster (and higher), by the factor ``value``.
        return librosa.resample(y, orig_sr=round(sample_rate * value), target_sr=sample_rate).astype(np.float32)
    if kind == "pitch":
        return librosa.effects.pitch_shift(y, sr=sample_rate, n_steps=value).astype(np.float32)
    digest = hashlib.blake2b(seed + token.encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    power = float(np.mean(np.square(y, dtype=np.float64)))
    noise = rng.standard_normal(len(y)) * np.sqrt(power / 10 ** (value / 10))
    return (y + noise).astype(np.float32)


@dataclass
class Copies:
    """Perturbed copies of some rows of a FeatureSet: row i of ``x`` is a copy of that set's row
    ``source[i]``; ``speakers`` are the copies' own speaker names (``speaker~token``)."""

    x: np.ndarray  # float32 [M, C, T]
    lengths: np.ndarray  # int64 [M]
    speakers: np.ndarray  # str [M]
    source: np.ndarray  # int64 [M]

    @classmethod
    def empty(cls, channels: int, frames: int) -> Copies:
        return cls(np.zeros((0, channels, frames), np.float32), np.zeros(0, np.int64), np.zeros(0, str),
                   np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.source)

    def of(self, rows: np.ndarray) -> Copies:
        """The copies of the given source rows (of a peer's training part, say)."""
        keep = np.flatnonzero(np.isin(self.source, rows))
        return Copies(self.x[keep], self.lengths[keep], self.speakers[keep], self.source[keep])


def extract_copies(features, rows: Sequence[int], tokens: Sequence[str], *, cache_dir: str | Path | None = None,
                   workers: int | None = None, progress: bool = False) -> Copies:
    """Perturbed copies (one per token) of the given rows of ``features`` (a FeatureSet), through the
    feature cache. A copy that cannot be used (too short once sped up) is left out."""
    from p2pser.features.extract import extract_features

    rows = np.asarray(rows, dtype=np.int64)
    out = Copies.empty(features.x.shape[1], features.x.shape[2])
    if not tokens or len(rows) == 0:
        return out
    row_of_path = {str(features.utterances[r].path): int(r) for r in rows}
    parts = [out]
    for token in tokens:
        # No class filter: the rows are already of the classes, and a subset lacking some would warn of it.
        copy = extract_features([features.utterances[r] for r in rows], features.spec,
                                cache_dir=cache_dir, workers=workers, progress=progress, augment=token)
        parts.append(Copies(copy.x, copy.lengths, np.char.add(copy.speakers.astype(str), f"~{token}"),
                            np.array([row_of_path[str(u.path)] for u in copy.utterances], dtype=np.int64)))
    return Copies(np.concatenate([p.x for p in parts]), np.concatenate([p.lengths for p in parts]),
                  np.concatenate([p.speakers for p in parts]), np.concatenate([p.source for p in parts]))
