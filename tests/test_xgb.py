"""XGBoost by ensemble exchange: the wire checks, the learner, simulate and a real two-peer launch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_launch import N_CLASSES, p2pser, topology_file

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.codec import CodecError, Decoder, encode
from p2pser.features.normalize import Normalizer
from p2pser.learn import trees
from p2pser.learn.bagging import BaggingLearner
from p2pser.learn.data import PeerData
from p2pser.learn.tasks import CLASSIFICATION

XGB = ["--model", "xgb", "--algorithm", "bagging", "--features", "mfcc", "--max-seconds", "1.5",
       "--partition", "iid", "--local-steps", "10"]


def _learner(peer_id: int, seed: int = 0, n: int = 60, features: int = 6) -> BaggingLearner:
    """A learner on separable random data: class k has feature k shifted by 2."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, features, 1)).astype(np.float32)
    x[np.arange(n), y, 0] += 2.0
    data = PeerData(x_train=x[:40], y_train=y[:40], x_val=x[40:50], y_val=y[40:50], x_test=x[50:], y_test=y[50:],
                    lengths_test=np.ones(10, np.int64), classes=["a", "b", "c"], normalizer=Normalizer.identity(features))
    data.mode = "speaker"  # test inputs as they are
    return BaggingLearner(data, "egemaps", CLASSIFICATION, peer_id=peer_id, seed=0, total_trees=20)


def _decoder(learner: BaggingLearner) -> Decoder:
    return Decoder(learner.template, checks={"model": learner.check})


def _frames(state, sender=1):
    return encode(state, sender=sender, round=0, samples=40)


def test_an_ensemble_crosses_the_wire_and_joins_the_bag():
    a, b = _learner(0), _learner(1, seed=1)
    a.train(10)
    b.train(10)
    message = _decoder(a).decode(_frames(b.offer({})))
    assert message.tensors["index"].tolist() == [[1, 10, 40, b.held[1].raw.size]]
    from p2pser.exchange.mixing import Contribution

    a.mix(a.snapshot(), 1.0, [Contribution(1, 40.0, message.tensors)], None)
    assert sorted(a.holdings().items()) == [(0, 10), (1, 10)] and len(a.bag()) == 2
    assert a.evaluate()["test_ua"] > 0.6
    # What a neighbour already holds is listed, not attached again.
    again = b.offer(a.holdings())
    assert again["ensembles"].size == 0 and again["index"][0, 3] == 0
    assert BaggingLearner.advertised(again) == {1: 10}


def _corrupt(raw: np.ndarray, change) -> np.ndarray:
    doc = json.loads(bytes(raw))
    change(doc)
    return np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)


def _tree(doc):
    return doc["learner"]["gradient_booster"]["model"]["trees"][0]


@pytest.mark.parametrize("change, reason", [
    (lambda d: _tree(d)["left_children"].__setitem__(0, 10_000), "children outside the tree"),
    (lambda d: _tree(d)["split_indices"].__setitem__(0, 99), "splits on feature 99"),
    (lambda d: d["learner"]["learner_model_param"].__setitem__("num_class", "4"), "4 classes, this run 3"),
    (lambda d: d["learner"]["objective"].__setitem__("name", "reg:squarederror"), "objective"),
    (lambda d: _tree(d)["base_weights"].__setitem__(0, "x"), "not a finite number"),
    (lambda d: _tree(d)["parents"].pop(), "does not have"),
])
def test_a_malformed_ensemble_is_rejected_with_its_reason(change, reason):
    a, b = _learner(0), _learner(1, seed=1)
    b.train(5)
    raw = _corrupt(b.held[1].raw, change)
    state = {"index": np.array([[1, 5, 40, raw.size]], np.int64), "ensembles": raw}
    with pytest.raises(CodecError, match=reason) as caught:
        _decoder(a).decode(_frames(state))
    assert caught.value.reason == "content" and "ensemble of peer 1" in str(caught.value)


def test_garbage_and_inconsistent_indexes_are_rejected():
    a = _learner(0)
    garbage = np.frombuffer(b"\x00\xff not json", np.uint8)
    cases = {
        "not xgboost JSON": {"index": np.array([[1, 1, 40, garbage.size]], np.int64), "ensembles": garbage},
        "attaches 5 bytes": {"index": np.array([[1, 1, 40, 5]], np.int64), "ensembles": garbage},
        "origins repeat": {"index": np.array([[1, 1, 4, 0], [1, 2, 4, 0]], np.int64), "ensembles": garbage[:0]},
    }
    for reason, state in cases.items():
        with pytest.raises(CodecError, match=reason):
            _decoder(a).decode(_frames(state))
    with pytest.raises(CodecError, match="template"):  # the shape of the index is fixed in its second axis
        _decoder(a).decode(_frames({"index": np.zeros((1, 3), np.int64), "ensembles": garbage[:0]}))


def test_cyclic_boosting_passes_each_ensemble_round_the_ring():
    from p2pser.exchange.mixing import Contribution

    peers = [_learner(k, seed=k) for k in range(3)]
    for p in peers:
        p.cyclic, p.n_peers = True, 3
    for r in range(3):
        offers = {}
        for p in peers:
            p.at_round(r, training=True)
            p.train(5)
            # While training, a neighbour gets only the ensemble it extends next round: the one p just grew.
            offers[p.id] = {j: _decoder(p).decode(_frames(p.offer(peers[j].holdings(), to=j), sender=p.id))
                            for j in range(3) if j != p.id}
            grown = (p.id - r) % 3
            sent = offers[p.id][(p.id + 1) % 3].tensors["index"]
            assert [o for o, _, _, size in sent.tolist() if size] == [grown]
            assert p.holdings()[grown] == 5 * (r + 1)
            assert not offers[p.id][(p.id + 2) % 3].tensors["ensembles"].size
        for p in peers:
            p.mix(p.snapshot(), 1.0, [Contribution(s, 40.0, offers[s][p.id].tensors) for s in range(3) if s != p.id],
                  None)
    # Every ensemble was boosted by all three peers in turn (three times five trees, 3 x 40 utterances).
    for p in peers:
        assert all(p.held[o].version == 15 and p.held[o].samples == 120 for o in p.held if o == (p.id - 2) % 3)
    assert peers[0].evaluate()["test_ua"] > 0.6


def test_checkpoint_restores_the_bag():
    a, b = _learner(0), _learner(1, seed=1)
    a.train(5)
    restored = _learner(0)
    restored.restore(a.checkpoint_state())
    assert restored.holdings() == a.holdings() and restored.boosted == 5
    np.testing.assert_allclose(restored.predict_proba(a.data.x_test), a.predict_proba(a.data.x_test))
    assert b.train(100) == b.train(5)  # at total_trees no more boosting


def test_xgb_runs_only_with_the_bagging_algorithm():
    with pytest.raises(UserError, match="--algorithm bagging"):
        RunConfig(model="xgb")
    with pytest.raises(UserError, match="--algorithm bagging"):
        RunConfig(algorithm="bagging")


@pytest.mark.slow  # a CLI process that extracts, simulates 4 peers and trains the pooled model: ~15-50 s
def test_xgb_by_bagging_in_simulate_reaches_every_peer_with_a_pooled_baseline(tmp_path, synth_corpus, feature_cache):
    run = tmp_path / "sim"
    result = p2pser("simulate", synth_corpus, "--peers", "4", "--topology", "ring", "--rounds", "2",
                    "--final-mixing", "2", "--eval-every", "1", "--baseline", "centralized", "--out", run,
                    "--cache-dir", feature_cache, *XGB, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "bagging" and summary["peers"] == 4
    assert summary["ua_mean"] > 1 / N_CLASSES + 0.2 and summary["baseline_centralized_ua"] > 1 / N_CLASSES + 0.2
    assert summary["bytes_sent_max_peer"] > 0
    for k in range(4):
        rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
        # On a ring of 4 the farthest ensemble is two links away: all four arrive by the last round.
        assert rows[0]["bag_size"] == 3 and rows[-1]["bag_size"] == 4, [r["bag_size"] for r in rows]
        assert all(r["rejected"] == 0 for r in rows)
        with np.load(run / f"peer-{k:03d}" / "ensembles.npz") as saved:
            assert sorted(saved["index"][:, 0].tolist()) == [0, 1, 2, 3]


@pytest.mark.slow  # a CLI process that simulates 4 peers: ~5-15 s
def test_xgb_by_histogram_boosting_in_simulate_grows_one_ensemble_at_every_peer(tmp_path, synth_corpus,
                                                                                 feature_cache):
    run = tmp_path / "sim"
    # A ring of 4 has diameter 2: two rounds per level, 4 levels per iteration after the bin edges, one round to
    # start: 2 x (1 + 10 x 4) + 1 = 83 rounds grow 10 iterations (fewer levels when trees stop early).
    result = p2pser("simulate", synth_corpus, "--peers", "4", "--topology", "ring", "--rounds", "83",
                    "--final-mixing", "1", "--eval-every", "20", "--out", run, "--cache-dir", feature_cache,
                    *XGB, "--boosting", "histogram", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ua_mean"] > 1 / N_CLASSES + 0.2 and summary["ua_min"] == summary["ua_max"]
    assert summary["bytes_sent_max_peer"] > 0
    models = []
    for k in range(4):
        rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["rejected"] == 0 for r in rows) and rows[-1]["boosting_iterations"] >= 10
        with np.load(run / f"peer-{k:03d}" / "histboost.npz") as saved:
            models.append({name: saved[name] for name in saved.files})
    for model in models[1:]:  # every peer grew the very same trees
        assert all(np.array_equal(v, model[name]) for name, v in models[0].items())


@pytest.mark.slow
def test_xgb_by_bagging_in_a_real_two_peer_launch(tmp_path, synth_corpus, feature_cache):
    """Also cyclic boosting (each peer's ensemble comes back to it grown) and augmentation in real peers
    (each perturbs its own audio, from the cache the launcher filled)."""
    topo = topology_file(tmp_path, "ring", 2)
    run = tmp_path / "run"
    result = p2pser("launch", topo, synth_corpus, "--out", run, "--rounds", "2", "--final-mixing", "1",
                    "--eval-every", "1", "--cache-dir", feature_cache, "--quiet", *XGB,
                    "--boosting", "cyclic", "--augment", "noise", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "launch" and summary["ua_mean"] > 1 / N_CLASSES + 0.2
    for k in range(2):
        rows = [json.loads(line) for line in (run / f"peer-{k:03d}" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["bag_size"] == 2 and rows[-1]["bytes_sent"] > 0 and rows[-1]["rejected"] == 0
        with np.load(run / f"peer-{k:03d}" / "ensembles.npz") as saved:
            assert sorted(saved["index"][:, 0].tolist()) == [0, 1]
            assert saved["index"][:, 1].tolist() == [20, 20]  # 2 rounds x 10 trees, by both peers in turn
            raw = saved["ensembles"][: saved["index"][0, 3]]
            trees.from_wire(raw, n_features=240, n_classes=N_CLASSES)  # mfcc mean + std: 2 x 120 channels


def test_mlp_reads_one_vector_per_utterance_or_frame_statistics():
    import torch

    from p2pser.learn.models import build_model

    vectors = build_model("mlp", 88, 1, 7, seed=0)
    assert vectors(torch.randn(4, 88, 1)).shape == (4, 7)
    assert vectors.features[1].in_features == 88  # the functionals themselves, no time statistics
    frames = build_model("mlp", 40, 100, 7, seed=0)
    assert frames(torch.randn(4, 40, 100)).shape == (4, 7) and frames.features[1].in_features == 80


# -- --boosting histogram: one ensemble, every split on gradient histograms summed over all peers ----------

def _hist_learner(peer_id: int, n_peers: int, *, train: int = 40, iterations: int = 4):
    """``_learner``'s separable data (another draw per peer) with ``train`` training rows and 100 test rows."""
    from p2pser.learn.histboost import HistogramLearner

    rng = np.random.default_rng(peer_id)
    n = train + 100
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 6, 1)).astype(np.float32)
    x[np.arange(n), y, 0] += 2.0
    data = PeerData(x_train=x[:train], y_train=y[:train], x_val=x[:0], y_val=y[:0], x_test=x[train:],
                    y_test=y[train:], lengths_test=np.ones(100, np.int64), classes=["a", "b", "c"],
                    normalizer=Normalizer.identity(6))
    data.mode = "speaker"
    return HistogramLearner(data, "egemaps", CLASSIFICATION, peer_id=peer_id, seed=0, n_peers=n_peers,
                            iterations=iterations)


def _exchange(learners, neighbours, *, max_rounds: int = 500) -> tuple[int, int]:
    """Run the ``bagging`` algorithm's round (train, offer what each neighbour has not listed, decode and
    check, mix, remember what it listed plus what we attached) until every learner has finished; returns
    (rounds, contributions attached over all links)."""
    from p2pser.exchange.mixing import Contribution

    known = {p.id: {} for p in learners}
    attached_total = 0
    for r in range(max_rounds):
        if all(p.finished for p in learners):
            return r, attached_total
        inbox, attached = {p.id: {} for p in learners}, {}
        for p in learners:
            p.train(1)
        for p in learners:
            for j in neighbours[p.id]:
                offer = p.offer(known[p.id].get(j, {}), to=j)
                attached[p.id, j] = {int(k): 1 for k, _, _, size in offer["index"].tolist() if size}
                attached_total += len(attached[p.id, j])
                inbox[j][p.id] = _decoder(learners[j]).decode(_frames(offer, sender=p.id)).tensors
        for p in learners:
            p.mix(p.snapshot(), 1.0, [Contribution(s, 1.0, t) for s, t in sorted(inbox[p.id].items())], None)
            for s, tensors in inbox[p.id].items():
                known[p.id][s] = p.advertised(tensors) | attached[p.id, s]
    raise AssertionError(f"not finished after {max_rounds} rounds: steps {[p.step for p in learners]}")


def test_histogram_peers_build_the_same_trees_relaying_each_contribution_once_per_link():
    """Four peers on a ring, each with its own data: every peer ends with bit-identical trees (they summed
    the same histograms in the same order), and with shortest-path relays every contribution crossed n - 1
    links (flooding would attach some twice)."""
    ring = {k: [(k - 1) % 4, (k + 1) % 4] for k in range(4)}
    learners = [_hist_learner(k, 4) for k in range(4)]
    for p in learners:
        p.use_topology([ring[k] for k in range(4)])
    rounds, attached = _exchange(learners, ring)
    first = learners[0].forest.arrays()
    for p in learners:
        assert p.iteration == 4 and p.complete_trees == 4 * 3
        assert all(np.array_equal(first[k], v) for k, v in p.forest.arrays().items())
    steps = learners[0].step  # step 0 (bin edges) and one per level grown
    assert attached == steps * 4 * 3 and rounds <= 2 * steps + 2  # diameter 2: two rounds a step
    flooded = [_hist_learner(k, 4) for k in range(4)]
    _, attached_flooding = _exchange(flooded, ring)
    assert attached_flooding > attached
    assert all(np.array_equal(first[k], v) for k, v in flooded[0].forest.arrays().items())
    assert learners[0].evaluate()["test_ua"] > 0.6


def test_histogram_boosting_on_one_peer_is_close_to_pooled_xgb():
    """Sanity: with one peer, histogram boosting is pooled boosting; its test accuracy is close to xgboost's
    with the same recipe and number of iterations, and so is its training loss."""
    learner = _hist_learner(0, 1, train=240, iterations=30)
    while not learner.finished:
        learner.train(1)
    data = learner.data
    booster = trees.boost(trees.utterance_vectors(data.x_train), data.y_train, 3, 30, seed=0)
    reference = CLASSIFICATION.score(data.y_test, trees.probabilities(booster, trees.utterance_vectors(data.x_test)),
                                     data.classes)["ua"]
    ours = learner.evaluate()["test_ua"]
    assert abs(ours - reference) <= 0.1 and ours > 0.6, (ours, reference)
    p = trees.probabilities(booster, trees.utterance_vectors(data.x_train))[np.arange(240), data.y_train]
    assert learner.train(1) == pytest.approx(float(-np.mean(np.log(p))), rel=0.15)


def test_histogram_checkpoint_restores_and_the_model_is_saved_without_pickle(tmp_path):
    learners = [_hist_learner(k, 2, iterations=3) for k in range(2)]
    twins = [_hist_learner(k, 2, iterations=3) for k in range(2)]
    pair = {0: [1], 1: [0]}
    _exchange(learners, pair)
    for learner, twin in zip(learners, twins):  # a restored learner predicts as its original
        twin.restore(learner.checkpoint_state())
        np.testing.assert_allclose(twin.predict_proba(learner.data.x_test), learner.predict_proba(learner.data.x_test))
    learners[0].save(tmp_path)
    with np.load(tmp_path / "histboost.npz", allow_pickle=False) as saved:
        assert len(saved["roots"]) == 9 and int(saved["iterations"]) == 3 and saved["cuts"].shape[0] == 6
    # Halfway through: a restored pair goes on to the very trees the uninterrupted pair grows.
    halfway = [_hist_learner(k, 2, iterations=3) for k in range(2)]
    _exchange_rounds(halfway, pair, 5)
    resumed = [_hist_learner(k, 2, iterations=3) for k in range(2)]
    for learner, twin in zip(halfway, resumed):
        twin.restore(learner.checkpoint_state())
    _exchange(resumed, pair)
    assert all(np.array_equal(v, resumed[1].forest.arrays()[k]) for k, v in learners[1].forest.arrays().items())


def _exchange_rounds(learners, neighbours, rounds: int) -> None:
    try:
        _exchange(learners, neighbours, max_rounds=rounds)
    except AssertionError:
        pass


def test_a_malformed_histogram_contribution_is_rejected_with_its_reason():
    a, b = _hist_learner(0, 2), _hist_learner(1, 2)
    b.train(1)
    good = b.offer({})
    assert _decoder(a).decode(_frames(good)).tensors["index"].shape == (2, 4)  # step 0 and b's step marker
    cells, sums, index = good["cells"], good["sums"], good["index"]
    marker = index[-1:]

    def state(index=index, cells=cells, sums=sums):
        return {"index": np.asarray(index, np.int64), "cells": np.asarray(cells, np.int32),
                "sums": np.asarray(sums, np.float32)}

    cases = {
        "origin 7, this run has 2 peers": state(index=np.concatenate([[[7, 1, 0, 0]], marker])),
        "steps must lie": state(index=np.concatenate([[[4096 * 10**6 + 1, 1, 0, 0]], marker])),
        "step marker is missing": state(index=index[:1]),
        "attaches": state(cells=cells[:-1], sums=sums[:-1]),
        "cells not increasing": state(cells=cells[::-1].copy()),
        "negative": state(sums=sums * np.array([1, -1], np.float32)),
        "listed twice": state(index=np.concatenate([index[:1], index[:1], marker])),
        "cells but": state(sums=sums[:-1]),
    }
    for reason, bad in cases.items():
        with pytest.raises(CodecError, match=reason) as caught:
            _decoder(a).decode(_frames(bad))
        assert caught.value.reason == "content"
    a.train(1)  # past step 0 the layout is known: a histogram cell outside it is refused
    step1 = state(index=np.array([[4096 + 1, 1, 0, 1], [4096 + 4095, 1, 0, 0]]), cells=[10**7], sums=[[0, 1]])
    with pytest.raises(CodecError, match="outside"):
        _decoder(a).decode(_frames(step1))
