"""Augmentation (--augment): perturbed copies of training utterances on real audio, through the cache."""

from __future__ import annotations

import numpy as np
import pytest
from test_features import few  # noqa: F401  (the fixture: six RAVDESS files)

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.features.augment import extract_copies, perturb, perturbations
from p2pser.features.extract import extract_features
from p2pser.features.spec import FeatureSpec
from p2pser.learn.data import PeerData


def test_perturbation_names_and_copies():
    assert perturbations("speed,noise", 2) == ["speed0.9", "speed1.1", "noise20", "noise15"]
    assert perturbations("pitch", 1) == ["pitch-2"] and perturbations("none") == [] == perturbations(None)
    with pytest.raises(UserError, match="unknown"):
        perturbations("reverb")
    with pytest.raises(UserError, match="between 1 and 4"):
        perturbations("speed", 5)
    with pytest.raises(UserError, match="augment"):
        RunConfig(augment="speed", dp="utterance", dp_epsilon=8.0)


def test_perturbations_change_tempo_pitch_or_noise_as_named():
    sr = 16000
    t = np.arange(sr) / sr
    y = (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    assert abs(len(perturb(y, sr, "speed1.1", b"x")) - sr / 1.1) <= 1  # faster: shorter
    assert abs(len(perturb(y, sr, "speed0.9", b"x")) - sr / 0.9) <= 1

    def peak_hz(z):
        return np.argmax(np.abs(np.fft.rfft(z[2000:-2000]))) * sr / len(z[2000:-2000])

    assert peak_hz(perturb(y, sr, "pitch2", b"x")) == pytest.approx(200 * 2 ** (2 / 12), rel=0.02)
    noisy = perturb(y, sr, "noise20", b"x")
    snr = 10 * np.log10(np.mean(y.astype(np.float64) ** 2) / np.mean((noisy - y).astype(np.float64) ** 2))
    assert snr == pytest.approx(20, abs=0.5)
    np.testing.assert_array_equal(noisy, perturb(y, sr, "noise20", b"x"))  # the same copy every time
    assert not np.array_equal(noisy, perturb(y, sr, "noise20", b"y"))


def test_copies_are_cached_apart_from_the_originals(few, tmp_path):  # noqa: F811
    spec, cache = FeatureSpec(kind="mfcc", max_seconds=1.5), tmp_path / "cache"
    original = extract_features(few, spec, cache_dir=cache, workers=1, progress=False)
    copies = extract_copies(original, [1, 3], ["speed1.1", "noise20"], cache_dir=cache, workers=1)
    assert copies.source.tolist() == [1, 3, 1, 3] and copies.x.shape == (4, 120, spec.frames)
    assert copies.speakers[0] == f"{original.speakers[1]}~speed1.1" and np.isfinite(copies.x).all()
    assert not np.allclose(copies.x[0], original.x[1])
    again = extract_features(few, spec, cache_dir=cache, workers=1, progress=False)
    assert again.stats["extracted"] == 0  # the copies did not overwrite the originals
    np.testing.assert_array_equal(again.x, original.x)
    warm = extract_features([few[1]], spec, cache_dir=cache, workers=1, progress=False, augment="speed1.1")
    assert warm.stats["extracted"] == 0
    np.testing.assert_array_equal(warm.x[0], copies.x[0])

    # A peer's training part takes the copies of its training rows, never of its validation rows.
    y = np.arange(len(few))  # each row its own label, to follow where copies go
    test = (original.x[:1], y[:1], original.lengths[:1])
    data = PeerData.from_arrays(original.x, y, original.lengths, np.array([1, 3]), test, ["a", "b"],
                                val_fraction=0.0, seed=0, mode="local", copies=copies)
    assert sorted(data.y_train.tolist()) == [1, 1, 1, 3, 3, 3] and len(data.x_train) == 6
    val_one = PeerData.from_arrays(original.x, y, original.lengths, np.array([0, 1, 3]), test, ["a", "b"],
                                   val_fraction=0.34, seed=0, mode="speaker", speakers=original.speakers,
                                   copies=copies)
    held = np.random.default_rng(0).permutation([0, 1, 3])[0]  # the validation row from_arrays draws
    assert len(val_one.y_val) == 1 and len(val_one.y_train) == 2 + 2 * len({1, 3} - {held})
    assert len(val_one.x_train) == len(val_one.y_train)
