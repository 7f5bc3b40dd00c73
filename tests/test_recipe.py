"""The decentralized recipe's parts: final averaging rounds, K-GT gradient tracking, and what becomes of the
optimiser's state across averaging (kept, reset, quasi-global momentum). Simulated peers on random
features: fast, deterministic, and the same code a real peer runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_carriers import make_peers

from p2pser.carriers.faults import FaultPlan
from p2pser.carriers.simulated import Simulator
from p2pser.config import RunConfig
from p2pser.exchange.checkpoint import CHECKPOINT_NAME, Checkpointer, save_checkpoint
from p2pser.exchange.codec import Decoder, encode
from p2pser.exchange.topology import make_topology

BASE = RunConfig(model="svm", features="mfcc", rounds=4, local_steps=3, batch_size=8, eval_every=2, checkpoint_every=0, final_mixing=0)


def simulate(tmp_path, cfg: RunConfig, topology=None):
    topology = topology or make_topology("ring", 6)
    peers = make_peers(cfg, topology)
    Simulator(peers, topology, cfg, FaultPlan(), tmp_path).run()
    rows = {p.id: [json.loads(line) for line in (tmp_path / f"peer-{p.id:03d}" / "metrics.jsonl").read_text().splitlines()]
            for p in peers}
    return peers, rows


def test_final_mixing_rounds_average_without_training_until_the_peers_agree(tmp_path):
    cfg = BASE.replace(final_mixing=12)
    peers, rows = simulate(tmp_path, cfg)
    for k, peer_rows in rows.items():
        assert [r["round"] for r in peer_rows] == list(range(cfg.rounds + cfg.final_mixing))
        assert all(r["loss"] is not None for r in peer_rows[: cfg.rounds])
        assert all(r["loss"] is None for r in peer_rows[cfg.rounds:])  # no local steps
        assert "test_ua" in peer_rows[-1]  # the last round of the schedule is evaluated
        assert peers[k].learner.trainer.step == cfg.rounds * cfg.local_steps
    first = np.mean([r[0]["consensus_distance"] for r in rows.values()])
    last = np.mean([r[-1]["consensus_distance"] for r in rows.values()])
    assert last < first / 10
    finals = [p.snapshot() for p in peers]
    for name, value in finals[0].items():
        spread = max(np.abs(f[name] - value).max() for f in finals)
        assert spread < 1e-2 * np.abs(value).max()  # from about one: 12 rounds of a 0.67 contraction


def test_without_final_mixing_the_peers_stay_apart(tmp_path):
    _, rows = simulate(tmp_path, BASE)
    first = np.mean([r[0]["consensus_distance"] for r in rows.values()])
    last = np.mean([r[-1]["consensus_distance"] for r in rows.values()])
    assert last > first / 10


def test_kgt_sends_its_direction_and_its_corrections_cancel_over_the_network(tmp_path):
    plain_peers, plain = simulate(tmp_path / "dpsgd", BASE)
    peers, rows = simulate(tmp_path / "kgt", BASE.replace(algorithm="kgt"))
    # The tracker travels with every model: the model's bytes once more per message (and a longer header).
    model_bytes = sum(v.nbytes for v in peers[0].snapshot().values())
    messages = BASE.rounds * len(peers[0].neighbours)
    assert rows[0][-1]["bytes_sent"] - plain[0][-1]["bytes_sent"] >= messages * model_bytes
    corrections = [p.algorithm_state["correction"] for p in peers]
    for name, value in corrections[0].items():
        # Metropolis-Hastings weights are doubly stochastic: sum_i (mix(z)_i - z_i) = 0 whenever every
        # message arrived, so the corrections move peers relative to each other, never the network average.
        total = np.sum([c[name] for c in corrections], axis=0)
        assert np.abs(total).max() < 1e-4 * max(np.abs(c[name]).max() for c in corrections)
        assert np.abs(value).max() > 0
    # Corrected local steps give different models than plain D-PSGD from the same start.
    kgt_state, plain_state = peers[0].snapshot(), plain_peers[0].snapshot()
    assert any(not np.allclose(kgt_state[k], plain_state[k]) for k in kgt_state)


def test_kgt_correction_survives_a_checkpoint(tmp_path):
    peers, _ = simulate(tmp_path / "run", BASE.replace(algorithm="kgt"))
    save_checkpoint(tmp_path / CHECKPOINT_NAME, peers[2], next_round=4)
    fresh = make_peers(BASE.replace(algorithm="kgt"), make_topology("ring", 6))[2]
    assert Checkpointer(fresh, tmp_path, every=0).resume()
    for name, value in peers[2].algorithm_state["correction"].items():
        np.testing.assert_array_equal(fresh.algorithm_state["correction"][name], value)


def test_reset_clears_the_optimiser_state_at_every_average(tmp_path):
    cfg = BASE.replace(model="cnn1d-shallow", optimizer_state="reset", rounds=2, local_steps=2)
    peers, _ = simulate(tmp_path, cfg)
    assert all(not p.learner.trainer.optimizer.state for p in peers)
    kept, _ = simulate(tmp_path / "keep", cfg.replace(optimizer_state="keep"))
    assert all(p.learner.trainer.optimizer.state for p in kept)


def test_quasi_global_momentum_follows_the_averaged_model(tmp_path):
    cfg = BASE.replace(optimizer_state="quasi-global", momentum=0.8, rounds=1, local_steps=3, lr=0.05)
    topology = make_topology("ring", 6)
    peer = make_peers(cfg, topology)[0]
    assert peer.learner.trainer.optimizer.defaults["momentum"] == 0.0  # plain SGD steps
    start = peer.snapshot()
    peer.local_update(3)
    size = peer.learner.step_size()
    assert size == pytest.approx(sum(peer.learner.trainer.lr_at(s) for s in range(3)))
    neighbour = {k: v + 0.01 for k, v in peer.snapshot().items()}
    message = Decoder(peer.template).decode(encode(neighbour, sender=1, round=0, samples=10))
    peer.mix(peer.snapshot(), {1: message}, {0: 0.5, 1: 0.5})
    mixed = peer.snapshot()
    buffer = peer.learner.momentum_buffer
    for name in mixed:
        np.testing.assert_allclose(buffer[name], 0.2 * (start[name] - mixed[name]) / size, rtol=1e-5, atol=1e-7)



@pytest.mark.slow
def test_the_recipe_options_reach_the_peers_through_the_cli(synth_corpus, tmp_path):
    from p2pser.cli import main

    common = ["simulate", str(synth_corpus), "--model", "svm", "--features", "mfcc", "--max-seconds", "1.5", "--partition", "iid",
              "--peers", "4", "--topology", "ring", "--rounds", "3", "--local-steps", "2", "--eval-every", "3",
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--final-mixing", "0", "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--algorithm", "kgt", "--final-mixing", "4", "--optimizer-state", "quasi-global",
                 "--momentum", "0.8", "--out", str(tmp_path / "kgt")]) == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    kgt = json.loads((tmp_path / "kgt" / "summary.json").read_text())
    assert (plain["rounds"], kgt["rounds"]) == (3, 3 + 4)  # the final averaging rounds ran
    assert kgt["algorithm"] == "kgt" and kgt["bytes_sent_max_peer"] > 2 * plain["bytes_sent_max_peer"]
    assert kgt["consensus_distance_last"] < plain["consensus_distance_last"]
    rows = [json.loads(line) for line in (tmp_path / "kgt" / "peer-000" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows] == [False] * 3 + [True] * 4
    with pytest.raises(SystemExit):
        main([*common, "--optimizer-state", "sometimes", "--out", str(tmp_path / "bad")])
