"""Pull answers are rate-limited per neighbour: the bucket's arithmetic, and a live runner on real sockets."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_carriers import CFG, make_peers

from p2pser.carriers.mailbox import Mailbox
from p2pser.carriers.realtime import RealtimeRunner
from p2pser.carriers.transport import ZmqTransport
from p2pser.exchange.codec import Decoder, encode
from p2pser.exchange.effects import Gather
from p2pser.exchange.pulls import BURST, PullLimiter
from p2pser.exchange.topology import make_topology
from p2pser.report.metrics_log import MetricsWriter


def test_a_burst_is_answered_then_one_pull_per_refill():
    limiter = PullLimiter(rate=0.5)
    assert [limiter.allow(1, 100.0) for _ in range(BURST + 2)] == [True] * BURST + [False, False]
    assert not limiter.allow(1, 101.9)  # 0.95 of an answer refilled: not yet
    assert limiter.allow(1, 102.1)  # one answer every 2 s
    assert not limiter.allow(1, 102.2)
    # Neighbours have a bucket each: one neighbour's flood costs another nothing.
    assert all(limiter.allow(2, 102.2) for _ in range(BURST))


def test_a_long_silence_refills_only_up_to_the_burst():
    limiter = PullLimiter(rate=1.0, burst=2)
    assert limiter.allow(5, 0.0) and limiter.allow(5, 0.0) and not limiter.allow(5, 0.0)
    assert [limiter.allow(5, 1000.0) for _ in range(3)] == [True, True, False]


def test_same_times_same_answers_and_a_clock_going_back_refills_nothing():
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 3.0, 3.1, 9.0, 2.0, 2.5]
    runs = []
    for _ in range(2):
        limiter = PullLimiter(rate=0.5)
        runs.append([limiter.allow(1, t) for t in times])
    assert runs[0] == runs[1] == [True] * 4 + [False, False, True, False, True, True, True]
    limiter = PullLimiter(rate=0.5, burst=1)
    # 4.0 and 6.0 lie before 10.0: no time has passed since the last answer, however they compare.
    assert [limiter.allow(1, t) for t in (10.0, 4.0, 6.0, 12.0)] == [True, False, False, True]


def test_rate_zero_answers_every_pull_and_bad_limits_are_refused():
    limiter = PullLimiter(rate=0)
    assert all(limiter.allow(1, 0.0) for _ in range(1000))
    with pytest.raises(ValueError):
        PullLimiter(rate=-1)
    with pytest.raises(ValueError):
        PullLimiter(rate=1, burst=0)


def test_a_live_runner_answers_a_pull_flood_only_within_the_limit(tmp_path, caplog):
    """Peer 0's runner waits for a model on real ZeroMQ sockets while its neighbour floods it with 12 pulls:
    it answers the burst, refuses the rest with a logged reason, and is not moved by any of it."""
    caplog.set_level(logging.INFO, logger="p2pser.carriers.mailbox")
    # A refill every 1000 s: however slow the machine, no answer past the burst is earned during the test.
    cfg = CFG.replace(pull_rate=0.001)
    peer, other = make_peers(cfg, make_topology("complete", 2))
    neighbour = ZmqTransport(1, "tcp://127.0.0.1:0", {})
    transport = ZmqTransport(0, "tcp://127.0.0.1:0", {1: neighbour.endpoint})
    neighbour.add_neighbour(0, transport.endpoint)
    mailbox = Mailbox(peer, MetricsWriter(tmp_path / "metrics.jsonl"))
    before = peer.snapshot()
    try:
        for _ in range(12):
            neighbour.send(0, encode({}, sender=1, round=0, samples=0, kind="pull"))
        # Sent after the pulls on the same connection, so it arrives after them and ends the wait.
        neighbour.send(0, encode(other.snapshot(), sender=1, round=0, samples=other.samples))

        def algorithm():
            got = yield Gather("model", 0, frozenset({1}), timeout=60.0)
            assert set(got.messages) == {1}

        RealtimeRunner(mailbox, transport).run(algorithm())
        answers = []
        while (item := neighbour.recv(1.0)) is not None:
            answers.append(Decoder(None).decode(item[1]))
    finally:
        mailbox.metrics.close()
        transport.close()
        neighbour.close()
    assert len(answers) == BURST and all(m.kind == "state" for m in answers)
    assert mailbox.rejected == 12 - BURST
    refused = [r for r in caplog.records if "pull from 1 not answered" in r.getMessage()]
    assert len(refused) == 12 - BURST
    for name, value in before.items():
        np.testing.assert_array_equal(peer.snapshot()[name], value)
