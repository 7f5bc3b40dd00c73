"""Inbox rules, mixing rules and run configuration: the pieces the simulator and real peers share."""

from __future__ import annotations

import numpy as np
import pytest

from p2pser.config import RunConfig, SimConfig, load_config
from p2pser.errors import UserError
from p2pser.exchange.codec import Message
from p2pser.exchange.inbox import Inbox
from p2pser.exchange.mixing import Contribution, WeightedAverage, consensus_distance


def _msg(sender, round_, kind="model", age=0.0):
    return Message(sender=sender, round=round_, age=age, samples=10, kind=kind, tensors={})


def test_inbox_files_by_round_and_refuses_strangers_stale_and_duplicates():
    inbox = Inbox([1, 2])
    assert inbox.add(_msg(1, 0)) is None
    assert "not a neighbour" in inbox.add(_msg(5, 0))
    assert "duplicate" in inbox.add(_msg(1, 0))
    assert inbox.has_all("model", 0, {1}) and not inbox.has_all("model", 0, {1, 2})
    assert inbox.add(_msg(2, 1)) is None  # a neighbour ahead of us is kept for later ...
    assert inbox.has_all("model", 0, {1, 2})  # ... and has skipped round 0: no need to wait for it
    assert set(inbox.take("model", 0)) == {1}
    assert "stale" in inbox.add(_msg(2, 0))
    assert "too far ahead" in inbox.add(_msg(2, 50))
    assert set(inbox.take("model", 1)) == {2}


def test_inbox_asynchronous_keeps_newest_and_refuses_replays():
    inbox = Inbox([1, 2])
    assert inbox.add(_msg(1, 3), synchronous=False) is None
    assert inbox.add(_msg(1, 4), synchronous=False) is None
    assert [m.round for m in inbox.drain()] == [4]
    assert "not newer" in inbox.add(_msg(1, 4), synchronous=False)  # replay after drain is still refused
    assert inbox.drain() == []


def test_weighted_average_renormalises_over_what_arrived():
    own = {"w": np.array([0.0, 0.0], dtype=np.float32)}
    other = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    mixed = WeightedAverage().mix(own, 1 / 3, [Contribution(1, 1 / 3, other)])
    np.testing.assert_allclose(mixed["w"], [1.5, 3.0])
    assert mixed["w"].dtype == np.float32
    assert consensus_distance(own, [other]) == pytest.approx(np.sqrt(45))
    assert consensus_distance(own, []) is None


def test_weighted_average_is_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    own = {"w": rng.normal(size=100).astype(np.float32)}
    others = [Contribution(i, 0.2, {"w": rng.normal(size=100).astype(np.float32)}) for i in range(1, 5)]
    a = WeightedAverage().mix(own, 0.2, others)["w"]
    b = WeightedAverage().mix(own, 0.2, others[::-1])["w"]
    assert np.array_equal(a, b)


def test_config_from_toml_cli_overrides_and_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('algorithm = "gossip"\nrounds = 12\nlr = 1\n[simulate]\ndrop = 0.1\n')
    cfg = load_config(path, {"rounds": 20, "seed": None})
    assert (cfg.algorithm, cfg.rounds, cfg.lr, cfg.seed) == ("gossip", 20, 1.0, 0)
    assert load_config(path, None, SimConfig, "simulate").drop == 0.1
    path.write_text("roundz = 3\n")
    with pytest.raises(UserError, match="unknown key 'roundz'"):
        load_config(path)
    path.write_text('rounds = "many"\n')
    with pytest.raises(UserError, match="'rounds' must be int"):
        load_config(path)
    with pytest.raises(UserError, match="'algorithm'"):
        RunConfig(algorithm="allreduce")
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
