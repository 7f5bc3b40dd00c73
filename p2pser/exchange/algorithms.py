"""The learning algorithms, written once as coroutines that say what to do, never how.

An algorithm is a generator over a ``Peer``. It trains and mixes by calling the peer directly, and yields
small *effect* requests for everything that involves the network or the clock:

- ``Compute(steps)``: local training just took ``steps`` minibatch steps (the simulator charges virtual time);
- ``Send(to, frames)``: send an encoded message to these neighbours;
- ``Gather(kind, round, expect, timeout)``: wait until all of ``expect`` delivered that round or the timeout
  passed; answered with a ``Gathered``;
- ``Drain()``: take whatever asynchronous models have arrived by now; answered with a list of messages;
- ``Record(row)``: a metrics row for this round; answered with the seconds elapsed since the run started.

``p2pser.carriers.realtime`` carries these out with ZeroMQ and the wall clock; ``p2pser.experiments.simulate`` with an
in-memory network and a virtual clock. Nothing else differs between simulation and deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pser.exchange.codec import Message
from p2pser.exchange.liveness import Deadlines
from p2pser.exchange.peer import Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compute:
    steps: int


@dataclass(frozen=True)
class Send:
    to: tuple[int, ...]
    frames: list


@dataclass(frozen=True)
class Gather:
    kind: str
    round: int
    expect: frozenset[int]
    timeout: float


@dataclass(frozen=True)
class Gathered:
    messages: dict[int, Message]
    heard: frozenset[int] = field(default_factory=frozenset)  # neighbours heard from since the last gather
    # Seconds from the gather's start until each message was filed (0: it was already there), on the
    # runner's clock: what p2pser.exchange.liveness learns deadlines from.
    waits: dict[int, float] = field(default_factory=dict)
    # The round the neighbours have reached (``Inbox.newest_seen``): far above our own round, it tells a
    # peer that it fell behind (a restart whose pull went unanswered, a partition, a stall).
    newest: int = -1


@dataclass(frozen=True)
class Drain:
    pass


@dataclass(frozen=True)
class Record:
    row: dict


Algorithm = Generator[Any, Any, None]


class _StopRule:
    """Round budget, time budget, or convergence: consensus below a threshold and validation UA flat."""

    def __init__(self, config) -> None:
        self.config = config
        self.best_val = -1.0
        self.flat_rounds = 0
        self.distance: float | None = None  # last measured: a round that heard nobody measures nothing

    def done(self, row: dict, elapsed: float) -> bool:
        cfg = self.config
        if cfg.time_budget and elapsed >= cfg.time_budget:
            return True
        if "val_ua" in row:
            if row["val_ua"] > self.best_val + 1e-4:
                self.best_val, self.flat_rounds = row["val_ua"], 0
            else:
                self.flat_rounds += cfg.eval_every
        if row.get("consensus_distance") is not None:
            self.distance = row["consensus_distance"]
        return bool(
            cfg.consensus_threshold
            and self.distance is not None
            and self.distance < cfg.consensus_threshold
            and self.flat_rounds >= cfg.patience
        )


def _row(peer: Peer, round_: int, loss: float, distance: float | None, heard: Sequence[int]) -> dict:
    cfg = peer.config
    row = {"peer": peer.id, "round": round_, "loss": loss, "consensus_distance": distance, "heard": len(heard)}
    if (round_ + 1) % cfg.eval_every == 0 or round_ + 1 == cfg.rounds:
        row.update(peer.evaluate())
    return row


def _suspects_after(suspects: set[int], neighbours: Sequence[int], got: Gathered) -> set[int]:
    """Neighbours not to wait for next round: those that missed this deadline, until heard from again."""
    missing = set(neighbours) - set(got.messages)
    return (suspects | missing) - set(got.heard) - set(got.messages)


def dpsgd(peer: Peer, start_round: int = 0) -> Algorithm:
    """Synchronous D-PSGD: local steps, send to all neighbours, wait for their model of the same round up to
    a deadline, then average with Metropolis-Hastings weights renormalised over what arrived.

    A neighbour that missed a whole deadline is not waited for again until it is heard from, so a dead
    neighbour costs one timeout, not one per round; with ``liveness = "adaptive"`` that timeout is a few
    normal round times (``p2pser.exchange.liveness``) rather than the whole ``round_timeout``.
    """
    cfg = peer.config
    stop = _StopRule(cfg)
    suspects: set[int] = set()
    deadlines = Deadlines.from_config(cfg, peer.id)
    r = start_round
    while r < cfg.rounds:
        peer.round = r
        loss = peer.local_update(cfg.local_steps)
        yield Compute(cfg.local_steps)
        own = peer.snapshot()
        yield Send(tuple(peer.neighbours), peer.encode(own, r))
        expect = frozenset(peer.neighbours) - suspects
        timeout = cfg.startup_timeout if r == start_round else deadlines.timeout(expect)
        got: Gathered = yield Gather("model", r, expect, timeout)
        deadlines.observe(got.waits, expect - set(got.messages))
        suspects = _suspects_after(suspects, peer.neighbours, got)
        distance = peer.mix(own, got.messages, peer.mix_weights)
        row = _row(peer, r, loss, distance, list(got.messages)) | deadlines.row(timeout, got.waits)
        elapsed = yield Record(row)
        deadlines.round_ended(elapsed)
        if stop.done(row, elapsed):
            return
        r = yield from _next_round(peer, r, got)


def fedavg(peer: Peer, start_round: int = 0, hub: int = 0) -> Algorithm:
    """Federated averaging on a star: every peer trains; the hub averages by sample counts (its own model
    included) and sends the average back, which the others adopt. Centralized FL as a baseline."""
    cfg = peer.config
    stop = _StopRule(cfg)
    suspects: set[int] = set()
    deadlines = Deadlines.from_config(cfg, peer.id)
    r = start_round
    while r < cfg.rounds:
        peer.round = r
        first = r == start_round
        loss = peer.local_update(cfg.local_steps)
        yield Compute(cfg.local_steps)
        own = peer.snapshot()
        if peer.id == hub:
            expect = frozenset(peer.neighbours) - suspects
            timeout = cfg.startup_timeout if first else deadlines.timeout(expect)
            got: Gathered = yield Gather("model", r, expect, timeout)
            deadlines.observe(got.waits, expect - set(got.messages))
            suspects = _suspects_after(suspects, peer.neighbours, got)
            weights = {peer.id: peer.samples} | {s: m.samples for s, m in got.messages.items()}
            distance = peer.mix(own, got.messages, weights)
            yield Send(tuple(peer.neighbours), peer.encode(peer.snapshot(), r))
            heard = list(got.messages)
        else:
            yield Send((hub,), peer.encode(own, r))
            # The hub may itself wait a whole deadline for a dead client before it answers.
            timeout = (cfg.startup_timeout if first else 0.0) + 2 * deadlines.timeout({hub})
            got = yield Gather("model", r, frozenset({hub}), timeout)
            deadlines.observe(got.waits, {hub} - set(got.messages))
            distance = peer.mix(own, got.messages, {peer.id: 0.0, hub: 1.0})
            heard = list(got.messages)
        row = _row(peer, r, loss, distance, heard) | deadlines.row(timeout, got.waits)
        elapsed = yield Record(row)
        deadlines.round_ended(elapsed)
        if stop.done(row, elapsed):
            return
        r = yield from _next_round(peer, r, got)


def gossip(peer: Peer, start_round: int = 0) -> Algorithm:
    """Asynchronous gossip learning: no rounds to wait for. After each block of local steps, push the model
    to one random neighbour; merge whatever arrived, weighted by model age (local steps it has seen)."""
    cfg = peer.config
    stop = _StopRule(cfg)
    rng = np.random.default_rng([cfg.seed, peer.id, 7])
    age = max(peer.age, float(start_round * cfg.local_steps))
    for r in range(start_round, cfg.rounds):
        peer.round = r
        loss = peer.local_update(cfg.local_steps)
        age += cfg.local_steps
        peer.age = age
        yield Compute(cfg.local_steps)
        own = peer.snapshot()
        target = int(rng.choice(peer.neighbours))
        yield Send((target,), peer.encode(own, r, age=age))
        arrived: list[Message] = yield Drain()
        distance = None
        if arrived:
            weights = {peer.id: age} | {m.sender: max(m.age, 1e-9) for m in arrived}
            distance = peer.mix(own, {m.sender: m for m in arrived}, weights)
            age = max([age] + [m.age for m in arrived])
            peer.age = age
        row = _row(peer, r, loss, distance, [m.sender for m in arrived])
        elapsed = yield Record(row)
        if stop.done(row, elapsed):
            return


PULL_TRIES = 4
# How far ahead a neighbour's models must be before we count ourselves fallen behind. A neighbour that
# stopped waiting for us runs a round or two ahead as a matter of course; catching up on every such lead
# would make peers leapfrog each other to the end of the schedule, skipping training. Several rounds of
# lead means a restart whose pull went unanswered, a long partition or stall; and at 8 (the inbox's
# horizon) we could not use their models at all.
BEHIND_ROUNDS = 4


def _next_round(peer: Peer, r: int, got: Gathered) -> Generator[Any, Any, int]:
    """The round after ``r``, or, when the neighbours went on far ahead without us, theirs (catching up)."""
    if got.newest >= r + 1 + BEHIND_ROUNDS:
        return (yield from catch_up(peer, r + 1))
    return r + 1


def catch_up(peer: Peer, start_round: int) -> Generator[Any, Any, int]:
    """Pull the neighbours' current parameters, adopt their average in place of our stale model, and move on
    to the round after theirs (after a restart, or on falling behind). Returns the round to continue from.

    Our own model (checkpointed, possibly many rounds old) gets no weight: the neighbours kept learning
    meanwhile. The pull is repeated up to ``PULL_TRIES`` times within ``round_timeout``: a neighbour's queue
    towards a peer that was down may be full, or not yet reconnected, and then its answer is lost. After a
    try that got at least one answer we go on; if nobody answers we continue from where we are.
    """
    cfg = peer.config
    # A neighbour that restarted with us (a whole run continued, a host rebooted) pulls us too, and reads our
    # answer's round as a round whose model we already sent. We sent the one before ``start_round``: saying
    # so lets it rejoin at ``start_round`` with us instead of skipping it.
    peer.round = max(start_round - 1, 0)
    answers: dict[int, Message] = {}
    for _ in range(PULL_TRIES):
        waiting = frozenset(peer.neighbours) - answers.keys()
        yield Send(tuple(sorted(waiting)), peer.pull_request())
        got: Gathered = yield Gather("state", start_round, waiting, cfg.round_timeout / PULL_TRIES)
        for sender, message in got.messages.items():
            if message.round < cfg.rounds:  # a round past the schedule's end is a lie or another run
                answers[sender] = message
            else:
                log.warning("peer %d: ignored %d's answer to our pull: round %d is past the schedule's end",
                            peer.id, sender, message.round)
        if answers:
            break
    if not answers:
        log.warning("peer %d: no neighbour answered the catch-up pull; continuing from round %d", peer.id,
                    start_round)
        return start_round
    answers = dict(sorted(answers.items()))
    weights = {peer.id: 0.0} | {s: peer.mix_weights.get(s, 1.0) for s in answers}
    peer.mix(peer.snapshot(), answers, weights)
    # An answer's round is the neighbour's round in progress, whose model it has most likely sent already
    # (it answers while waiting for that round's models): we join at the round after, which it will expect.
    # Of several answers we follow the lower median, not the most advanced: a neighbour that ran ahead alone
    # (all its own neighbours silent) would otherwise drag us, and then ours, to the end of the schedule.
    rounds = sorted(m.round + 1 for m in answers.values())
    round_ = max(start_round, rounds[(len(rounds) - 1) // 2])
    peer.fast_forward(round_, max(m.age for m in answers.values()))
    log.info("peer %d: caught up from %d neighbour(s) at round %d (was at round %d)",
             peer.id, len(answers), round_, start_round)
    return round_


ALGORITHMS = {"dpsgd": dpsgd, "gossip": gossip, "fedavg": fedavg}


def start(peer: Peer, start_round: int = 0, *, hub: int = 0, resumed: bool = False) -> Algorithm:
    """The configured algorithm from ``start_round``; ``resumed`` (restarted from a checkpoint) catches up
    with the neighbours first."""
    if resumed and start_round < peer.config.rounds:
        return _resumed(peer, start_round, hub)
    name = peer.config.algorithm
    if name == "fedavg":
        return fedavg(peer, start_round, hub=hub)
    return ALGORITHMS[name](peer, start_round)


def _resumed(peer: Peer, start_round: int, hub: int) -> Algorithm:
    round_ = yield from catch_up(peer, start_round)
    yield from start(peer, round_, hub=hub)
