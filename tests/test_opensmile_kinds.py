"""openSMILE feature kinds and pitch on real EmoDB audio: shapes, finite values, cache hits, combinations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_features import manifest_utterances

from p2pser.audio.synth import synthesize_corpus
from p2pser.errors import UserError
from p2pser.features.extract import extract_features
from p2pser.features.spec import FeatureSpec

# kind -> (channels, level)
OPENSMILE_KINDS = {"egemaps": (88, "utterance"), "compare": (6373, "utterance"), "egemaps-lld": (25, "frame"),
                   "compare-lld": (65, "frame"), "pitch": (3, "frame")}


@pytest.fixture(scope="module")
def few(shared_data: Path):
    """Four EmoDB files spread over speakers and emotions."""
    return manifest_utterances(shared_data / "emodb", step=137, limit=4)


@pytest.mark.parametrize("kinds", ["egemaps+compare", "egemaps-lld+compare-lld+pitch"])
def test_each_kind_on_real_audio_has_its_shape_finite_values_and_comes_back_from_the_cache(tmp_path, few, kinds):
    spec = FeatureSpec(kind=kinds)
    cold = extract_features(few, spec, cache_dir=tmp_path, workers=1, progress=False)
    n = len(few)
    assert cold.stats["extracted"] == n and cold.stats["from_cache"] == 0
    assert cold.x.shape == (n, sum(OPENSMILE_KINDS[k][0] for k in spec.parts), spec.frames)
    assert np.isfinite(cold.x).all()
    at = 0
    for part in spec.parts:
        channels, level = OPENSMILE_KINDS[part]
        assert spec.part_channels(part) == channels and FeatureSpec(kind=part).level == level
        block = cold.x[:, at:at + channels, :]
        at += channels
        # Every descriptor varies across utterances (none is a constant such as an all-zero fill).
        means = np.stack([block[i, :, :n].mean(axis=1) for i, n in enumerate(cold.lengths)])
        assert (means.std(axis=0) > 0).mean() > 0.9, part
    if spec.level == "utterance":
        assert spec.frames == 1 and (cold.lengths == 1).all()
    else:
        assert (cold.lengths > 50).all()  # 10 ms frames of >= 1 s of speech
    warm = extract_features(few, spec, cache_dir=tmp_path, workers=1, progress=False)
    assert warm.stats["from_cache"] == n and warm.stats["extracted"] == 0
    np.testing.assert_array_equal(warm.x, cold.x)


def test_pitch_tracks_a_voice_f0_and_voicing(tmp_path, few):
    fs = extract_features(few[:2], FeatureSpec(kind="pitch"), cache_dir=tmp_path, workers=1, progress=False)
    for i, n in enumerate(fs.lengths):
        semitones, voicing, level = fs.x[i, :, :n]
        voiced = semitones > 0
        assert 0.2 < voiced.mean() < 1.0  # speech has voiced and unvoiced stretches
        hz = 27.5 * 2 ** (semitones[voiced] / 12)
        assert 60 < np.median(hz) < 400  # an adult voice
        assert voicing.min() >= 0 and voicing.max() <= 1
        assert level[voiced].mean() > level[~voiced].mean()  # voiced frames are the loud ones


def test_utterance_and_frame_level_kinds_do_not_combine():
    with pytest.raises(UserError, match="combines frame-level and utterance-level"):
        FeatureSpec(kind="egemaps+mfcc")
    assert FeatureSpec(kind="mfcc+pitch").channels == 120 + 3


def test_features_command_covers_the_opensmile_kinds(tmp_path):
    corpus = tmp_path / "corpus"
    synthesize_corpus(corpus, speakers=2, per_emotion=1, seed=1)
    cmd = [sys.executable, "-m", "p2pser", "features", str(corpus), "--kind", "egemaps", "--cache-dir",
           str(tmp_path / "cache"), "--json", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["shape"] == [12, 88, 1] and summary["extracted"] == 12
    assert summary["audio_seconds_per_cpu_second"] > 0
