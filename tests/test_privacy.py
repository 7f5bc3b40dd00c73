"""Differential privacy: the accountant against published and exact values, clipping bounds what leaves a
peer, noise is fresh per round and per peer, and epsilon reaches metrics rows and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.algorithms import _StopRule
from p2pser.exchange.mixing import WeightedAverage
from p2pser.exchange.peer import make_learner
from p2pser.exchange.privacy import SpeakerPrivate
from p2pser.learn.data import PeerData
from p2pser.learn.models import build_model
from p2pser.learn.privacy import DPSGD, PrivacyPlan, calibrate, epsilon_spent

CLASSES = ["angry", "happy", "neutral", "sad"]
CHANNELS, FRAMES = 6, 20


def data(peer_id: int, utterances: int = 24) -> PeerData:
    rng = np.random.default_rng(100 + peer_id)
    x = rng.normal(size=(utterances + 4, CHANNELS, FRAMES)).astype(np.float32)
    y = np.arange(utterances + 4) % len(CLASSES)
    lengths = np.full(utterances + 4, FRAMES)
    return PeerData.from_arrays(x, y, lengths, np.arange(4, utterances + 4), (x[:4], y[:4], lengths[:4]), CLASSES,
                                val_fraction=0.0, seed=peer_id)


def config(**changes) -> RunConfig:
    return RunConfig(model="svm", rounds=5, local_steps=2, batch_size=4, val_fraction=0.0, eval_every=100,
                     final_mixing=0, lr=0.5).replace(**changes)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon of a mu-GDP mechanism (a Gaussian of sensitivity/sigma = mu) at ``delta``, exactly
    (Balle & Wang 2018; Dong, Roth & Su 2019): solve delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


def test_accountant_matches_abadi_et_al():
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 gives epsilon 1.26 with
    # the moments accountant. RDP is the moments accountant made tighter, PRV tighter still.
    rdp = epsilon_spent(4.0, 0.01, 10_000, 1e-5, "rdp")
    prv = epsilon_spent(4.0, 0.01, 10_000, 1e-5, "prv")
    assert 0.9 < prv <= rdp <= 1.26


def test_accountant_matches_the_exact_gaussian_composition():
    # Without subsampling, T Gaussian mechanisms of noise multiplier sigma are one Gaussian mechanism of
    # sigma / sqrt(T), whose epsilon is known exactly: PRV is (numerically) exact, RDP an upper bound.
    sigma, steps, delta = 3.0, 60, 1e-5
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert epsilon_spent(sigma, 1.0, steps, delta, "prv") == pytest.approx(exact, rel=0.02)
    assert exact <= epsilon_spent(sigma, 1.0, steps, delta, "rdp") <= 1.2 * exact


@pytest.mark.parametrize("rate,steps", [(1.0, 60), (0.3, 480)])
def test_calibrated_noise_spends_the_target(rate, steps):
    sigma = calibrate(4.0, 1e-5, rate, steps)
    assert 0.99 * 4.0 <= epsilon_spent(sigma, rate, steps, 1e-5) <= 4.0


def test_meaningless_delta_and_overspending_noise_are_refused():
    with pytest.raises(UserError, match="not below 1/20"):
        PrivacyPlan.make("speaker", epsilon=1.0, noise_multiplier=None, clip=1.0, delta=0.1, sample_rate=1.0,
                         steps=10, records=20)
    with pytest.raises(UserError, match="more than --dp-epsilon 1"):
        PrivacyPlan.make("speaker", epsilon=1.0, noise_multiplier=0.5, clip=1.0, delta=1e-5, sample_rate=1.0,
                         steps=10, records=20)
    with pytest.raises(UserError, match="needs --dp-epsilon"):
        RunConfig(dp="utterance")


def test_cli_refuses_an_impossible_budget_in_one_line(synth_corpus, tmp_path, capsys):
    code = main(["simulate", str(synth_corpus), "--topology", "ring", "--model", "svm", "--features", "mfcc",
                 "--rounds", "50", "--dp", "speaker", "--dp-epsilon", "1", "--dp-noise-multiplier", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "more than --dp-epsilon 1" in err


def speaker_learner(peer_id: int, *, clip: float, noise: float, **changes):
    cfg = config(dp="speaker", dp_noise_multiplier=noise, dp_clip=clip, **changes)
    learner = make_learner(data(peer_id), cfg, peer_id, n_peers=20)
    assert isinstance(learner, SpeakerPrivate)
    return learner


def change(a, b) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_speaker_dp_clips_what_is_sent():
    learner = speaker_learner(0, clip=0.05, noise=1e-9)
    start = learner.snapshot()
    learner.train(4)
    trained = learner.snapshot()
    assert change(trained, start) > 0.5  # the private model moved far ...
    sent = learner.outgoing(trained, 0)
    assert change(sent, start) <= 0.05 * (1 + 1e-4)  # ... what is sent moved by the clip at most
    assert learner.outgoing(trained, 0) is sent  # one release per round, whoever asks (a pull answer)
    learner.mix(trained, 1.0, [], WeightedAverage())
    assert change(learner.snapshot(), sent) == 0  # it goes on from its release, never its private model
    assert learner.privacy()["dp_epsilon"] > 0


def noise_of(learner, rounds: int) -> list[np.ndarray]:
    """What each round's release added to the base, with the clip so small that it is noise alone."""
    out = []
    for r in range(rounds):
        base = learner.snapshot()
        learner.train(1)
        sent = learner.outgoing(learner.snapshot(), r)
        out.append(np.concatenate([(sent[k].astype(np.float64) - base[k]).ravel() for k in sorted(sent)]))
        learner.mix(sent, 1.0, [], WeightedAverage())
    return out


def test_speaker_dp_noise_is_fresh_per_round_and_per_peer():
    a = noise_of(speaker_learner(0, clip=1e-9, noise=1e8), 3)
    b = noise_of(speaker_learner(1, clip=1e-9, noise=1e8), 3)
    std = 1e8 * 1e-9
    for noise in a + b:
        assert np.std(noise) == pytest.approx(std, rel=0.15)
    pairs = [(a[0], a[1]), (a[1], a[2]), (a[0], b[0]), (a[1], b[1])]
    for x, y in pairs:
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.2  # independent draws
    again = noise_of(speaker_learner(0, clip=1e-9, noise=1e8), 3)
    assert np.allclose(again[1], a[1])  # seeded by the run's seed: the same run repeats
    secure = noise_of(speaker_learner(0, clip=1e-9, noise=1e8, dp_noise="os"), 1)
    assert not np.allclose(secure[0], a[0])


def test_utterance_dp_clips_each_utterance_and_counts_steps():
    torch.manual_seed(0)
    model = build_model("cnn1d-shallow", CHANNELS, FRAMES, len(CLASSES), seed=0)
    plan = PrivacyPlan.make("utterance", epsilon=None, noise_multiplier=1e-9, clip=0.01, delta=1e-5,
                            sample_rate=0.5, steps=10, records=1000)
    dp = DPSGD(model, plan, expected_units=4.0, seed=0)
    x, y = torch.randn(8, CHANNELS, FRAMES), torch.arange(8) % len(CLASSES)
    torch.nn.functional.cross_entropy(dp.forward(x), y, reduction="sum").backward()
    dp.privatize()
    grad = math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))
    assert 0 < grad <= 8 * 0.01 / 4.0 * (1 + 1e-4)  # 8 utterances, each clipped to 0.01, over 4 expected
    assert dp.accountant.steps == 1


def test_utterance_dp_trains_the_gru_model_with_unchanged_parameter_names():
    names = list(build_model("crnn", 40, 100, 4, seed=0).state_dict())
    cfg = config(model="crnn", dp="utterance", dp_epsilon=8.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(28, 40, 100)).astype(np.float32)
    y, lengths = np.arange(28) % 4, np.full(28, 100)
    peer_data = PeerData.from_arrays(x, y, lengths, np.arange(4, 28), (x[:4], y[:4], lengths[:4]), CLASSES,
                                     val_fraction=0.0, seed=0)
    learner = make_learner(peer_data, cfg, 0)
    before = learner.snapshot()
    learner.train(2)
    assert sorted(learner.snapshot()) == sorted(names)
    assert change(learner.snapshot(), before) > 0
    assert 0 < learner.privacy()["dp_epsilon"] < 8.0


def test_stop_rule_stops_when_the_next_round_would_exceed_the_budget():
    cfg = config(dp="speaker", dp_epsilon=1.0)
    stop = _StopRule(cfg, "val_ua")
    assert not stop.done({"peer": 0, "round": 1, "dp_epsilon": 0.5}, 0.0)
    assert stop.done({"peer": 0, "round": 1, "dp_epsilon": 0.9, "dp_exhausted": True}, 0.0)
    # after the last training round the budget is spent as planned: final averaging goes on
    assert not stop.done({"peer": 0, "round": cfg.rounds - 1, "dp_epsilon": 1.0, "dp_exhausted": True}, 0.0)


@pytest.mark.parametrize("mode", ["speaker", "utterance"])
def test_simulated_run_reports_epsilon_per_peer_per_round(mode, synth_corpus, tmp_path):
    import json

    out = tmp_path / "run"
    code = main(["simulate", str(synth_corpus), "--topology", "ring", "--model", "svm", "--features", "mfcc",
                 "--rounds", "4",
                 "--final-mixing", "1", "--local-steps", "2", "--max-seconds", "1.5", "--eval-every", "2",
                 "--dp", mode, "--dp-epsilon", "3", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp_mode"] == mode and summary["dp_delta"] == 1e-5
    assert 2.9 <= summary["dp_epsilon"] <= 3.0
    for peer in out.glob("peer-*"):
        rows = [json.loads(line) for line in (peer / "metrics.jsonl").read_text().splitlines()]
        spent = [r["dp_epsilon"] for r in rows]
        assert len(rows) == 5 and spent == sorted(spent) and spent[0] > 0
        assert spent[-1] == spent[-2]  # the final averaging round releases nothing new


@pytest.mark.slow
def test_launch_runs_both_dp_modes_through_real_peers_and_matches_the_simulator(synth_corpus, feature_cache, tmp_path):
    import json
    import subprocess
    import sys

    from test_launch import topology_file

    topo = topology_file(tmp_path, "ring", 3)
    opts = ["--model", "svm", "--features", "mfcc", "--partition", "iid", "--max-seconds", "1.5", "--rounds", "3", "--final-mixing", "1",
            "--local-steps", "2", "--eval-every", "2", "--dp-epsilon", "5", "--record-updates", "first-layer",
            "--cache-dir", str(feature_cache)]
    for mode in ("speaker", "utterance"):
        runs = {}
        for command in ("launch", "simulate") if mode == "utterance" else ("launch",):
            out = tmp_path / f"{command}-{mode}"
            where = [str(topo), str(synth_corpus), "--quiet"] if command == "launch" else \
                [str(synth_corpus), "--topology", str(topo)]
            result = subprocess.run([sys.executable, "-m", "p2pser", command, *where, "--dp", mode, *opts,
                                     "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[command] = json.loads((out / "summary.json").read_text())
            assert (out / "peer-000" / "updates.npz").exists()
        assert runs["launch"]["dp_mode"] == mode and 4.9 <= runs["launch"]["dp_epsilon"] <= 5.0
    # The same seeded noise and the same peer code: the launch tells the simulator's story.
    assert runs["launch"]["dp_epsilon_per_peer"] == runs["simulate"]["dp_epsilon_per_peer"]
    assert runs["launch"]["ua_mean"] == pytest.approx(runs["simulate"]["ua_mean"], abs=1e-9)
