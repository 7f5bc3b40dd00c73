"""Normalisation modes: per-speaker standardisation, moments, and the statistics peers agree on by gossip
(they must equal the pooled statistics), through the library and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_carriers import make_peers

from p2pser.carriers.faults import FaultPlan
from p2pser.carriers.simulated import Simulator
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.topology import make_topology, rounds_to_agree
from p2pser.features.normalize import Normalizer, moments, standardize_by_speaker


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, size=(12, 5, 30)).astype(np.float32)
    lengths = rng.integers(10, 31, size=12)
    for i, n in enumerate(lengths):
        x[i, :, n:] = 0.0  # padding
    speakers = np.array(["a", "b", "c"] * 4)
    x[speakers == "b"] *= 4.0  # a louder, wider speaker
    return x, lengths, speakers


def test_each_speaker_ends_with_zero_mean_and_unit_variance_and_padding_stays_zero():
    x, lengths, speakers = _batch()
    out = standardize_by_speaker(x, lengths, speakers)
    for s in "abc":
        idx = np.flatnonzero(speakers == s)
        frames = np.concatenate([out[i, :, : lengths[i]] for i in idx], axis=1)
        np.testing.assert_allclose(frames.mean(axis=1), 0.0, atol=1e-5)
        np.testing.assert_allclose(frames.std(axis=1), 1.0, atol=1e-4)
    for i, n in enumerate(lengths):
        assert not out[i, :, n:].any()


def test_moments_give_the_statistics_that_fit_computes():
    x, lengths, _ = _batch(1)
    direct = Normalizer.fit(x, lengths)
    halves = [moments(x[:5], lengths[:5]), moments(x[5:], lengths[5:])]
    pooled = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    via = Normalizer.from_moments(pooled)
    np.testing.assert_allclose(via.mean, direct.mean, rtol=1e-5)
    np.testing.assert_allclose(via.std, direct.std, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ring", "exponential", "star"])
def test_gossiped_statistics_agree_with_the_pooled_statistics(tmp_path, kind):
    cfg = RunConfig(model="svm", features="mfcc", rounds=2, local_steps=2, batch_size=8, checkpoint_every=0, normalizer="global",
                    stats_tolerance=1e-5, final_mixing=0)
    topology = make_topology(kind, 7)
    peers = make_peers(cfg, topology)
    raw = [p.learner.data.raw for p in peers]  # each peer's own training rows, before agreeing
    pooled = Normalizer.fit(np.concatenate([r[0] for r in raw]), np.concatenate([r[1] for r in raw]))
    own = [p.learner.data.normalizer for p in peers]
    Simulator(peers, topology, cfg, FaultPlan(), tmp_path).run()
    for p, before in zip(peers, own):
        agreed = p.learner.data.normalizer
        np.testing.assert_allclose(agreed.mean, pooled.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(agreed.std, pooled.std, rtol=1e-4)
        assert not np.allclose(before.mean, pooled.mean, atol=1e-3)  # it really moved from its own
        assert p.learner.data.raw is None  # raw features dropped once agreed
        # Training inputs were re-standardised with the agreed statistics.
        np.testing.assert_allclose(p.learner.trainer._x.numpy()[: len(p.learner.data.x_train)],
                                   p.learner.data.x_train, rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "peer-000" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["bytes_sent"] > 0 and len(rows) == cfg.rounds
    assert peers[0].statistics_rounds == rounds_to_agree(topology, cfg.stats_tolerance) > 0


def test_rounds_to_agree_grow_with_the_mixing_time():
    assert rounds_to_agree(make_topology("complete", 8), 1e-4) == 1
    assert rounds_to_agree(make_topology("ring", 20), 1e-4) > rounds_to_agree(make_topology("exponential", 20), 1e-4)


def test_a_bad_normalizer_is_one_line(synth_corpus, tmp_path):
    with pytest.raises(UserError, match="'normalizer'"):
        RunConfig(normalizer="per-utterance")
    proc = subprocess.run([sys.executable, "-m", "p2pser", "train", str(synth_corpus), "--normalizer", "nope",
                           "--out", str(tmp_path / "x")], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--normalizer" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["speaker", "global"])  # local: the behaviour other tests run
def test_every_mode_through_train_and_simulate(synth_corpus, feature_cache, tmp_path, mode):
    common = ["--features", "mfcc", "--max-seconds", "1.5", "--fold", "1", "--cache-dir", str(feature_cache)]
    train = subprocess.run([sys.executable, "-m", "p2pser", "train", str(synth_corpus), "--model", "svm",
                            "--epochs", "2", "--normalizer", mode, "--no-progress", *common,
                            "--out", str(tmp_path / "train")], check=False, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["normalizer"] == mode
    sim = subprocess.run([sys.executable, "-m", "p2pser", "simulate", str(synth_corpus), "--model", "svm",
                          "--final-mixing", "0", "--rounds", "3", "--local-steps", "2", "--normalizer", mode, *common,
                          "--out", str(tmp_path / "sim")], check=False, capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-2000:]
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["ua_mean"] is not None and summary["ua_average_model"] is not None
    norms = [json.loads((tmp_path / "sim" / f"peer-{k:03d}" / "normalizer.json").read_text())
             for k in range(summary["peers"])]
    np.testing.assert_allclose(norms[0]["mean"], norms[1]["mean"], atol=1e-3)  # one for all
