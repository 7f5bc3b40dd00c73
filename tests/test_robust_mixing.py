"""Byzantine-robust mixing (ClippedGossip, trimmed mean), the attack modes, and a small attacked simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from p2pser.carriers.faults import FaultPlan
from p2pser.cli import main
from p2pser.config import RunConfig
from p2pser.deploy.launch import write_config_toml
from p2pser.deploy.peer_process import build_peer
from p2pser.exchange.attacks import corrupt
from p2pser.exchange.codec import Decoder
from p2pser.exchange.mixing import ClippedGossip, Contribution, TrimmedMean, WeightedAverage, make_rule
from p2pser.exchange.topology import make_topology
from p2pser.experiments.simulate import simulate_run
from p2pser.partition.experiment import extract_for, make_plan
from p2pser.partition.experiment import test_set as fold_test_set
from p2pser.report.summary import summarize

ZERO = {"w": np.zeros(2, np.float32)}


def _c(sender: int, values, weight: float = 1.0) -> Contribution:
    return Contribution(sender, weight, {"w": np.asarray(values, np.float32)})


def _random_case(seed: int, n: int = 5) -> tuple[dict, list[Contribution]]:
    rng = np.random.default_rng(seed)
    own = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    others = [Contribution(s, float(rng.uniform(0.1, 1)), {k: (v + rng.normal(size=v.shape)).astype(np.float32)
                                                          for k, v in own.items()}) for s in range(1, n + 1)]
    return own, others


RULES = [WeightedAverage(), ClippedGossip(), ClippedGossip(0.5), TrimmedMean(1), TrimmedMean(2), TrimmedMean(3)]


# --- ClippedGossip ------------------------------------------------------------------------------------------


def test_clipping_bounds_an_outliers_pull_exactly():
    honest = [_c(1, [1, 0]), _c(2, [0, 1])]
    # Adaptive radius = median distance = 1: the outlier moves us by weight/total * 1 in its direction,
    # (1/4) * (1, 0), however far away it is.
    for far in (100.0, 1e6):
        mixed = ClippedGossip().mix(ZERO, 1.0, [*honest, _c(3, [far, 0])])["w"]
        np.testing.assert_allclose(mixed, [0.5, 0.25], rtol=1e-6)
    # A fixed radius 0.5 clips every neighbour: each contributes (1/4) * 0.5 in its direction.
    mixed = ClippedGossip(0.5).mix(ZERO, 1.0, [*honest, _c(3, [0, -100])])["w"]
    np.testing.assert_allclose(mixed, [0.125, 0.0], atol=1e-7)
    # Plain averaging is dragged by the outlier's full size.
    assert WeightedAverage().mix(ZERO, 1.0, [*honest, _c(3, [100, 0])])["w"][0] == pytest.approx(25.25)


def test_clipping_norm_is_over_the_whole_parameter_vector():
    own = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}
    far = Contribution(1, 1.0, {"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)})  # norm 5
    mixed = ClippedGossip(1.0).mix(own, 1.0, [far])
    # Clipped to norm 1 as one vector (0.6, 0.8), then weighted 1/2; per-tensor clipping would give (0.5, 0.5).
    assert (mixed["a"][0], mixed["b"][0]) == (pytest.approx(0.3), pytest.approx(0.4))


def test_clipping_with_a_radius_nobody_reaches_is_the_weighted_average():
    own, others = _random_case(0)
    clipped, plain = ClippedGossip(1e9).mix(own, 0.3, others), WeightedAverage().mix(own, 0.3, others)
    for k in own:
        np.testing.assert_allclose(clipped[k], plain[k], rtol=1e-5, atol=1e-6)


# --- TrimmedMean --------------------------------------------------------------------------------------------


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    others = [_c(1, [1, 5]), _c(2, [2, -100]), _c(3, [1000, 6])]
    # x: 1, 2, 1000 -> 2;  y: -100, 5, 6 -> 5. Own (0, 0) weight 1 and the neighbours' total weight 3.
    mixed = TrimmedMean(1).mix(ZERO, 1.0, others)["w"]
    np.testing.assert_allclose(mixed, [0.75 * 2, 0.75 * 5])


def test_trimmed_mean_without_trimming_and_equal_weights_is_the_average():
    own, others = _random_case(1)
    others = [Contribution(c.sender, 0.2, c.state) for c in others]
    trimmed, plain = TrimmedMean(0).mix(own, 0.4, others), WeightedAverage().mix(own, 0.4, others)
    for k in own:
        np.testing.assert_allclose(trimmed[k], plain[k], rtol=1e-6, atol=1e-6)


def test_too_few_neighbours_to_trim_gives_the_median_with_the_own_model():
    # Two neighbours, trim 1: median of own, 1 and 100 per coordinate; the outlier is ignored.
    mixed = TrimmedMean(1).mix({"w": np.array([0, 3], np.float32)}, 1.0, [_c(1, [1, 1]), _c(2, [100, 2])])["w"]
    np.testing.assert_array_equal(mixed, [1, 2])
    # One neighbour: the midpoint. A peer told to adopt (own weight 0, a fedavg client) takes it as is.
    np.testing.assert_array_equal(TrimmedMean(1).mix(ZERO, 1.0, [_c(1, [2, 4])])["w"], [1, 2])
    np.testing.assert_array_equal(TrimmedMean(1).mix(ZERO, 0.0, [_c(1, [2, 4])])["w"], [2, 4])


# --- every rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{getattr(r, 'radius', getattr(r, 'trim', ''))}")
def test_rule_agrees_with_itself_and_with_consensus(rule):
    own, others = _random_case(2)
    first = rule.mix(own, 0.5, others)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        again = rule.mix(own, 0.5, [others[i] for i in perm])
        assert all(np.array_equal(first[k], again[k]) for k in own)  # bit for bit, whatever the arrival order
    assert all(first[k].dtype == own[k].dtype and first[k].shape == own[k].shape for k in own)
    same = [Contribution(s, 0.7, {k: v.copy() for k, v in own.items()}) for s in range(1, 5)]
    agreed = rule.mix(own, 0.5, same)
    assert all(np.allclose(agreed[k], own[k], rtol=0, atol=1e-6) for k in own)
    alone = rule.mix(own, 0.5, [])
    assert all(np.array_equal(alone[k], own[k]) for k in own)


def test_make_rule_from_the_config():
    assert make_rule(RunConfig()).name == "average"
    clipped = make_rule(RunConfig(mixing="clipped", clip_radius=0.25))
    assert (clipped.name, clipped.radius) == ("clipped", 0.25)
    trimmed = make_rule(RunConfig(mixing="trimmed", trim=3))
    assert (trimmed.name, trimmed.trim) == ("trimmed", 3)


# --- attacks ------------------------------------------------------------------------------------------------


def test_attacks_are_what_the_attackers_send_and_leave_the_input_alone():
    own, _ = _random_case(3)
    before = {k: v.copy() for k, v in own.items()}
    base = RunConfig(attackers="1,4", attack_scale=3.0, seed=5)
    flipped = corrupt(own, base.replace(attack="sign-flip"), 4, 7)
    scaled = corrupt(own, base.replace(attack="scale"), 4, 7)
    for k in own:
        np.testing.assert_array_equal(flipped[k], -before[k])
        np.testing.assert_allclose(scaled[k], 3.0 * before[k], rtol=1e-6)
        np.testing.assert_array_equal(own[k], before[k])
    noisy = corrupt(own, base.replace(attack="random"), 4, 7)
    assert corrupt(own, base.replace(attack="random"), 4, 7)["a"].tolist() == noisy["a"].tolist()  # seeded
    assert corrupt(own, base.replace(attack="random"), 4, 8)["a"].tolist() != noisy["a"].tolist()  # per round
    assert corrupt(own, base.replace(attack="random"), 1, 7)["a"].tolist() != noisy["a"].tolist()  # per peer
    values = np.concatenate([v.ravel() for v in noisy.values()])
    assert abs(values.mean()) < 1.5 and 1.5 < values.std() < 4.5  # N(0, 3^2), 17 draws
    assert all(noisy[k].dtype == own[k].dtype and noisy[k].shape == own[k].shape for k in own)
    # Honest peers, and attackers when no attack is chosen, send their model untouched.
    for cfg, peer in ((base.replace(attack="sign-flip"), 2), (base, 4)):
        sent = corrupt(own, cfg, peer, 7)
        assert all(np.array_equal(sent[k], own[k]) for k in own)


# --- simulation on the synthetic corpus ---------------------------------------------------------------------

N, ATTACKERS = 10, (2, 7)


@pytest.fixture(scope="module")
def setup(synth_corpus, tmp_path_factory):
    # 10 peers on an exponential graph (degree 6): peers 1, 3, 6 and 8 have both attackers as neighbours.
    # The measured thresholds below were set with each peer's own statistics and no final averaging.
    cfg = RunConfig(model="svm", features="mfcc", max_seconds=1.5, partition="iid", rounds=20, local_steps=4,
                    eval_every=20, trim=2, attackers=",".join(map(str, ATTACKERS)), normalizer="local", final_mixing=0,
                    cache_dir=str(tmp_path_factory.mktemp("cache")))
    plan = make_plan(synth_corpus, cfg, N)
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg)
    return cfg, plan, features, row_of


def test_an_attacker_lies_on_the_wire_and_keeps_its_own_model(setup):
    cfg, plan, features, row_of = setup
    topology = make_topology("exponential", N)
    test = fold_test_set(features, row_of, plan)
    peer = build_peer(plan, topology, ATTACKERS[0], cfg.replace(attack="sign-flip"), features, row_of, test)
    own = peer.snapshot()
    frames = peer.encode(own, 3)
    sent = Decoder(peer.template).decode(frames)
    assert all(np.array_equal(sent.tensors[k], -own[k]) for k in own)
    assert all(np.array_equal(peer.snapshot()[k], own[k]) for k in own)
    honest = build_peer(plan, topology, 0, cfg.replace(attack="sign-flip"), features, row_of, test)
    sent = Decoder(honest.template).decode(honest.encode(honest.snapshot(), 3))
    assert all(np.array_equal(sent.tensors[k], honest.snapshot()[k]) for k in own)


def _honest(summary: dict) -> tuple[float, float]:
    honest = [p["ua"] for p in summary["per_peer"] if p["peer"] not in ATTACKERS]
    return float(np.mean(honest)), float(np.min(honest))


@pytest.mark.slow
def test_robust_mixing_keeps_honest_peers_learning_under_a_sign_flip_attack(setup, synth_corpus, tmp_path):
    cfg, plan, features, row_of = setup
    topology = make_topology("exponential", N)

    def simulate(name: str, **changes) -> dict:
        return simulate_run(plan, topology, "exponential", cfg.replace(**changes), FaultPlan(), tmp_path / name,
                            features=features, row_of=row_of)

    clean = _honest(simulate("clean"))
    averaged = _honest(simulate("average", attack="sign-flip"))
    clipped = _honest(simulate("clipped", attack="sign-flip", mixing="clipped"))
    # The trimmed arm runs through the CLI: the flags reach the peers.
    run = tmp_path / "trimmed"
    assert main(["simulate", str(synth_corpus), "--out", str(run), "--model", "svm", "--features", "mfcc",
                 "--max-seconds", "1.5", "--partition", "iid", "--peers", str(N), "--topology", "exponential",
                 "--final-mixing", "0", "--normalizer", "local", "--rounds", "20", "--local-steps", "4",
                 "--eval-every", "20", "--cache-dir", cfg.cache_dir,
                 "--mixing", "trimmed", "--trim", "2", "--attack", "sign-flip", "--attackers", "2,7"]) == 0
    trimmed = _honest(json.loads((run / "summary.json").read_text()))
    print(f"honest UA mean (min): clean {clean}, average {averaged}, clipped {clipped}, trimmed {trimmed}")
    # Measured (seed 0): clean 52.2 (46.9), average 28.8 (22.9), clipped 41.4 (37.5), trimmed 49.5 (45.8);
    # chance is 16.7 (6 classes).
    assert averaged[0] < clean[0] - 0.15  # plain averaging collapses
    assert trimmed[0] > clean[0] - 0.06 and trimmed[1] > clean[1] - 0.08  # trimmed stays near the clean run
    assert clipped[0] > averaged[0] + 0.07 and clipped[1] > averaged[1] + 0.07  # clipping bounds the damage

    # The report: honest-peer figures when the run folder names its attackers (launch writes config.toml).
    summary = json.loads((run / "summary.json").read_text())
    assert "honest_test_ua_mean" not in summary or summary["attackers"] == list(ATTACKERS)
    write_config_toml(cfg.replace(mixing="trimmed", attack="sign-flip"), run / "config.toml")
    summary = summarize(run, {}, wall_s=0.0)
    assert summary["attackers"] == list(ATTACKERS) and summary["honest_peers"] == N - 2
    assert math.isclose(summary["honest_test_ua_mean"], trimmed[0]) and summary["honest_test_ua_min"] == trimmed[1]
    assert summary["ua_mean"] == pytest.approx(np.mean([p["ua"] for p in summary["per_peer"]]))
    clean_summary = summarize(tmp_path / "clean", {}, wall_s=0.0)
    assert "attackers" not in clean_summary and "honest_test_ua_mean" not in clean_summary
