"""The learning algorithms, written once as coroutines that say what to do, never how.

An algorithm is a generator over a ``Peer``: it trains and mixes by calling the peer and yields the effects
of ``p2pser.exchange.effects`` (send, gather with a deadline, drain, record) for a carrier to carry out.

Each algorithm is registered with the properties carriers and launchers need (``AlgorithmSpec``), so no
carrier, launcher or report ever tests an algorithm's name: whether it runs in synchronous rounds (the
inbox then keeps a round floor and waits are timed), whether it needs a hub (a peer linked to all others),
and which extra state it keeps in ``Peer.algorithm_state`` (checkpointed with the peer).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pser.config import ALGORITHMS as ALGORITHM_NAMES
from p2pser.exchange.codec import Message, encode
from p2pser.exchange.effects import Compute, Drain, Gather, Gathered, Record, Send
from p2pser.exchange.liveness import Deadlines
from p2pser.exchange.mixing import Contribution, WeightedAverage
from p2pser.exchange.peer import Peer
from p2pser.exchange.topology import Topology

log = logging.getLogger(__name__)


Algorithm = Generator[Any, Any, None]


class _StopRule:
    """Round budget, time budget, or convergence: consensus below a threshold and the task's validation
    metric flat."""

    def __init__(self, config, val_key: str) -> None:
        self.config = config
        self.val_key = val_key
        self.best_val = -1.0
        self.flat_rounds = 0
        self.distance: float | None = None  # last measured: a round that heard nobody measures nothing

    def done(self, row: dict, elapsed: float) -> bool:
        cfg = self.config
        if cfg.time_budget and elapsed >= cfg.time_budget:
            return True
        if row.get("dp_exhausted") and row["round"] + 1 < cfg.rounds:  # training rounds left to pay for
            log.warning("peer %s: stopped after round %d: another round would spend more than --dp-epsilon %s "
                        "(epsilon spent %.4g)", row["peer"], row["round"], cfg.dp_epsilon, row["dp_epsilon"])
            return True
        if self.val_key in row:
            if row[self.val_key] > self.best_val + 1e-4:
                self.best_val, self.flat_rounds = row[self.val_key], 0
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


def _row(peer: Peer, round_: int, loss: float | None, distance: float | None, heard: Sequence[int]) -> dict:
    cfg = peer.config
    # float(): the simulator's learners in worker processes return the loss as a pending value
    # (``p2pser.carriers.workers``), read here, long after the training it comes from has finished.
    row = {"peer": peer.id, "round": round_, "loss": None if loss is None else float(loss),
           "consensus_distance": distance, "heard": len(heard)}
    if (round_ + 1) % cfg.eval_every == 0 or round_ + 1 == schedule_length(cfg):
        row.update(peer.evaluate())
    return row | peer.privacy()


def schedule_length(cfg) -> int:
    """Rounds in the schedule: the training rounds, then the final averaging rounds of the algorithms that
    have them (``final_mixing``: no local steps, neighbours' models averaged until the peers agree)."""
    return cfg.rounds + (cfg.final_mixing if ALGORITHMS[cfg.algorithm].final_mixing else 0)


def _suspects_after(suspects: set[int], neighbours: Sequence[int], got: Gathered) -> set[int]:
    """Neighbours not to wait for next round: those that missed this deadline, until heard from again."""
    missing = set(neighbours) - set(got.messages)
    return (suspects | missing) - set(got.heard) - set(got.messages)


def dpsgd(peer: Peer, start_round: int = 0, *, tracking: bool = False) -> Algorithm:
    """Synchronous D-PSGD: local steps, send to all neighbours, wait for their model of the same round up to
    a deadline, then average with Metropolis-Hastings weights renormalised over what arrived.

    A neighbour that missed a whole deadline is not waited for again until it is heard from, so a dead
    neighbour costs one timeout, not one per round; with ``liveness = "adaptive"`` that timeout is a few
    normal round times (``p2pser.exchange.liveness``) rather than the whole ``round_timeout``.

    After ``rounds`` training rounds come ``final_mixing`` rounds without local steps: plain averaging, so
    the peers end holding (nearly) one model instead of as many as there are peers.

    ``tracking`` is K-GT, gradient tracking with local steps (Liu et al. 2023, "Decentralized gradient
    tracking with local steps", arXiv:2301.01313): every local step is corrected by ``c``, the difference
    between the neighbourhood's average update direction and our own in the previous round, which cancels
    the pull of each peer's own speakers (client drift). Each model message carries our update direction
    ``z`` too (``track/`` tensors), so it costs twice the bytes.
    """
    cfg = peer.config
    stop = _StopRule(cfg, peer.learner.task.val_key())
    suspects: set[int] = set()
    deadlines = Deadlines.from_config(cfg, peer.id)
    total = schedule_length(cfg)
    r = start_round
    while r < total:
        peer.round = r
        training = r < cfg.rounds
        start = peer.snapshot() if tracking else None
        loss = None
        if training:
            loss = peer.local_update(cfg.local_steps, correction=peer.algorithm_state.get("correction"))
            yield Compute(cfg.local_steps)
        own = peer.snapshot()
        direction = _direction(peer, start, own) if tracking else None
        yield Send(tuple(peer.neighbours), peer.encode(own, r, extra=_tracks(direction)))
        expect = frozenset(peer.neighbours) - suspects
        timeout = cfg.startup_timeout if r == start_round else deadlines.timeout(expect)
        got: Gathered = yield Gather("model", r, expect, timeout)
        deadlines.observe(got.waits, expect - set(got.messages))
        suspects = _suspects_after(suspects, peer.neighbours, got)
        distance = peer.mix(own, got.messages, peer.mix_weights)
        if tracking and training:
            _track(peer, direction, got.messages)
        row = _row(peer, r, loss, distance, list(got.messages)) | deadlines.row(timeout, got.waits)
        elapsed = yield Record(row)
        deadlines.round_ended(elapsed)
        if stop.done(row, elapsed):
            return
        r = yield from _next_round(peer, r, got)


TRACK = "track/"


def _direction(peer: Peer, start: dict[str, np.ndarray], end: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This round's average update direction, ``(start - end) / sum of learning rates`` (zero in a round
    without training)."""
    size = peer.learner.step_size()
    if size <= 0:
        return {k: np.zeros_like(v) for k, v in end.items()}
    return {k: ((start[k] - end[k]) / size).astype(end[k].dtype) for k in end}


def _tracks(direction: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    return None if direction is None else {TRACK + k: v for k, v in direction.items()}


def _track(peer: Peer, direction: dict[str, np.ndarray], received: dict[int, Message]) -> None:
    """K-GT's correction update: ``c += mix(z) - z``, the neighbourhood's average direction (through the
    same mixing rule as the models, so a robust rule also bounds a lying tracker) minus ours."""
    others = [Contribution(s, peer.mix_weights[s], {k: m.tensors[TRACK + k] for k in direction})
              for s, m in sorted(received.items())]
    mixed = peer.rule.mix(direction, peer.mix_weights[peer.id], others) if others else direction
    correction = peer.algorithm_state.get("correction") or {k: np.zeros_like(v) for k, v in direction.items()}
    peer.algorithm_state["correction"] = {
        k: (correction[k] + mixed[k] - direction[k]).astype(direction[k].dtype) for k in direction}


def fedavg(peer: Peer, start_round: int = 0, hub: int = 0) -> Algorithm:
    """Federated averaging on a star: every peer trains; the hub averages by sample counts (its own model
    included) and sends the average back, which the others adopt. Centralized FL as a baseline."""
    cfg = peer.config
    stop = _StopRule(cfg, peer.learner.task.val_key())
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
    stop = _StopRule(cfg, peer.learner.task.val_key())
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


def bagging(peer: Peer, start_round: int = 0) -> Algorithm:
    """Ensemble exchange for models that cannot be averaged (XGBoost, ``p2pser.learn.bagging``), in
    synchronous rounds: boost ``local_steps`` more trees on our own data, send each neighbour what it has not
    said it holds of the ensembles we hold (ours and relayed ones), wait for theirs up to a deadline as
    D-PSGD does, and keep the newest version of every ensemble. A peer predicts with a bounded,
    sample-weighted bag of them. The ``final_mixing`` rounds add no trees and only spread the last versions,
    so every peer ends holding every ensemble when they are at least the topology's diameter.

    Each message lists everything the sender holds; ``algorithm_state["known"]`` keeps, per neighbour, the
    versions it listed plus those we attached for it in the same round, and an ensemble is attached only
    when we hold a newer one than that, so a version crosses each link at most once in each direction (a
    lost one is attached again a round later, when the neighbour's list shows it missing).

    With ``--boosting cyclic`` the learner grows a travelling ensemble instead of its own and, while
    training, attaches it only for the next peer of the ring (``learner.at_round`` tells it the round).
    With ``--boosting histogram`` (``p2pser.learn.histboost``) what is listed and attached are the peers'
    gradient histograms of each level, keyed by (origin, step), and every peer grows the same ensemble.
    """
    cfg = peer.config
    learner = peer.learner
    stop = _StopRule(cfg, learner.task.val_key())
    suspects: set[int] = set()
    deadlines = Deadlines.from_config(cfg, peer.id)
    known: dict[int, dict[int, int]] = peer.algorithm_state.setdefault("known", {})
    total = schedule_length(cfg)
    r = start_round
    while r < total:
        peer.round = r
        loss = None
        learner.at_round(r, training=r < cfg.rounds)
        if r < cfg.rounds:
            loss = peer.local_update(cfg.local_steps)
            yield Compute(cfg.local_steps)
        attached: dict[int, dict[int, int]] = {}
        for j in peer.neighbours:
            offer = learner.offer(known.get(j, {}), to=j)
            attached[j] = {o: v for o, v, _, size in offer["index"].tolist() if size}
            yield Send((j,), peer.encode(offer, r))
        expect = frozenset(peer.neighbours) - suspects
        timeout = cfg.startup_timeout if r == start_round else deadlines.timeout(expect)
        got: Gathered = yield Gather("model", r, expect, timeout)
        deadlines.observe(got.waits, expect - set(got.messages))
        suspects = _suspects_after(suspects, peer.neighbours, got)
        peer.mix(learner.snapshot(), got.messages, {peer.id: float(peer.samples)}
                 | {s: float(m.samples) for s, m in got.messages.items()})
        for sender, message in got.messages.items():
            # What it listed before our message of this round reached it, and what that message attached.
            # Something of ours lost on the way is missing from its next list, so it is attached again.
            listed = learner.advertised(message.tensors)
            known[sender] = listed | {o: max(v, listed.get(o, -1)) for o, v in attached[sender].items()}
        row = _row(peer, r, loss, None, list(got.messages)) | deadlines.row(timeout, got.waits)
        elapsed = yield Record(row)
        deadlines.round_ended(elapsed)
        if stop.done(row, elapsed):
            return
        r = yield from _next_round(peer, r, got)


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
            if message.round < schedule_length(cfg):  # past the schedule's end: a lie or another run
                answers[sender] = message
            else:
                log.warning("peer %d: ignored %d's answer to our pull: round %d is past the schedule's end",
                            peer.id, sender, message.round)
        if answers:
            break
    if not answers:
        log.warning("peer %d: no neighbour answered the catch-up pull; continuing from round %d", peer.id,
                    start_round)
        peer.round = start_round
        return start_round
    answers = dict(sorted(answers.items()))
    weights = {peer.id: 0.0} | {s: peer.mix_weights.get(s, 1.0) for s in answers}
    peer.mix(peer.snapshot(), answers, weights)
    # An answer's round is the neighbour's round in progress, whose model it has most likely sent already
    # (it answers while waiting for that round's models): we join at the round after, which it will expect.
    # Of several answers we follow the lower median, not the most advanced: a neighbour that ran ahead alone
    # (all its own neighbours silent) would otherwise drag us, and then ours, to the end of the schedule.
    rounds = sorted(m.round + 1 for m in answers.values())
    round_ = min(max(start_round, rounds[(len(rounds) - 1) // 2]), schedule_length(cfg))
    peer.fast_forward(round_, max(m.age for m in answers.values()))
    log.info("peer %d: caught up from %d neighbour(s) at round %d (was at round %d)",
             peer.id, len(answers), round_, start_round)
    return round_


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm and what the code around it must know of it."""

    name: str
    run: Callable[..., Algorithm]  # (peer, start_round, **placement) -> the coroutine
    synchronous: bool  # rounds with a floor: models of finished rounds are stale, waits are timed
    needs_hub: bool = False  # star-shaped: one peer linked to every other gathers and answers
    state: tuple[str, ...] = ()  # keys it keeps in Peer.algorithm_state across rounds (checkpointed)
    summary: str = ""
    final_mixing: bool = False  # runs the config's final_mixing rounds after training
    extra_tensors: tuple[str, ...] = ()  # prefixes of tensor sets sent with the model (shaped like it)

    def message_template(self, template: Mapping[str, Any]) -> dict[str, Any]:
        """What this algorithm's ``model`` messages carry: the learner's template and its extra tensor sets."""
        return dict(template) | {prefix + name: spec for prefix in self.extra_tensors
                                 for name, spec in template.items()}

    def placement(self, topology: Topology) -> dict[str, int]:
        """Keyword arguments a peer of ``topology`` runs this algorithm with (the hub, if it needs one);
        a topology it cannot run on is a ``UserError`` naming the algorithm."""
        return {"hub": topology.hub(self.name)} if self.needs_hub else {}


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec("dpsgd", dpsgd, synchronous=True, final_mixing=True,
                      summary="synchronous D-PSGD: local steps, then a Metropolis-Hastings average of neighbours"),
        AlgorithmSpec("kgt", functools.partial(dpsgd, tracking=True), synchronous=True, final_mixing=True,
                      state=("correction",), extra_tensors=(TRACK,),
                      summary="D-PSGD with K-GT gradient tracking: local steps corrected towards the "
                              "neighbourhood's update direction (twice the bytes)"),
        AlgorithmSpec("gossip", gossip, synchronous=False,
                      summary="asynchronous gossip learning: push to one random neighbour, merge by model age"),
        AlgorithmSpec("fedavg", fedavg, synchronous=True, needs_hub=True,
                      summary="federated averaging through the star's hub (a centralized-FL baseline)"),
        AlgorithmSpec("bagging", bagging, synchronous=True, final_mixing=True, state=("known",),
                      summary="tree ensembles (--model xgb): boost on own data, relay ensembles, predict with "
                              "a sample-weighted bag"),
    )
}
# The config validates names without importing torch; both lists must name the same algorithms.
assert tuple(ALGORITHMS) == ALGORITHM_NAMES, (tuple(ALGORITHMS), ALGORITHM_NAMES)


def spec_of(name: str) -> AlgorithmSpec:
    return ALGORITHMS[name]


def start(peer: Peer, start_round: int = 0, *, resumed: bool = False, **placement: int) -> Algorithm:
    """The configured algorithm from ``start_round`` with its ``placement`` (see ``AlgorithmSpec``);
    ``resumed`` (restarted from a checkpoint) catches up with the neighbours first. A fresh start with
    ``normalizer = "global"`` first agrees on the normalisation statistics (``agree_statistics``)."""
    if resumed and start_round < schedule_length(peer.config):
        if peer.config.normalizer == "global" and getattr(peer.learner, "data", None) is not None \
                and peer.learner.data.raw is not None:
            # Its neighbours finished agreeing long ago and will not agree again.
            log.warning("peer %d: resumed from a checkpoint made before the normalisation statistics were agreed; "
                        "it goes on with its own statistics", peer.id)
        return _resumed(peer, start_round, placement)
    if peer.config.normalizer == "global" and not resumed and start_round == 0:
        return _after_statistics(peer, placement)
    return ALGORITHMS[peer.config.algorithm].run(peer, start_round, **placement)


def _after_statistics(peer: Peer, placement: dict[str, int]) -> Algorithm:
    yield from agree_statistics(peer)
    yield from ALGORITHMS[peer.config.algorithm].run(peer, 0, **placement)


def agree_statistics(peer: Peer) -> Generator[Any, Any, None]:
    """Average every peer's feature moments (frame count, per-channel sum and sum of squares) by gossip,
    before training, so that all peers standardise with the statistics of all training data without any
    peer showing another its features: only these three sums cross the wire, once per round.

    ``peer.statistics_rounds`` rounds of Metropolis-Hastings averaging (``topology.rounds_to_agree``) bring
    every peer within the configured tolerance of the exact network average; mean = sum / count and
    variance = sum of squares / count - mean^2 are then the pooled statistics. The first round waits up to
    ``startup_timeout`` for neighbours to come up, later ones ``round_timeout``.
    """
    cfg = peer.config
    values = peer.learner.moments()
    weights = {j: peer.mix_weights[j] for j in [*peer.neighbours, peer.id]}
    average = WeightedAverage()
    suspects: set[int] = set()
    for k in range(peer.statistics_rounds):
        yield Send(tuple(peer.neighbours), encode(values, sender=peer.id, round=k, samples=peer.samples,
                                                 kind="stats"))
        expect = frozenset(peer.neighbours) - suspects
        got: Gathered = yield Gather("stats", k, expect, cfg.startup_timeout if k == 0 else cfg.round_timeout)
        missing = expect - set(got.messages)
        if missing:
            log.warning("peer %d: statistics round %d went on without %s; the agreed statistics are then "
                        "only approximately the pooled ones", peer.id, k, sorted(missing))
        suspects = _suspects_after(suspects, peer.neighbours, got)
        others = [Contribution(s, weights[s], m.tensors) for s, m in sorted(got.messages.items())]
        values = average.mix(values, weights[peer.id], others)
    peer.learner.adopt_moments(values)
    log.info("peer %d: agreed on normalisation statistics after %d rounds", peer.id, peer.statistics_rounds)


def _resumed(peer: Peer, start_round: int, placement: dict[str, int]) -> Algorithm:
    round_ = yield from catch_up(peer, start_round)
    yield from start(peer, round_, **placement)
