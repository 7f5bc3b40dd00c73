"""The algorithm coroutines driven one effect at a time by a scripted carrier.

Each test plays the outside world for one real ``Peer`` (svm model, a few utterances of random features):
it checks every effect the algorithm yields, in order (what is sent to whom, what is gathered with which
expectation and timeout), and answers it from the script with real codec messages of other real peers.
The mixing results are checked against the weights written out by hand: Metropolis-Hastings for dpsgd,
sample counts at the fedavg hub, model ages for gossip, the neighbours' average for a catch-up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from p2pser.config import RunConfig
from p2pser.exchange.algorithms import (
    BEHIND_ROUNDS,
    PULL_TRIES,
    Compute,
    Drain,
    Gather,
    Gathered,
    Record,
    Send,
    catch_up,
    dpsgd,
    fedavg,
    gossip,
    start,
)
from p2pser.exchange.codec import Decoder, Message
from p2pser.exchange.mixing import consensus_distance
from p2pser.exchange.peer import Peer, make_learner
from p2pser.exchange.topology import PeerInfo, Topology, metropolis_hastings_weights
from p2pser.learn.data import PeerData

CLASSES = ["angry", "happy", "neutral", "sad"]
CHANNELS, FRAMES = 6, 20
# Peers 0, 1, 2 form a triangle and peer 3 hangs off peer 2: the degrees differ (2, 2, 3, 1), so the
# Metropolis-Hastings weights of peer 0 are not uniform (1/3 for peer 1, 1/4 for peer 2, 5/12 its own).
KITE = Topology("kite", tuple(PeerInfo(i, "127.0.0.1", 27100 + i) for i in range(4)), ((0, 1), (0, 2), (1, 2), (2, 3)))
STAR = Topology("star", tuple(PeerInfo(i, "127.0.0.1", 27100 + i) for i in range(3)), ((0, 1), (0, 2)))


def config(**changes) -> RunConfig:
    return RunConfig(model="svm", features="mfcc", rounds=4, local_steps=2, batch_size=4, val_fraction=0.0, eval_every=100, final_mixing=0,
                     round_timeout=7.0, startup_timeout=50.0).replace(**changes)


def make_peer(topology: Topology, peer_id: int, cfg: RunConfig, utterances: int = 12) -> Peer:
    """A real peer as the peer process builds one, on its own random features (seeded by its id)."""
    rng = np.random.default_rng(100 + peer_id)
    x = rng.normal(size=(utterances + 4, CHANNELS, FRAMES)).astype(np.float32)
    y = np.arange(utterances + 4) % len(CLASSES)
    lengths = np.full(utterances + 4, FRAMES)
    test = (x[:4], y[:4], lengths[:4])
    data = PeerData.from_arrays(x, y, lengths, np.arange(4, utterances + 4), test, CLASSES,
                                val_fraction=cfg.val_fraction, seed=peer_id)
    w = metropolis_hastings_weights(topology)
    neighbours = topology.neighbours(peer_id)
    return Peer(peer_id, neighbours, make_learner(data, cfg, peer_id), cfg,
                mix_weights={j: float(w[peer_id, j]) for j in [*neighbours, peer_id]})


def peers_of(topology: Topology, cfg: RunConfig, sizes: Mapping[int, int] | None = None) -> list[Peer]:
    """Every peer of ``topology``, each a little trained so that their parameters differ."""
    peers = [make_peer(topology, i, cfg, (sizes or {}).get(i, 12)) for i in range(topology.n)]
    for p in peers:
        p.local_update(3)
    return peers


def received(frames: list, by: Peer) -> Message:
    """What ``by`` makes of frames on the wire: decoded and checked against its model like every message."""
    return Decoder(by.template).decode([bytes(f) for f in frames])


def model_of(sender: Peer, round_: int, to: Peer, *, age: float = 0.0) -> Message:
    return received(sender.encode(sender.snapshot(), round_, age=age), to)


def mixed(states: Mapping[int, Mapping[str, np.ndarray]], weights: Mapping[int, float]) -> dict[str, np.ndarray]:
    """The weighted average written out: sum of w_j x_j over sum of w_j, in float64."""
    total = sum(weights[j] for j in states)
    names = next(iter(states.values())).keys()
    return {k: sum(states[j][k].astype(np.float64) * weights[j] for j in states) / total for k in names}


def assert_params(peer: Peer, expected: Mapping[str, np.ndarray]) -> None:
    now = peer.snapshot()
    assert now.keys() == expected.keys()
    for k in now:
        np.testing.assert_allclose(now[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


class Carrier:
    """Plays the outside world of one algorithm: ``next(kind)`` runs it to its next effect (which must be a
    ``kind``); ``answer(value)`` is what the last effect returns (None, as for Compute and Send, unless
    given), handed over when the next ``next`` resumes the algorithm."""

    def __init__(self, algorithm) -> None:
        self.algorithm = algorithm
        self.reply = None

    def next(self, kind: type):
        effect = self.algorithm.send(self.reply)
        self.reply = None
        assert isinstance(effect, kind), f"expected a {kind.__name__}, the algorithm yielded {effect!r}"
        return effect

    def answer(self, value) -> None:
        self.reply = value

    def returned(self):
        """The algorithm must end now: what it returns (a catch-up: the round to continue from)."""
        try:
            effect = self.algorithm.send(self.reply)
        except StopIteration as stop:
            return stop.value
        raise AssertionError(f"the algorithm went on with {effect!r}")

    def finished(self) -> bool:
        return self.returned() is None


def sent(carrier: Carrier, to: Sequence[int], by: Peer, *, kind: str = "model", round_: int) -> Message:
    """The next effect is a Send to exactly ``to`` of ``by``'s current parameters (or a control message; a
    catch-up pull names the last round we finished, ``round_``)."""
    send = carrier.next(Send)
    assert send.to == tuple(to)
    message = received(send.frames, by)
    assert (message.sender, message.kind, message.round) == (by.id, kind, round_)
    if kind in ("model", "state"):
        snapshot = by.snapshot()
        assert all(np.array_equal(message.tensors[k], snapshot[k]) for k in snapshot), "sent params are not ours"
    return message


def test_dpsgd_mixes_with_metropolis_hastings_weights_renormalised_over_what_arrived():
    cfg = config(rounds=4)
    p0, p1, p2, _ = peers_of(KITE, cfg)
    assert p0.mix_weights == pytest.approx({0: 5 / 12, 1: 1 / 3, 2: 1 / 4})
    before = p0.snapshot()
    c = Carrier(dpsgd(p0))

    # Round 0: train, send to both neighbours, wait for both as long as peers may take to start.
    assert c.next(Compute) == Compute(cfg.local_steps)
    assert p0.learner.trainer.step == 3 + cfg.local_steps and not np.array_equal(p0.snapshot()["fc.weight"], before["fc.weight"])
    sent(c, (1, 2), p0, round_=0)
    own = p0.snapshot()
    assert c.next(Gather) == Gather("model", 0, frozenset({1, 2}), cfg.startup_timeout)
    c.answer(Gathered({1: model_of(p1, 0, p0), 2: model_of(p2, 0, p0)}, frozenset({1, 2}), {1: 0.2, 2: 0.4}))
    row = c.next(Record).row
    states = {0: own, 1: p1.snapshot(), 2: p2.snapshot()}
    assert_params(p0, mixed(states, p0.mix_weights))
    assert row["consensus_distance"] == pytest.approx(consensus_distance(own, [states[1], states[2]]))
    assert (row["peer"], row["round"], row["heard"], row["deadline_s"], row["wait_s"]) == (0, 0, 2, 50.0, 0.4)
    assert "test_ua" not in row  # evaluation only every eval_every rounds and at the last
    c.answer(1.0)

    # Round 1: peer 2 misses the deadline (now round_timeout): the mix renormalises over peer 1 and us.
    c.next(Compute)
    sent(c, (1, 2), p0, round_=1)
    own = p0.snapshot()
    assert c.next(Gather) == Gather("model", 1, frozenset({1, 2}), cfg.round_timeout)
    p1.local_update(1)
    c.answer(Gathered({1: model_of(p1, 1, p0)}, frozenset({1}), {1: 0.1}))
    assert c.next(Record).row["heard"] == 1
    assert_params(p0, mixed({0: own, 1: p1.snapshot()}, p0.mix_weights))
    c.answer(2.0)

    # Round 2: a neighbour that missed a whole deadline is not waited for; we still send to it.
    c.next(Compute)
    sent(c, (1, 2), p0, round_=2)
    assert c.next(Gather) == Gather("model", 2, frozenset({1}), cfg.round_timeout)
    own = p0.snapshot()
    # Peer 2's late model of round 1 arrives during this gather: heard from, it is no longer a suspect.
    c.answer(Gathered({1: model_of(p1, 2, p0)}, frozenset({1, 2}), {1: 0.1}))
    assert c.next(Record).row["heard"] == 1
    assert_params(p0, mixed({0: own, 1: p1.snapshot()}, p0.mix_weights))
    c.answer(3.0)

    # Round 3 (the last): heard from again, peer 2 is waited for again; the last round evaluates.
    c.next(Compute)
    sent(c, (1, 2), p0, round_=3)
    assert c.next(Gather) == Gather("model", 3, frozenset({1, 2}), cfg.round_timeout)
    c.answer(Gathered({1: model_of(p1, 3, p0), 2: model_of(p2, 3, p0)}, frozenset({1, 2}), {1: 0.1, 2: 0.1}))
    row = c.next(Record).row
    assert 0.0 <= row["test_ua"] <= 1.0
    c.answer(4.0)
    assert c.finished()


def test_dpsgd_catches_up_only_with_neighbours_far_ahead_and_stops_at_the_time_budget():
    cfg = config(rounds=20, time_budget=10.0)
    p0, p1, p2, _ = peers_of(KITE, cfg)
    c = Carrier(dpsgd(p0))
    # Round 0: models of round BEHIND_ROUNDS have been seen: neighbours that stopped waiting for us run a
    # little ahead as a matter of course, and we simply go on.
    c.next(Compute)
    c.next(Send)
    c.next(Gather)
    c.answer(Gathered({1: model_of(p1, 0, p0)}, frozenset({1}), {1: 0.0}, newest=BEHIND_ROUNDS))
    c.next(Record)
    c.answer(1.0)
    # Round 1: models of round 2 + BEHIND_ROUNDS: we fell behind; instead of round 2 we pull their state.
    c.next(Compute)
    sent(c, (1, 2), p0, round_=1)
    c.next(Gather)
    c.answer(Gathered({1: model_of(p1, 1, p0)}, frozenset({1}), {1: 0.0}, newest=2 + BEHIND_ROUNDS))
    c.next(Record)
    c.answer(2.0)
    sent(c, (1, 2), p0, kind="pull", round_=1)
    assert c.next(Gather) == Gather("state", 2, frozenset({1, 2}), cfg.round_timeout / PULL_TRIES)
    p1.round = p2.round = 2 + BEHIND_ROUNDS
    c.answer(Gathered({j: received(p.answer_pull(), p0) for j, p in ((1, p1), (2, p2))}, frozenset({1, 2})))
    assert c.next(Compute) and p0.round == 3 + BEHIND_ROUNDS
    sent(c, (1, 2), p0, round_=3 + BEHIND_ROUNDS)
    c.next(Gather)
    c.answer(Gathered({}, frozenset(), {}))
    c.next(Record)
    c.answer(cfg.time_budget)  # the clock says the budget is spent: the run ends after this round
    assert c.finished()


def test_fedavg_hub_weights_by_sample_counts_and_clients_adopt_its_average():
    cfg = config(rounds=2, algorithm="fedavg")
    sizes = {0: 8, 1: 12, 2: 28}
    hub, c1, c2 = peers_of(STAR, cfg, sizes)
    assert [p.samples for p in (hub, c1, c2)] == [8, 12, 28]

    h = Carrier(fedavg(hub, hub=0))
    client = Carrier(fedavg(c1, hub=0))
    # The clients train and send to the hub alone, then wait for its average: as long as the hub may wait
    # for a dead client, twice the deadline, on top of the start-up allowance in the first round.
    client.next(Compute)
    to_hub = sent(client, (0,), c1, round_=0)
    assert to_hub.samples == 12
    c1_own = c1.snapshot()
    assert client.next(Gather) == Gather("model", 0, frozenset({0}), cfg.startup_timeout + 2 * cfg.round_timeout)

    # The hub trains, waits for every client, averages by sample counts (its own included), sends it back.
    h.next(Compute)
    own = hub.snapshot()
    assert h.next(Gather) == Gather("model", 0, frozenset({1, 2}), cfg.startup_timeout)
    h.answer(Gathered({1: received([bytes(f) for f in c1.encode(c1_own, 0)], hub), 2: model_of(c2, 0, hub)},
                      frozenset({1, 2}), {1: 0.3, 2: 0.5}))
    back = sent(h, (1, 2), hub, round_=0)
    average = mixed({0: own, 1: c1_own, 2: c2.snapshot()}, sizes)
    assert_params(hub, average)
    row = h.next(Record).row
    assert row["heard"] == 2 and row["deadline_s"] == cfg.startup_timeout
    h.answer(1.0)

    # The client adopts the hub's average as it is: its own model gets no weight.
    client.answer(Gathered({0: received(hub.encode(hub.snapshot(), 0), c1)}, frozenset({0}), {0: 1.2}))
    row = client.next(Record).row
    assert all(np.array_equal(c1.snapshot()[k], back.tensors[k]) for k in back.tensors)
    assert row["heard"] == 1 and row["consensus_distance"] == pytest.approx(consensus_distance(c1_own, [average]))
    client.answer(1.5)

    # Round 1: client 2 misses the hub's deadline; the hub averages what came and does not wait for it
    # next time. The client whose hub stays silent keeps its own model.
    h.next(Compute)
    own = hub.snapshot()
    assert h.next(Gather) == Gather("model", 1, frozenset({1, 2}), cfg.round_timeout)
    c1.local_update(1)
    h.answer(Gathered({1: model_of(c1, 1, hub)}, frozenset({1}), {1: 0.3}))
    sent(h, (1, 2), hub, round_=1)
    assert_params(hub, mixed({0: own, 1: c1.snapshot()}, sizes))
    assert h.next(Record).row["heard"] == 1
    h.answer(2.0)
    assert h.finished()

    client.next(Compute)
    sent(client, (0,), c1, round_=1)
    c1_own = c1.snapshot()
    assert client.next(Gather) == Gather("model", 1, frozenset({0}), 2 * cfg.round_timeout)
    client.answer(Gathered({}, frozenset(), {}))
    row = client.next(Record).row
    assert row["heard"] == 0 and row["consensus_distance"] is None
    assert_params(c1, c1_own)
    client.answer(3.0)
    assert client.finished()


def test_fedavg_hub_does_not_wait_for_a_client_that_missed_its_deadline():
    cfg = config(rounds=4, algorithm="fedavg")
    hub, c1, c2 = peers_of(STAR, cfg)
    h = Carrier(fedavg(hub, hub=0))
    # Client 2 misses round 0, is not waited for in round 1; its late model comes with round 2's gather,
    # so round 3 waits for it again.
    for r, expect, arrived in ((0, {1, 2}, {1}), (1, {1}, {1}), (2, {1}, {1, 2}), (3, {1, 2}, {1, 2})):
        h.next(Compute)
        assert h.next(Gather).expect == frozenset(expect)
        h.answer(Gathered({j: model_of((c1, c2)[j - 1], r, hub) for j in arrived}, frozenset(arrived)))
        h.next(Send)
        h.next(Record)
        h.answer(float(r))
    assert h.finished()


def test_gossip_pushes_to_one_random_neighbour_and_merges_by_model_age():
    cfg = config(rounds=12, algorithm="gossip", local_steps=3)
    peers = peers_of(KITE, cfg)
    p2 = peers[2]  # three neighbours: 0, 1 and 3
    c = Carrier(gossip(p2))
    targets = []
    for r in range(cfg.rounds):
        c.next(Compute)
        send = c.next(Send)
        message = received(send.frames, p2)
        assert len(send.to) == 1 and send.to[0] in (0, 1, 3) and message.round == r
        targets.append(send.to[0])
        assert c.next(Drain) == Drain()
        if r == 0:
            # Two models arrived, one far older: each counts by the local steps it has seen.
            assert message.age == cfg.local_steps
            own = p2.snapshot()
            arrivals = [model_of(peers[0], 5, p2, age=30.0), model_of(peers[3], 1, p2, age=1.0)]
            c.answer(arrivals)
            row = c.next(Record).row
            assert_params(p2, mixed({2: own, 0: peers[0].snapshot(), 3: peers[3].snapshot()}, {2: 3.0, 0: 30.0, 3: 1.0}))
            assert row["heard"] == 2 and p2.age == 30.0  # our model is now as old as the oldest it merged
        else:
            # Nothing arrived: nothing to mix, and the model just ages by its own steps.
            assert message.age == 30.0 + r * cfg.local_steps
            own = p2.snapshot()
            c.answer([])
            row = c.next(Record).row
            assert row["heard"] == 0 and row["consensus_distance"] is None
            assert_params(p2, own)
        c.answer(float(r))
    assert c.finished()
    # One target per push, drawn afresh: over 12 pushes more than one neighbour, and the same seed again
    # draws the same ones (a run is reproducible).
    assert len(set(targets)) > 1
    again = Carrier(gossip(make_peer(KITE, 2, cfg)))
    for target in targets:
        again.next(Compute)
        assert again.next(Send).to == (target,)
        again.next(Drain)
        again.answer([])
        again.next(Record)
        again.answer(0.0)


def test_catch_up_adopts_the_neighbours_average_and_joins_at_their_lower_median_round():
    cfg = config(rounds=30)
    peers = peers_of(KITE, cfg)
    p2 = peers[2]
    c = Carrier(catch_up(p2, 3))
    sent(c, (0, 1, 3), p2, kind="pull", round_=2)
    assert c.next(Gather) == Gather("state", 3, frozenset({0, 1, 3}), cfg.round_timeout / PULL_TRIES)
    for j, round_ in ((0, 11), (1, 6), (3, 8)):  # the rounds they are in, and ages to match
        peers[j].round, peers[j].age = round_, float(round_ * cfg.local_steps)
    answers = {j: received(peers[j].answer_pull(), p2) for j in (0, 1, 3)}
    c.answer(Gathered(answers, frozenset(answers)))
    # The rounds after theirs are 7, 9 and 12: we follow the lower median, not the one that ran ahead.
    assert c.returned() == 9
    assert (p2.round, p2.age) == (9, 22.0) and p2.learner.trainer.step == 9 * cfg.local_steps
    # Our stale model gets no weight; the neighbours count by their mixing weights (1/4, 1/4, 1/2).
    assert_params(p2, mixed({j: peers[j].snapshot() for j in answers}, p2.mix_weights))


def test_a_resumed_peer_catches_up_before_its_first_round():
    cfg = config(rounds=30)
    p0, p1, p2, _ = peers_of(KITE, cfg)
    c = Carrier(start(p0, 3, resumed=True))
    sent(c, (1, 2), p0, kind="pull", round_=2)
    c.next(Gather)
    p1.round, p2.round = 12, 14
    c.answer(Gathered({1: received(p1.answer_pull(), p0), 2: received(p2.answer_pull(), p0)}, frozenset({1, 2})))
    # Two answers: the lower one. The run goes on as dpsgd from there, waiting as in a first round.
    c.next(Compute)
    sent(c, (1, 2), p0, round_=13)
    assert c.next(Gather) == Gather("model", 13, frozenset({1, 2}), cfg.startup_timeout)


def test_catch_up_retries_the_silent_ignores_answers_past_the_schedule_and_gives_up_in_place():
    cfg = config(rounds=30)
    peers = peers_of(KITE, cfg)
    p2 = peers[2]
    own = p2.snapshot()
    c = Carrier(catch_up(p2, 5))
    # First try: peer 3's answer claims a round past the schedule's end (a lie or another run): ignored.
    sent(c, (0, 1, 3), p2, kind="pull", round_=4)
    c.next(Gather)
    peers[3].round = cfg.rounds
    c.answer(Gathered({3: received(peers[3].answer_pull(), p2)}, frozenset({3})))
    # Nobody usable answered: the next try asks everyone again; then one answer is enough to go on.
    sent(c, (0, 1, 3), p2, kind="pull", round_=4)
    assert c.next(Gather) == Gather("state", 5, frozenset({0, 1, 3}), cfg.round_timeout / PULL_TRIES)
    peers[1].round = 6
    c.answer(Gathered({1: received(peers[1].answer_pull(), p2)}, frozenset({1})))
    assert c.returned() == 7
    assert_params(p2, peers[1].snapshot())

    # Nobody answers any of the tries: we continue from where we are, with our own model.
    p0 = make_peer(KITE, 0, cfg)
    own = p0.snapshot()
    c = Carrier(catch_up(p0, 5))
    for _ in range(PULL_TRIES):
        sent(c, (1, 2), p0, kind="pull", round_=4)
        c.next(Gather)
        c.answer(Gathered({}, frozenset()))
    assert c.returned() == 5 and p0.round == 5
    assert_params(p0, own)
