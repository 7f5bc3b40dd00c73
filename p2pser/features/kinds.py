"""The feature kinds: one registry entry per kind says how to compute it and how many channels it has.

A kind is computed from an ``Analysis`` of one clean waveform, which derives what several kinds share (the
power spectrogram, the log-mel spectrogram) at most once, so ``mfcc+logmel`` costs one STFT and one mel
filter bank. Adding a kind is adding one ``Kind`` to ``KINDS``:

- a frame-level kind (low-level descriptors such as pitch or energy) returns ``[C, T]`` values aligned to
  the STFT frames of ``Analysis.power``; ``+``-combinations stack frame-level kinds along the channels;
- an utterance-level kind (functionals, e.g. openSMILE's eGeMAPS) sets ``level="utterance"`` and returns
  one vector ``[C]`` per utterance; a spec of such kinds has one frame (``FeatureSpec.frames == 1``).
  Utterance-level and frame-level kinds cannot be combined, since their time axes differ.

``settings`` names the FeatureSpec fields, beyond the waveform's (sample rate, window, hop, trimming,
level), that change the kind's values: they go into its cache key, so changing one re-extracts only the
kinds that depend on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from p2pser.features.spec import FeatureSpec

LEVELS = ("frame", "utterance")
_SPECTRAL_STATS = 6  # centroid, bandwidth, rolloff, flatness, zero-crossing rate, RMS level
_CONTRAST_FMIN = 200.0


class Analysis:
    """One clean waveform and the spectral representations kinds share, each computed on first use."""

    def __init__(self, y: np.ndarray, spec: FeatureSpec) -> None:
        self.y = y
        self.spec = spec
        self._smile: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def frames(self) -> int:
        """T_full: frames of the centred STFT (``power``), the time axis every frame-level kind is put on."""
        return 1 + len(self.y) // self.spec.hop_length

    def smile(self, feature_set: str, level: str) -> tuple[np.ndarray, np.ndarray]:
        """openSMILE's ``feature_set`` at ``level`` ("Functionals" or "LowLevelDescriptors") of the waveform:
        values ``[rows, C]`` and each row's centre time in seconds; computed once per (set, level), so
        ``compare-lld+pitch`` runs openSMILE once."""
        key = (feature_set, level)
        if key not in self._smile:
            frame = _smile(feature_set, level).process_signal(self.y, self.spec.sample_rate)
            starts = frame.index.get_level_values("start").total_seconds().to_numpy()
            ends = frame.index.get_level_values("end").total_seconds().to_numpy()
            self._smile[key] = (frame.to_numpy(dtype=np.float64), (starts + ends) / 2)
        return self._smile[key]

    @functools.cached_property
    def power(self) -> np.ndarray:
        """Power spectrogram [n_fft // 2 + 1, T_full]; its frames are the time axis of frame-level kinds."""
        import librosa

        s = self.spec
        return np.abs(librosa.stft(self.y, n_fft=s.n_fft, hop_length=s.hop_length, win_length=s.win_length)) ** 2

    @functools.cached_property
    def magnitude(self) -> np.ndarray:
        return np.sqrt(self.power)

    @functools.cached_property
    def logmel(self) -> np.ndarray:
        import librosa

        # A plain matmul with a reused filter bank: librosa's melspectrogram rebuilds the bank and uses a
        # slow einsum path, together ten times the cost of this line.
        mel = _mel_basis(self.spec.sample_rate, self.spec.n_fft, self.spec.n_mels) @ self.power
        return librosa.power_to_db(mel, ref=1.0, top_db=80.0)


@dataclass(frozen=True)
class Kind:
    name: str
    channels: Callable[[FeatureSpec], int]
    compute: Callable[[Analysis], np.ndarray]  # [C, T] (frame level) or [C] (utterance level)
    settings: tuple[str, ...] = ()
    level: str = "frame"
    package: str | None = None  # the library whose version changes the values (goes into the cache key)


@functools.lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)


def contrast_bands(sample_rate: int) -> int:
    """Octave bands for spectral contrast that fit below Nyquist (librosa's rule), at most 6."""
    bands = 6
    while bands > 1 and _CONTRAST_FMIN * 2 ** (bands - 1) >= sample_rate / 2:
        bands -= 1
    return bands


def _mfcc(a: Analysis) -> np.ndarray:
    import librosa

    mfcc = librosa.feature.mfcc(S=a.logmel, n_mfcc=a.spec.n_mfcc)
    deltas = [librosa.feature.delta(mfcc, order=k, mode="nearest") for k in (1, 2)]
    return np.concatenate([mfcc, *deltas])


def _chroma(a: Analysis) -> np.ndarray:
    import librosa

    # Speech has no tuning to estimate; estimating it is slow and only adds noise.
    return librosa.feature.chroma_stft(S=a.power, sr=a.spec.sample_rate, n_fft=a.spec.n_fft, tuning=0.0)


def _spectral(a: Analysis) -> np.ndarray:
    import librosa

    sr, n_fft, mag = a.spec.sample_rate, a.spec.n_fft, a.magnitude
    rms = librosa.feature.rms(S=mag, frame_length=n_fft)
    return np.concatenate([
        librosa.feature.spectral_contrast(
            S=mag, sr=sr, n_fft=n_fft, n_bands=contrast_bands(sr), fmin=_CONTRAST_FMIN
        ),
        librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=n_fft) / 1000.0,  # kHz keeps values O(1)
        librosa.feature.spectral_bandwidth(S=mag, sr=sr, n_fft=n_fft) / 1000.0,
        librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=n_fft) / 1000.0,
        librosa.feature.spectral_flatness(S=mag),
        librosa.feature.zero_crossing_rate(a.y, frame_length=n_fft, hop_length=a.spec.hop_length),
        librosa.amplitude_to_db(rms, ref=1.0),
    ])


# ---- openSMILE (audEERING's extractor, through its Python package; the wheel carries the C library) ------
#
# eGeMAPS v02 (Eyben et al. 2016, the Geneva minimalistic acoustic parameter set) and ComParE 2016 (the
# Interspeech computational paralinguistics challenge set) are the feature sets SER papers report against:
# 88 and 6373 functionals per utterance, computed from 25 and 65 low-level descriptors (LLDs) every 10 ms.

_EGEMAPS, _COMPARE = "eGeMAPSv02", "ComParE_2016"
_CHANNELS = {(_EGEMAPS, "Functionals"): 88, (_EGEMAPS, "LowLevelDescriptors"): 25,
             (_COMPARE, "Functionals"): 6373, (_COMPARE, "LowLevelDescriptors"): 65}
# Pitch and voicing from ComParE's LLDs: its SHS pitch tracker with Viterbi smoothing runs at ~40 s of audio
# per CPU-second; librosa's pyin at 0.8 (BENCHMARKS.md, issue 14 "Feature extraction speed"), too slow for a
# corpus.
_PITCH_COLUMNS = ("F0final_sma", "voicingFinalUnclipped_sma", "pcm_RMSenergy_sma")
_SEMITONE_REF_HZ = 27.5  # eGeMAPS's reference: A0, so semitones are positive for any voice


@functools.lru_cache(maxsize=8)
def _smile(feature_set: str, level: str):
    import opensmile

    return opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, feature_set),
                           feature_level=getattr(opensmile.FeatureLevel, level))


@functools.lru_cache(maxsize=1)
def _compare_lld_columns() -> tuple[str, ...]:
    return tuple(_smile(_COMPARE, "LowLevelDescriptors").feature_names)


def _finite(values: np.ndarray) -> np.ndarray:
    # openSMILE leaves a NaN where a descriptor is undefined (a functional of no voiced frame, say); 0 is the
    # mean after standardisation, so such a value carries no evidence either way.
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


def _functionals(feature_set: str) -> Callable[[Analysis], np.ndarray]:
    def compute(a: Analysis) -> np.ndarray:
        values, _ = a.smile(feature_set, "Functionals")
        return _finite(values[0])

    return compute


def _on_stft_frames(a: Analysis, values: np.ndarray, times: np.ndarray) -> np.ndarray:
    """openSMILE's LLD rows ``[rows, C]`` (centred at ``times``) as ``[C, a.frames]`` on the STFT frames:
    linear interpolation between row centres, the first and last row held at the edges (its windows are
    not centred and pitch uses 60 ms ones, so its rows neither start at 0 nor match a changed hop)."""
    target = np.arange(a.frames) * a.spec.hop_length / a.spec.sample_rate
    if len(values) == 0:  # shorter than one openSMILE window: nothing measured
        return np.zeros((values.shape[1], a.frames))
    return np.stack([np.interp(target, times, _finite(column)) for column in values.T])


def _lld(feature_set: str) -> Callable[[Analysis], np.ndarray]:
    def compute(a: Analysis) -> np.ndarray:
        return _on_stft_frames(a, *a.smile(feature_set, "LowLevelDescriptors"))

    return compute


def _pitch(a: Analysis) -> np.ndarray:
    """F0 in semitones above 27.5 Hz (0 where unvoiced), voicing probability, and log RMS energy (dB)."""
    values, times = a.smile(_COMPARE, "LowLevelDescriptors")
    columns = [_compare_lld_columns().index(name) for name in _PITCH_COLUMNS]
    f0, voicing, energy = values[:, columns].T
    semitones = np.where(f0 > 0, 12 * np.log2(np.maximum(f0, 1e-3) / _SEMITONE_REF_HZ), 0.0)
    level = 20 * np.log10(np.maximum(energy, 1e-5))
    return _on_stft_frames(a, np.stack([semitones, voicing, level], axis=1), times)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("mfcc", lambda s: 3 * s.n_mfcc, _mfcc, settings=("n_mels", "n_mfcc")),  # with deltas, delta-deltas
        Kind("logmel", lambda s: s.n_mels, lambda a: a.logmel, settings=("n_mels",)),
        Kind("chroma", lambda s: 12, _chroma),
        Kind("spectral", lambda s: contrast_bands(s.sample_rate) + 1 + _SPECTRAL_STATS, _spectral),
        Kind("pitch", lambda s: len(_PITCH_COLUMNS), _pitch, package="opensmile"),
        Kind("egemaps-lld", lambda s: _CHANNELS[_EGEMAPS, "LowLevelDescriptors"], _lld(_EGEMAPS),
             package="opensmile"),
        Kind("compare-lld", lambda s: _CHANNELS[_COMPARE, "LowLevelDescriptors"], _lld(_COMPARE),
             package="opensmile"),
        Kind("egemaps", lambda s: _CHANNELS[_EGEMAPS, "Functionals"], _functionals(_EGEMAPS),
             level="utterance", package="opensmile"),
        Kind("compare", lambda s: _CHANNELS[_COMPARE, "Functionals"], _functionals(_COMPARE),
             level="utterance", package="opensmile"),
    )
}


def compute(y: np.ndarray, spec: FeatureSpec, parts: Iterable[str]) -> dict[str, np.ndarray]:
    """Values of each requested part as float32 ``[C_part, T_full]`` (``[C_part, 1]`` at utterance level);
    frame-level parts come from one STFT, so their frames align."""
    analysis = Analysis(y, spec)
    out = {}
    for part in parts:
        kind = KINDS[part]
        values = kind.compute(analysis)
        # Frame-level parts are cut to the spectrogram's frames so that every part of a combination aligns;
        # an utterance-level vector is stored as one frame, so every cached part has the same two axes.
        values = values[:, None] if kind.level == "utterance" else values[:, : analysis.frames]
        out[part] = np.ascontiguousarray(values, dtype=np.float32)
    return out
