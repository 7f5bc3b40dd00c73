"""The built-in synthetic emotional speech corpus: source-filter synthesis in numpy, deterministic by seed.

Why synthetic: tests, demos and the README's first run need emotional speech that anyone may generate and
redistribute, in seconds, with speakers and classes under control. It is not a substitute for a real
corpus, but its cues follow what acted emotional speech shows (Banse & Scherer 1996; Scherer 2003; Juslin &
Laukka 2003): relative to neutral, anger has higher and wider-ranging F0, faster tempo, more energy and a
flatter spectral tilt; sadness lower, narrower F0, slower tempo, less energy, steeper tilt and a breathier,
less articulated voice; fear a high F0 with jitter/tremor and fast tempo; happiness a high F0 with a wide
range; disgust a low F0, slow tempo and creaky voice. Each speaker acts with its own intensity and habits,
each take with its own intensity, and recordings differ in level and background noise, so classes overlap
and speaker-independent recognition is learnable but far from perfect.

Dimensional labels follow from how each take was generated. Arousal is read off the take's own realised
expressive parameters (speaker habit and take variation included): louder, higher, faster and wider-ranging
speech is more aroused (``arousal_of``). Valence and dominance are the emotion's place in the
pleasure-arousal-dominance norms of Russell & Mehrabian (1977), scaled by the take's acting intensity. All
three lie on -1..1, declared in the manifest header (``arousal[-1:1]``).

Signal model: a glottal pulse train (per-pulse jitter, shimmer, creaky irregular pulses) plus aspiration
and frication noise, shaped frame by frame in the STFT domain by a cascade of formant resonances that glide
between the targets of random syllables (consonant + vowel), with pauses between phrases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from p2pser.audio.corpora import DIMENSIONS, Corpus, load_corpus
from p2pser.errors import UserError

log = logging.getLogger(__name__)

SYNTH_EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgust")
DEFAULT_SPEAKERS = 12
DEFAULT_PER_EMOTION = 10
DEFAULT_SAMPLE_RATE = 16000

CONTROL_RATE = 200  # Hz: segment plans and prosody tracks are built at 5 ms resolution
N_FFT = 512  # 32 ms frames at 16 kHz (scaled with the sample rate), 50% overlap

# Expressive parameters, as deltas from a speaker's neutral voice. Ratios are log2 so that every
# parameter adds: f0 in semitones, range/rate/formant/pause as log2 factors, level and tilt in dB
# (tilt: dB/octave, positive = steeper = softer, breathier voice), jitter/shimmer as relative period and
# amplitude perturbation, breath as aspiration level, creak as the fraction of time in creaky voice, artic as
# the change in vowel-target reach (negative = centralised vowels), tremor as F0 tremor depth (semitones).
FIELDS = ("f0", "range", "rate", "level", "tilt", "jitter", "shimmer", "breath", "creak", "formant", "artic",
          "pause", "tremor")  # fmt: skip
_F = {name: i for i, name in enumerate(FIELDS)}
PROFILES = {
    #             f0    range  rate  level  tilt  jitter shimmer breath creak formant artic pause tremor
    "neutral": (0.0,  0.0,   0.0,  0.0,  0.0,  0.0,   0.0,   0.0,   0.0,  0.0,   0.0,  0.0,  0.0),
    "happy":   (3.5,  0.8,   0.11, 2.0, -1.0,  0.002, 0.0,   0.0,   0.0,  0.08,  0.05, -0.15, 0.0),
    "sad":     (-2.0, -0.86, -0.36, -6.0, 4.0, 0.006, 0.02,  0.12,  0.08, -0.03, -0.3,  0.7,  0.0),
    "angry":   (4.0,  0.4,   0.16, 8.0, -4.0,  0.004, 0.02, -0.03,  0.0,  0.043, 0.1, -0.5,  0.0),
    "fearful": (5.0,  0.14,  0.26, 1.0, -1.0,  0.02,  0.03,  0.12,  0.0,  0.05, -0.15, 0.0,  0.8),
    "disgust": (-2.5, -0.15, -0.29, -1.0, 1.5, 0.008, 0.05,  0.04,  0.3,  -0.04, 0.0,  0.3,  0.0),
}  # fmt: skip
# Valence (pleasure) and dominance of each emotion term on -1..1: Russell & Mehrabian (1977), "Evidence for
# a three-factor theory of emotions", J. Research in Personality 11:273-294, Table 4 (mean pleasure, arousal,
# dominance of 151 emotion terms), rows Happy (31) .81/.51/.46, Disgusted (75) -.60/.35/.11, Angry (82)
# -.51/.59/.25, Fearful (101) -.64/.60/-.43, Sad (151) -.63/-.27/-.33 (P/A/D). Checked against three
# independent transcriptions of that table in public code (which agree with each other and with these
# values), not against the printed paper, which we could not read. The arousal column is not used: a take's
# arousal is read off its realised acoustics (``arousal_of``). Neutral is the origin. Scaled per take by
# its acting intensity.
VALENCE_DOMINANCE = {"neutral": (0.0, 0.0), "happy": (0.81, 0.46), "sad": (-0.63, -0.33), "angry": (-0.51, 0.25),
                     "fearful": (-0.64, -0.43), "disgust": (-0.60, 0.11)}  # fmt: skip
# Arousal from the realised parameters: each cue in units of the angriest profile's deviation, weighted.
AROUSAL_CUES = {"level": (0.35, 8.0), "f0": (0.25, 4.5), "rate": (0.25, 0.2), "range": (0.15, 0.8)}
# Spread of a speaker's habitual deviation from each profile, and of one take from the next.
SPEAKER_SPREAD = np.array((1.2, 0.2, 0.08, 2.0, 1.2, 0.002, 0.01, 0.03, 0.05, 0.015, 0.06, 0.2, 0.1))
TAKE_SPREAD = np.array((1.5, 0.25, 0.12, 2.0, 1.5, 0.003, 0.015, 0.04, 0.05, 0.02, 0.08, 0.3, 0.1))


def _vector(default: float = 0.0, **values: float) -> np.ndarray:
    v = np.full(len(FIELDS), default)
    for name, value in values.items():
        v[_F[name]] = value
    return v


# Every voice has some jitter and shimmer; perturbations and extra creak and tremor cannot go negative.
BASE = _vector(jitter=0.005, shimmer=0.03)
FLOOR = _vector(-np.inf, jitter=0.001, shimmer=0.0, creak=0.0, tremor=0.0)

# Vowel formant targets F1-F3 (Hz), adult male means of Peterson & Barney (1952).
VOWELS = np.array([
    (270, 2290, 3010), (390, 1990, 2550), (530, 1840, 2480), (660, 1720, 2410), (730, 1090, 2440),
    (570, 840, 2410), (440, 1020, 2240), (300, 870, 2240), (640, 1190, 2390),
], dtype=float)  # fmt: skip
SCHWA = np.array((500.0, 1500.0, 2500.0))
UPPER_FORMANTS = (3500.0, 4500.0)
BANDWIDTHS = np.array((80.0, 100.0, 150.0, 200.0, 250.0))
# Onset consonants: (kind, probability); a syllable may also start on its vowel.
ONSETS = (("none", 0.15), ("nasal", 0.2), ("approximant", 0.2), ("fricative", 0.25), ("plosive", 0.2))
FRICATIVE_CENTRES = (5500.0, 3000.0, 0.0)  # s, sh, f (0 = broadband)


@dataclass(frozen=True)
class Voice:
    """A synthetic speaker: anatomy (sex, F0, vocal-tract scale) and habits (quality, tempo, acting)."""

    speaker: str
    sex: str
    f0: float  # median F0 of neutral speech, Hz
    f0_range: float  # semitones of pitch movement in neutral speech
    tract: float  # formant scale: a shorter vocal tract gives higher formants
    breathiness: float  # aspiration noise level relative to voicing
    tilt: float  # source spectral tilt, dB/octave
    rate: float  # tempo factor of neutral speech
    gain_db: float  # microphone distance / recording level of this speaker's sessions
    expressiveness: float  # how strongly the speaker acts emotions
    habits: tuple[tuple[float, ...], ...]  # per emotion in SYNTH_EMOTIONS: deviation from the profile


def make_voices(n: int, seed: int) -> list[Voice]:
    """``n`` speakers "synth_01".., alternating F and M; speaker k depends only on (seed, k)."""
    voices = []
    for k in range(n):
        rng = np.random.default_rng([seed, 1, k])
        female = k % 2 == 0
        habits = rng.normal(0.0, 1.0, (len(SYNTH_EMOTIONS), len(FIELDS))) * SPEAKER_SPREAD
        habits[0] = 0.0  # neutral is each speaker's own reference
        voices.append(Voice(
            speaker=f"synth_{k + 1:02d}",
            sex="F" if female else "M",
            f0=float(rng.uniform(175, 240) if female else rng.uniform(95, 140)),
            f0_range=float(rng.uniform(2.5, 5.0)),
            tract=float((1.16 if female else 1.0) * rng.uniform(0.94, 1.06)),
            breathiness=float(rng.uniform(0.03, 0.15) + (0.04 if female else 0.0)),
            tilt=float(rng.uniform(5.0, 8.0)),
            rate=float(rng.uniform(0.85, 1.15)),
            gain_db=float(rng.normal(0.0, 2.0)),
            expressiveness=float(rng.uniform(0.8, 1.2)),
            habits=tuple(tuple(float(v) for v in row) for row in habits),
        ))  # fmt: skip
    return voices


def synthesize_utterance(voice: Voice, emotion: str, rng: np.random.Generator,
                         sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """One take of ``voice`` speaking a random sentence with ``emotion``: float32 mono in [-1, 1]."""
    return synthesize_take(voice, emotion, rng, sample_rate)[0]


def synthesize_take(voice: Voice, emotion: str, rng: np.random.Generator,
                    sample_rate: int = DEFAULT_SAMPLE_RATE) -> tuple[np.ndarray, dict[str, float]]:
    """``synthesize_utterance`` and the take's arousal, valence and dominance (-1..1)."""
    e = SYNTH_EMOTIONS.index(emotion)
    intensity = rng.uniform(0.8, 1.3) * voice.expressiveness
    p = (BASE + np.array(PROFILES[emotion]) * intensity + np.array(voice.habits[e])
         + rng.normal(0.0, 1.0, len(FIELDS)) * TAKE_SPREAD)  # fmt: skip
    p = np.maximum(p, FLOOR)
    plan = _plan(voice, p, rng)
    excitation = _pulses(voice, p, plan, rng, sample_rate)
    spec = _filter(voice, p, plan, excitation, rng, sample_rate)
    audio = _record(spec, len(excitation), voice, p, rng, sample_rate)
    valence, dominance = VALENCE_DOMINANCE[emotion]
    dims = {"arousal": arousal_of(p), "valence": float(np.clip(valence * intensity, -1.0, 1.0)),
            "dominance": float(np.clip(dominance * intensity, -1.0, 1.0))}
    return audio, dims


def arousal_of(p: np.ndarray) -> float:
    """Arousal on -1..1 of a take with expressive parameters ``p``: a weighted sum of its level, F0, tempo
    and F0-range deviations from the speaker's neutral voice, squashed by tanh (angry takes land near
    +0.7, sad near -0.75, neutral at 0)."""
    raw = sum(weight * p[_F[name]] / unit for name, (weight, unit) in AROUSAL_CUES.items())
    return float(np.tanh(raw))


# --- segment plan ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Control-rate tracks (one value per 5 ms) of a sentence."""

    voicing: np.ndarray  # voiced source amplitude
    frication: np.ndarray  # frication noise amplitude
    fric_centre: np.ndarray  # Hz, 0 = broadband
    formants: np.ndarray  # (frames, 3) F1-F3 targets before speaker scaling
    accents: np.ndarray  # pitch accent bumps, fraction of the F0 range


def _plan(voice: Voice, p: np.ndarray, rng: np.random.Generator) -> _Plan:
    tempo = voice.rate * 2.0 ** p[_F["rate"]]
    reach = np.clip(1.0 + p[_F["artic"]], 0.3, 1.3)
    segments: list[tuple[int, float, float, float, np.ndarray, float]] = []

    def add(seconds: float, voicing: float, fric: float, centre: float, formants, accent: float = 0.0):
        frames = max(1, round(seconds / tempo * CONTROL_RATE))
        segments.append((frames, voicing, fric, centre, np.asarray(formants, dtype=float), accent))

    add(rng.uniform(0.08, 0.2) * tempo, 0, 0, 0, SCHWA)  # leading silence, not tempo-scaled
    kinds, probs = zip(*ONSETS)
    n_syllables = int(rng.integers(6, 11))
    for i in range(n_syllables):
        vowel = SCHWA + reach * (VOWELS[rng.integers(len(VOWELS))] - SCHWA)
        stressed = rng.random() < 0.3
        kind = kinds[rng.choice(len(kinds), p=probs)]
        if kind == "nasal":
            add(rng.uniform(0.04, 0.08), 0.25, 0, 0, (250, rng.choice((1100, 1700)), 2300))
        elif kind == "approximant":
            add(rng.uniform(0.04, 0.08), 0.5, 0, 0, (350, rng.choice((800, 1300, 2000)), rng.choice((1700, 2500))))
        elif kind == "fricative":
            add(rng.uniform(0.06, 0.12), 0, 0.35, rng.choice(FRICATIVE_CENTRES), vowel)
        elif kind == "plosive":
            add(rng.uniform(0.04, 0.07), 0, 0, 0, vowel)
            add(rng.uniform(0.01, 0.02), 0, 0.6, rng.uniform(1500, 4000), vowel)
            add(rng.uniform(0.02, 0.04), 0, 0.15, 0, vowel)
        accent = rng.uniform(0.5, 1.0) if stressed else rng.uniform(-0.1, 0.2)
        add(rng.uniform(0.07, 0.15) * (1.4 if stressed else 1.0), 1.0 if stressed else 0.8, 0, 0, vowel, accent)
        if i < n_syllables - 1 and rng.random() < 0.15:
            add(rng.uniform(0.12, 0.35) * 2.0 ** p[_F["pause"]], 0, 0, 0, SCHWA)
    add(rng.uniform(0.08, 0.2) * tempo, 0, 0, 0, SCHWA)

    lengths = np.array([s[0] for s in segments])
    voicing = np.repeat([s[1] for s in segments], lengths)
    formants = np.repeat(np.stack([s[4] for s in segments]), lengths, axis=0)
    accents = np.repeat([s[5] for s in segments], lengths)
    # Coarticulation and onset/offset ramps: articulators glide, they do not jump.
    return _Plan(
        voicing=_smooth(voicing, 3),
        frication=_smooth(np.repeat([s[2] for s in segments], lengths), 2),
        fric_centre=np.repeat([s[3] for s in segments], lengths),
        formants=np.stack([_smooth(formants[:, i], 8) for i in range(3)], axis=1),
        accents=_smooth(accents, 12),
    )


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(2 * width + 3)[1:-1]
    padded = np.concatenate((np.full(width, x[0]), x, np.full(width, x[-1])))
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def _drift(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Slow random wander with unit standard deviation."""
    x = _smooth(rng.normal(0.0, 1.0, n), width)
    return x / (x.std() or 1.0)


# --- source ----------------------------------------------------------------------------------------------


def _pulses(voice: Voice, p: np.ndarray, plan: _Plan, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Glottal excitation: one impulse per glottal cycle at its fractional-sample instant (split between
    two samples), with jitter, shimmer and creak; the glottal spectrum itself is the tilt in _filter."""
    n_ctrl = len(plan.voicing)
    t_ctrl = np.arange(n_ctrl) / CONTROL_RATE
    span = voice.f0_range * 2.0 ** p[_F["range"]]
    semitones = (p[_F["f0"]] + span * (plan.accents - 0.3)
                 - 2.0 * t_ctrl / t_ctrl[-1]  # declination over the sentence
                 + p[_F["tremor"]] * np.sin(2 * np.pi * rng.uniform(5, 7) * t_ctrl)
                 + span * 0.25 * _drift(rng, n_ctrl, 20))  # fmt: skip
    f0 = voice.f0 * 2.0 ** (semitones / 12.0)

    n = int(n_ctrl * sr / CONTROL_RATE)
    max_pulses = int(n_ctrl / CONTROL_RATE * f0.max()) + 2
    noise = rng.normal(0.0, 1.0, (max_pulses, 2))
    # Creak (vocal fry) comes in stretches covering about the "creak" fraction of the sentence.
    wander = _drift(rng, n_ctrl, 15)
    creaky = wander > np.quantile(wander, 1.0 - min(p[_F["creak"]], 1.0))
    stretch = rng.uniform(1.6, 2.4, max_pulses)
    jitter, shimmer = p[_F["jitter"]], p[_F["shimmer"]]
    # Index of the next voiced control frame at or after each frame, to jump over silence and noise.
    voiced = plan.voicing >= 0.02
    next_voiced = np.minimum.accumulate(np.where(voiced, np.arange(n_ctrl), n_ctrl)[::-1])[::-1]
    times, amps = [], []
    t, k = 0.0, 0
    end = (n - 2) / sr
    while t < end and k < max_pulses:
        c = min(int(t * CONTROL_RATE), n_ctrl - 1)
        if not voiced[c]:
            if next_voiced[c] == n_ctrl or next_voiced[c] / CONTROL_RATE >= end:
                break
            t = max(t, next_voiced[c] / CONTROL_RATE)
            c = int(next_voiced[c])
        period = (1.0 + jitter * noise[k, 0]) / f0[c]
        amp = plan.voicing[c] * (1.0 + shimmer * noise[k, 1])
        if creaky[c]:  # long, irregular cycles with alternating strong and weak pulses
            period *= stretch[k]
            amp *= 1.0 if k % 2 else 0.6
        times.append(t)
        amps.append(amp)
        t += max(period, 1.0 / 800)
        k += 1
    pos = np.array(times) * sr
    idx = pos.astype(int)
    frac = pos - idx
    excitation = np.zeros(n)
    np.add.at(excitation, idx, np.array(amps) * (1 - frac))
    np.add.at(excitation, idx + 1, np.array(amps) * frac)
    return excitation


# --- filter ----------------------------------------------------------------------------------------------


def _filter(voice: Voice, p: np.ndarray, plan: _Plan, excitation: np.ndarray, rng: np.random.Generator,
            sr: int) -> np.ndarray:
    """Shape the voiced source and the aspiration and frication noises frame by frame, mix them and return
    the STFT of the speech (float32 throughout: this is the hot path)."""
    n_fft, hop = _fft_sizes(sr)
    voiced = _stft(excitation, n_fft, hop)
    frames, bins = voiced.shape
    # Control tracks sampled at the STFT frame centres.
    centres = np.minimum((np.arange(frames) * hop / sr * CONTROL_RATE).astype(int), len(plan.voicing) - 1)
    voicing = plan.voicing[centres].astype(np.float32)[:, None]
    frication = plan.frication[centres].astype(np.float32)[:, None]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr).astype(np.float32)

    scale = voice.tract * 2.0 ** p[_F["formant"]]
    upper = np.broadcast_to(np.array(UPPER_FORMANTS) * voice.tract, (frames, 2))
    formants = np.concatenate([plan.formants[centres] * scale, upper], axis=1)
    breath = max(voice.breathiness + p[_F["breath"]], 0.0)
    tract = _resonances(freqs, formants, BANDWIDTHS * (1.0 + 2.0 * breath), 0.45 * sr)
    octaves = np.log2(np.maximum(freqs, 100.0) / 100.0)
    tilt = 10.0 ** (-(voice.tilt + p[_F["tilt"]]) * octaves / 20.0)

    voiced *= tract * tilt.astype(np.float32)
    aspiration = voicing * tract * (tilt**0.3).astype(np.float32)
    fric = np.zeros((frames, bins), dtype=np.float32)
    rows = frication[:, 0] > 1e-3
    centre = plan.fric_centre[centres][rows][:, None] * voice.tract
    bump = np.exp(-2.0 * (np.log2(np.maximum(freqs, 50.0)) - np.log2(np.maximum(centre, 1.0))) ** 2)
    fric[rows] = frication[rows] * np.where(centre > 0, 0.1 + bump, 0.3) * (freqs > 800)
    # Levels relative to the voiced energy of vowels, so that they hold for any F0 and formants. The two
    # noises rarely overlap in time, so one draw of coefficients serves both.
    ref = _level(voiced, voicing > 0.5) / NOISE_RMS
    aspiration *= breath * ref / (_level(aspiration, voicing > 0.5) or 1.0)
    fric *= 0.3 * ref / (_level(fric, frication > 0.1) or 1.0)
    return voiced + _noise(rng, frames, bins) * (aspiration + fric)


# RMS magnitude of a _noise coefficient: real and imaginary parts uniform on 255 steps of 1/128.
NOISE_RMS = float(np.sqrt(2.0 * (255**2 - 1) / 12.0) / 128.0)


def _noise(rng: np.random.Generator, frames: int, bins: int) -> np.ndarray:
    """White-noise STFT coefficients. White noise under an envelope that is constant within a frame has
    independent, zero-mean coefficients; random bytes make them an order of magnitude faster than drawing
    Gaussians, and after overlap-add of many bins the waveform is Gaussian all the same."""
    raw = np.frombuffer(rng.bytes(2 * frames * bins), dtype=np.int8).astype(np.float32)
    return ((raw + 0.5) / 128.0).view(np.complex64).reshape(frames, bins)


def _level(spec: np.ndarray, frames: np.ndarray) -> float:
    """RMS magnitude of ``spec`` over the selected frames (a (frames, 1) mask)."""
    selected = spec[frames[:, 0]]
    return float(np.sqrt(np.mean(np.abs(selected) ** 2))) if selected.size else 0.0


def _resonances(freqs: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray, limit: float) -> np.ndarray:
    """Magnitude response (frames, bins) of a cascade of second-order resonators, unity gain at 0 Hz.

    Each resonator is P / sqrt(((f - F)^2 + h^2) ((f + F)^2 + h^2)) with h half its bandwidth and
    P = F^2 + h^2; the product under the root equals (f^2 - P)^2 + 4 f^2 h^2, so no per-bin roots but one.
    """
    f2 = freqs.astype(np.float32) ** 2
    squared = np.ones((formants.shape[0], len(freqs)), dtype=np.float32)
    for i in range(formants.shape[1]):
        h2 = np.float32((bandwidths[i] / 2.0) ** 2)
        peak = (np.minimum(formants[:, i : i + 1], limit) ** 2 + h2).astype(np.float32)
        d = f2 - peak
        squared *= (d * d + 4.0 * h2 * f2) / (peak * peak)  # scaled per resonator to stay in float32 range
    return 1.0 / np.sqrt(squared)


def _fft_sizes(sr: int) -> tuple[int, int]:
    n_fft = int(2 ** round(np.log2(N_FFT * sr / DEFAULT_SAMPLE_RATE)))
    return n_fft, n_fft // 2


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    window = np.sqrt(np.hanning(n_fft + 1)[:-1]).astype(np.float32)
    padded = np.concatenate((np.zeros(n_fft // 2, np.float32), x.astype(np.float32), np.zeros(n_fft, np.float32)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    return np.fft.rfft(frames * window, axis=1)


def _istft(spec: np.ndarray, n_fft: int, hop: int, n: int) -> np.ndarray:
    # sqrt-Hann analysis and synthesis windows at 50% overlap sum to one: plain overlap-add inverts _stft.
    window = np.sqrt(np.hanning(n_fft + 1)[:-1]).astype(np.float32)
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * window
    out = np.zeros((frames.shape[0] + 1) * hop, dtype=np.float32)
    out[: frames.shape[0] * hop] += frames[:, :hop].reshape(-1)
    out[hop:] += frames[:, hop:].reshape(-1)
    return out[n_fft // 2 : n_fft // 2 + n]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


# --- recording -------------------------------------------------------------------------------------------


def _record(spec: np.ndarray, n: int, voice: Voice, p: np.ndarray, rng: np.random.Generator,
            sr: int) -> np.ndarray:
    """Set the level (emotion, speaker, take) and add coloured background noise at a random SNR."""
    n_fft, hop = _fft_sizes(sr)
    speech = _istft(spec, n_fft, hop, n)
    level_db = -26.0 + p[_F["level"]] + voice.gain_db + rng.normal(0.0, 2.0)
    speech *= np.float32(10.0 ** (level_db / 20.0) / (_rms(speech) or 1.0))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    colour = (np.maximum(freqs, 50.0) ** -rng.uniform(0.0, 0.8)).astype(np.float32)  # white to pink-ish
    noise = _istft(_noise(rng, *spec.shape) * colour, n_fft, hop, n)
    snr_db = rng.uniform(12.0, 35.0)
    out = speech + noise * _rms(speech) * 10.0 ** (-snr_db / 20.0) / (_rms(noise) or 1.0)
    peak = np.max(np.abs(out))
    if peak > 0.99:  # a shouted take would clip: the "recording engineer" lowers the gain instead
        out *= 0.99 / peak
    return out.astype(np.float32)


# --- corpus ----------------------------------------------------------------------------------------------


def synthesize_corpus(out_dir: str | Path, *, speakers: int = DEFAULT_SPEAKERS,
                      per_emotion: int = DEFAULT_PER_EMOTION, seed: int = 0,
                      sample_rate: int = DEFAULT_SAMPLE_RATE) -> Corpus:
    """Write ``OUT_DIR/<speaker>/<file>.wav`` (16-bit PCM), ``manifest.csv`` and ``folds.json``.

    Every take depends only on (seed, speaker, emotion, take), so the same arguments give byte-identical
    files. ``out_dir`` must be new, empty or an earlier synthetic corpus (whose files are replaced).
    Returns the corpus as ``load_corpus`` reads it back.
    """
    if speakers < 2:
        raise UserError(f"--speakers {speakers}: need at least 2 speakers for speaker-independent folds")
    if per_emotion < 1:
        raise UserError(f"--per-emotion {per_emotion}: need at least 1 utterance per emotion")
    if not 8000 <= sample_rate <= 48000:
        raise UserError(f"--sample-rate {sample_rate}: choose a rate between 8000 and 48000 Hz")
    out = Path(out_dir).expanduser()
    _prepare(out)
    voices = make_voices(speakers, seed)
    rows = []
    for k, voice in enumerate(voices):
        (out / voice.speaker).mkdir(parents=True, exist_ok=True)
        for e, emotion in enumerate(SYNTH_EMOTIONS):
            for take in range(per_emotion):
                rng = np.random.default_rng([seed, 2, k, e, take])
                audio, dims = synthesize_take(voice, emotion, rng, sample_rate)
                rel = f"{voice.speaker}/{voice.speaker}_{emotion}_{take + 1:03d}.wav"
                (out / rel).write_bytes(_wav_bytes(audio, sample_rate))
                rows.append((rel, voice.speaker, emotion, voice.sex, *(f"{dims[d]:.4f}" for d in DIMENSIONS)))
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("file", "speaker", "emotion", "sex", *(f"{d}[-1:1]" for d in DIMENSIONS)))
        writer.writerows(rows)
    (out / "folds.json").write_text(json.dumps(_folds(voices, seed), indent=2) + "\n")
    log.info("wrote %d synthetic utterances of %d speakers to %s", len(rows), speakers, out)
    return load_corpus(out / "manifest.csv")


def _wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    # Through memory: writing to a path makes libsndfile fsync every file, which dominates the run time.
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _prepare(out: Path) -> None:
    """Refuse to write into a folder holding anything but an earlier synthetic corpus, then clear that."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose a new folder for the synthetic corpus")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    manifest = out / "manifest.csv"
    ours = manifest.is_file() and all(
        p.name in ("manifest.csv", "folds.json") or (p.is_dir() and p.name.startswith("synth_"))
        for p in out.iterdir()
    )
    if not ours:
        raise UserError(f"{out} is not empty and is not a synthetic corpus; choose a new or empty folder")
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)


def _folds(voices: list[Voice], seed: int) -> dict:
    """Speaker-independent folds with both sexes in each test set where possible (same format as
    ../shared/data/*/folds.json)."""
    n = len(voices)
    k = min(4, n // 2) if n >= 4 else n
    ordered = [v.speaker for v in voices if v.sex == "F"] + [v.speaker for v in voices if v.sex == "M"]
    folds = [{"test_speakers": sorted(ordered[i::k])} for i in range(k)]
    return {
        "name": f"synth-{k}fold-speaker-independent",
        "about": f"Synthetic corpus (seed {seed}): {k} speaker-independent folds; train on the other speakers. "
        "Report unweighted average recall (UA) per fold and the mean over folds.",
        "classes": list(SYNTH_EMOTIONS),
        "folds": folds,
    }
