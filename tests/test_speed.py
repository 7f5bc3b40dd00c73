"""The simulator's speed-ups change no result: cached evaluation and functionals, learner worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2pser.audio.synth import synthesize_corpus
from p2pser.carriers.faults import FaultPlan, Outage
from p2pser.carriers.workers import RemoteLearner, WorkerError, WorkerPool
from p2pser.config import RunConfig, train_config
from p2pser.exchange.peer import build_peer
from p2pser.exchange.topology import make_topology
from p2pser.experiments.simulate import simulate_run
from p2pser.learn import evaluation
from p2pser.learn.models import build_model
from p2pser.learn.trainer import LocalTrainer, predict_scores
from p2pser.partition import experiment
from p2pser.partition.experiment import extract_for, make_plan
from p2pser.report.summary import load_models, read_metrics

N = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("synth")
    synthesize_corpus(corpus, speakers=6, per_emotion=5, seed=3)
    cfg = RunConfig(model="svm", features="mfcc", max_seconds=1.5, partition="iid", rounds=6, final_mixing=2,
                    local_steps=3, eval_every=1, cache_dir=str(tmp_path_factory.mktemp("cache")))
    plan = make_plan(corpus, cfg, N)
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg)
    return cfg, plan, features, row_of


def _run(setup, out, workers, kind="ring", faults=None, **changes):
    cfg, plan, features, row_of = setup
    cfg = cfg.replace(**changes)
    return simulate_run(plan, make_topology(kind, N), kind, cfg, faults or FaultPlan(), out, features=features,
                        row_of=row_of, workers=workers)


@pytest.mark.parametrize("case", [
    {"kind": "ring", "faults": FaultPlan(drop=0.1, churn=(Outage(2, 1, 4),)), "normalizer": "local"},
    pytest.param({"kind": "star", "algorithm": "fedavg", "model": "cnn1d-shallow"}, marks=pytest.mark.slow),
])
def test_two_learner_processes_give_the_same_run_as_one(setup, tmp_path, case):
    one = _run(setup, tmp_path / "one", 1, **case)
    two = _run(setup, tmp_path / "two", 2, **case)
    assert two["workers"] == 2 and one["workers"] == 1
    # Every field of every row, the virtual clock included: the same schedule, the same bits.
    assert read_metrics(tmp_path / "one") == read_metrics(tmp_path / "two")
    for (_, a, _), (_, b, _) in zip(load_models(tmp_path / "one"), load_models(tmp_path / "two"), strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert one["ua_average_model"] == two["ua_average_model"]


def test_a_failing_learner_call_is_raised_in_the_main_process(setup):
    cfg, plan, features, row_of = setup
    topology = make_topology("ring", N)
    test = experiment.test_set(features, row_of, plan, cfg.normalizer)
    pool = WorkerPool(2, N, lambda k: build_peer(plan, topology, k, cfg, features, row_of, test).learner)
    try:
        learner = RemoteLearner(pool, 3)
        assert learner.samples > 0 and set(learner.template) == {"fc.weight", "fc.bias"}
        with pytest.raises(WorkerError, match="KeyError"):
            learner.load({})  # deferred: the error comes with the next answer from that worker
            learner.snapshot()
        assert float(learner.train(2)) > 0  # the worker goes on serving after a failed call
    finally:
        pool.close()


@pytest.mark.parametrize("name", ["svm", "cnn1d-shallow"])
def test_cached_scores_are_predict_scores_bit_for_bit(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 13, 90)).astype(np.float32)
    x[:, :, 70:] = 0  # padding
    model = build_model(name, 13, 90, 4, seed=1)
    first = evaluation.scores(model, x)
    assert np.array_equal(first, predict_scores(model, x))
    assert evaluation.scores(model, x) is first  # the same parameters and input: evaluated once
    twin = build_model(name, 13, 90, 4, seed=1)  # another peer holding the same bits
    assert evaluation.scores(twin, x) is first
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    changed = evaluation.scores(model, x)
    assert changed is not first and np.array_equal(changed, predict_scores(model, x))


def test_svm_training_on_functionals_computed_once_is_bit_identical(setup):
    cfg, _, features, _ = setup
    rows = np.arange(40)
    x, y = features.x[rows], features.labels[rows] % 4
    recipe = train_config(cfg)
    trained = []
    for cached in (True, False):
        model = build_model("svm", x.shape[1], x.shape[2], 4, seed=2)
        trainer = LocalTrainer(model, x, y, 4, recipe, seed=5, total_steps=30)
        assert (trainer._fixed is not None) is True
        if not cached:
            trainer._fixed = None  # every step computes its batch's functionals, as before
        losses = [trainer.train_steps(5) for _ in range(3)]
        trained.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    assert trained[0][0] == trained[1][0]
    assert all(torch.equal(trained[0][1][k], trained[1][1][k]) for k in trained[0][1])


@pytest.mark.slow
def test_peers_trained_together_match_one_by_one(setup, tmp_path):
    """``--batch-peers``: the same run up to floating-point rounding, through churn (a checkpoint restored,
    the crashed peer rejoining out of step with the others, so it trains alone) and message loss."""
    case = {"kind": "ring", "faults": FaultPlan(drop=0.1, churn=(Outage(2, 1, 4),))}
    cfg, plan, features, row_of = setup
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = simulate_run(plan, make_topology("ring", N), "ring", cfg, case["faults"], tmp_path / mode,
                                  features=features, row_of=row_of, workers=1, batch_peers=mode)
    assert runs["off"]["batched_peers"] is None and runs["on"]["batched_peers"] > 2
    one, together = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert one.keys() == together.keys()
    for peer in one:
        assert len(one[peer]) == len(together[peer])
        for a, b in zip(one[peer], together[peer], strict=True):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float):
                    assert abs(value - b[key]) < 1e-4, (key, value, b[key])
                else:  # the schedule, the virtual clock's rounds, who was heard: the same
                    assert value == b[key], key
    for (_, a, _), (_, b, _) in zip(load_models(tmp_path / "off"), load_models(tmp_path / "on"), strict=True):
        assert all(np.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)


def _plain_average(own, own_weight, others):
    """The weighted average as it was written before it was blocked (one float64 temporary per term)."""
    total = own_weight + sum(c.weight for c in others)
    out = {}
    for name, value in own.items():
        acc = value.astype(np.float64) * (own_weight / total)
        for c in sorted(others, key=lambda c: c.sender):
            acc += c.state[name].astype(np.float64) * (c.weight / total)
        out[name] = acc.astype(value.dtype)
    return out


def test_blocked_mixing_and_distances_are_the_plain_expressions_bit_for_bit():
    from p2pser.exchange.mixing import (
        _BLOCK,
        ClippedGossip,
        Contribution,
        WeightedAverage,
        _distance,
        consensus_distance,
    )

    rng = np.random.default_rng(4)
    # Sizes around and far beyond a block, odd ones, an empty tensor: numpy's pairwise summation order is
    # what the blocked distance reproduces, so a numpy that changed it would fail here.
    for size in (0, 7, _BLOCK - 1, _BLOCK + 9, 5 * _BLOCK + 3, 1_631_488):
        own = {"w": rng.normal(size=size).astype(np.float32), "b": rng.normal(size=(3, 5)).astype(np.float32)}
        others = [{k: (v + rng.normal(size=v.shape) * 10.0 ** -j).astype(np.float32) for k, v in own.items()}
                  for j in range(4)]
        plain = [sum(float(np.sum((own[k].astype(np.float64) - o[k]) ** 2)) for k in own) ** 0.5 for o in others]
        assert consensus_distance(own, others) == float(np.mean(plain))
        assert _distance(others[1], own) == plain[1]
        contributions = [Contribution(s, float(rng.random()), o) for s, o in zip((5, 2, 9, 1), others)]
        mixed = WeightedAverage().mix(own, 0.3, contributions)
        want = _plain_average(own, 0.3, contributions)
        assert all(mixed[k].dtype == want[k].dtype and np.array_equal(mixed[k], want[k]) for k in own)
        assert ClippedGossip(radius=1e9).mix(own, 0.3, contributions).keys() == own.keys()


def test_the_allocator_setting_is_idempotent_and_harmless():
    from p2pser.runtime import tune_allocator

    tune_allocator()
    tune_allocator()
    a = np.ones(4 << 20)  # 32 MB: from the heap now, freed and reused
    del a
    assert np.ones(4 << 20).sum() == 4 << 20


def test_heap_blocks_are_only_ever_raised_and_capped(monkeypatch):
    import p2pser.runtime as runtime

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(runtime, "_kept_block_bytes", 0)
    runtime.keep_blocks_up_to(200 << 20)
    runtime.keep_blocks_up_to(64 << 20)  # lower: no change
    runtime.keep_blocks_up_to(8 << 30)  # capped at 1 GB
    assert calls == [(-3, 200 << 20), (-1, 800 << 20), (-3, 1 << 30), (-1, 4 << 30)]
