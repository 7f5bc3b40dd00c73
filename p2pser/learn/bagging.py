"""The ``xgb`` learner: boosted trees on a peer's own data, bagged with the ensembles other peers sent.

Trees cannot be averaged. Each peer boosts its own ensemble (``local_steps`` more rounds per round of the
schedule, up to ``XGB_TREES``); peers pass ensembles on, and a peer predicts with the sample-weighted mean of
the class probabilities of a bounded set of ensembles: its own and up to ``members - 1`` received ones, those
trained on the most utterances (Flower's ``FedXgbBagging`` does the same through a server).

What crosses the wire (the ``State``) is every ensemble the peer holds, each from its *origin* peer, tagged
with a version that grows as the origin boosts more trees:

    index      int64 [k, 4]   one row per ensemble held: origin, version, samples, bytes attached here
    ensembles  uint8 [n]      the attached ensembles' xgboost JSON, concatenated in index order

A row with 0 bytes says "I hold this version" without sending it: the algorithm (``bagging`` in
``p2pser.exchange.algorithms``) attaches only what a neighbour has not said it holds, so every version of
every version of an ensemble crosses each link at most once in each direction (both ways only when both
ends got it in the same round and listed it too late for the other), and relaying brings every peer every ensemble within the
topology's diameter. ``check`` validates a received state before it is filed (the codec calls it), so a
malformed ensemble is rejected with a reason and never reaches xgboost's parser unchecked.

``boosting="cyclic"`` (``--boosting cyclic``) lets the trees of one ensemble see many peers' data, which a
bag of ensembles each boosted on one speaker cannot: there are as many ensembles as peers, and in round r
peer p adds ``local_steps`` trees on its own data to ensemble (p - r) mod n, the one peer p - 1 extended in
round r - 1, and passes it on to peer p + 1 (its neighbour: the topology must contain the ring). Every
peer boosts in every round, so the ensembles travel in parallel; each is a cyclic boosting over all peers
(Flower's ``FedXgbCyclic`` runs one such ensemble through a server), and a peer predicts with the mean of
all of them. During training an ensemble is attached only for the neighbour that extends it next; the
``final_mixing`` rounds spread the finished ones to everybody.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.files import write_atomically
from p2pser.learn import trees
from p2pser.learn.data import PeerData, SharedStatistics
from p2pser.learn.tasks import Task

log = logging.getLogger(__name__)

State = Mapping[str, np.ndarray]
INDEX, ENSEMBLES = "index", "ensembles"
MAX_ORIGINS = 4096  # rows of an index: more peers than any run here
DEFAULT_MEMBERS = 16  # ensembles a peer predicts with (its own included)
ENSEMBLES_FILE = "ensembles.npz"


@dataclass
class Member:
    version: int
    samples: int
    raw: np.ndarray  # uint8 xgboost JSON
    booster: Any


class TreeExchange(SharedStatistics):
    """What the tree learners (this module's, ``p2pser.learn.histboost``'s) share: nothing to average, no
    step in parameter space, no learning-rate schedule; what is sent is ``offer``, what a neighbour lacks."""

    averageable = False  # no parameter average, consensus distance or average model

    def offer(self, known: Mapping[int, int], to: int | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def step_size(self) -> float:
        return 0.0  # trees are added, not moved

    def snapshot(self) -> dict[str, np.ndarray]:
        return self.offer({})

    def outgoing(self, state: State, round_: int) -> State:
        return state

    def advance_to(self, step: int) -> None:
        """Nothing to move: trees have no learning-rate schedule."""

    def predict_proba(self, x: np.ndarray, *, cache: str | None = None) -> np.ndarray:
        """Class probabilities for features ``[N, C, T]``; ``cache`` names the input (``val``, ``test``) for a
        learner that can reuse work between evaluations of it."""
        raise NotImplementedError

    def evaluation_extras(self) -> dict[str, float]:
        """Fields the learner adds to every evaluated metrics row."""
        return {}

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        data, task = self.data, self.task
        row: dict[str, float] = {}
        if len(data.y_val):
            row[task.val_key()] = task.score(data.y_val, self.predict_proba(data.x_val, cache="val"),
                                             data.classes)[task.primary]
        if len(data.y_test):
            probs = self.predict_proba(data.test_inputs(), cache="test")
            row.update(task.test_row(task.score(data.y_test, probs, data.classes)))
        row |= self.evaluation_extras()
        self.timings["eval"] += time.perf_counter() - t0
        return row


class BaggingLearner(TreeExchange):
    """Implements ``p2pser.learn.learner.Learner`` for XGBoost; see the module docstring."""

    def __init__(self, data: PeerData, features: str, task: Task, *, peer_id: int, seed: int, total_trees: int,
                 members: int = DEFAULT_MEMBERS, boosting: str = "own", n_peers: int = 1) -> None:
        self.data = data
        self.features = features
        self.task = task
        self.id = peer_id
        self.seed = seed
        self.total_trees = min(total_trees, trees.XGB_TREES)
        self.members = members
        self.n_classes = len(data.classes)
        self._x = trees.utterance_vectors(data.x_train)
        self.n_features = self._x.shape[1]
        self.samples = len(data.y_train)
        self.template = {INDEX: ((None, 4), np.dtype(np.int64)), ENSEMBLES: ((None,), np.dtype(np.uint8))}
        self.timings = {"train": 0.0, "eval": 0.0}
        self.boosted = 0  # boosting rounds of our own ensemble
        self.held: dict[int, Member] = {}  # origin -> newest ensemble held, our own included once boosted
        self._last_loss = float("nan")
        self.cyclic = boosting == "cyclic"
        self.n_peers = max(n_peers, 1)
        self.round, self.training = 0, True

    def at_round(self, round_: int, *, training: bool) -> None:
        """The schedule's round now starting (``training``: a round that boosts, not a final one)."""
        self.round, self.training = round_, training

    def _extending(self, peer: int, round_: int) -> int:
        """``--boosting cyclic``: the ensemble (its origin) that ``peer`` extends in ``round_``."""
        return (peer - round_) % self.n_peers

    # -- learning ---------------------------------------------------------------------------------------
    def train(self, steps: int, correction: State | None = None) -> float:
        """Boost ``steps`` more rounds on our own data (none once ``total_trees`` are reached); the mean
        log loss of the bag on our training data."""
        t0 = time.perf_counter()
        if self.cyclic:
            self._extend(steps)
            self.timings["train"] += time.perf_counter() - t0
            return self._last_loss
        rounds = min(steps, self.total_trees - self.boosted)
        if rounds > 0:
            own = self.held.get(self.id)
            booster = trees.boost(self._x, self.data.y_train, self.n_classes, rounds, seed=self.seed + self.id,
                                  init=own.booster if own else None)
            self.boosted += rounds
            self.held[self.id] = Member(self.boosted, self.samples, trees.to_wire(booster), booster)
            p = trees.probabilities(booster, self._x)[np.arange(self.samples), self.data.y_train]
            self._last_loss = float(-np.mean(np.log(np.maximum(p, 1e-12))))
        self.timings["train"] += time.perf_counter() - t0
        return self._last_loss

    def _extend(self, steps: int) -> None:
        origin = self._extending(self.id, self.round)
        base = self.held.get(origin)
        if base is None and self.round > 0:
            log.warning("peer %d: ensemble %d did not reach us from peer %d; starting it afresh", self.id, origin,
                        (self.id - 1) % self.n_peers)
        rounds = min(steps, trees.XGB_TREES - (base.version if base else 0))
        if rounds <= 0:
            return
        booster = trees.boost(self._x, self.data.y_train, self.n_classes, rounds, seed=self.seed + self.id,
                              init=base.booster if base else None)
        self.boosted += rounds
        version = (base.version if base else 0) + rounds
        self.held[origin] = Member(version, (base.samples if base else 0) + self.samples, trees.to_wire(booster),
                                   booster)
        p = trees.probabilities(booster, self._x)[np.arange(self.samples), self.data.y_train]
        self._last_loss = float(-np.mean(np.log(np.maximum(p, 1e-12))))

    def bag(self) -> list[Member]:
        """The ensembles we predict with: our own and the received ones trained on the most utterances."""
        others = sorted((m for o, m in self.held.items() if o != self.id), key=lambda m: -m.samples)
        own = [self.held[self.id]] if self.id in self.held else []
        return own + others[: self.members - len(own)]

    def predict_proba(self, x: np.ndarray, *, cache: str | None = None) -> np.ndarray:
        """Sample-weighted mean class probabilities of the bag for features ``[N, C, T]`` (nothing cached: the
        bag changes as ensembles arrive)."""
        bag = self.bag()
        vectors = trees.utterance_vectors(x)
        if not bag:
            return np.full((len(x), self.n_classes), 1.0 / self.n_classes)
        total = sum(m.samples for m in bag) or len(bag)
        return sum((m.samples or 1) / total * trees.probabilities(m.booster, vectors) for m in bag)

    def evaluation_extras(self) -> dict[str, float]:
        return {"bag_size": len(self.bag())}

    # -- the wire ---------------------------------------------------------------------------------------
    def holdings(self) -> dict[int, int]:
        """origin -> version of every ensemble held."""
        return {o: m.version for o, m in self.held.items()}

    def offer(self, known: Mapping[int, int], to: int | None = None) -> dict[str, np.ndarray]:
        """Our state for a neighbour ``to`` known to hold ``known`` (origin -> version): every ensemble
        listed, those it lacks (or holds older) attached; while cyclic boosting trains, only the ensemble
        we grew this round, to the next peer of the ring, who extends it next (a version we hold of another
        ensemble is older than the one its last extender sends)."""
        if self.cyclic and self.training and to is not None:
            grown = {self._extending(self.id, self.round)} if to == (self.id + 1) % self.n_peers else set()
            return pack(self.held, known, only=grown)
        return pack(self.held, known)

    @staticmethod
    def advertised(state: State) -> dict[int, int]:
        """origin -> version a (checked) received state says its sender holds."""
        return {int(o): int(v) for o, v, _, _ in np.asarray(state[INDEX])}

    def check(self, state: State) -> None:
        """Refuse (``EnsembleError``) a received state whose index or ensembles are malformed: called on
        every message before it is filed, so a bad ensemble is counted and logged as a rejection."""
        index, blob = np.asarray(state[INDEX]), np.asarray(state[ENSEMBLES])
        if index.shape[0] > MAX_ORIGINS:
            raise trees.EnsembleError(f"{index.shape[0]} ensembles listed, at most {MAX_ORIGINS}")
        origins, versions, samples, sizes = index.T if len(index) else (np.zeros(0, np.int64),) * 4
        if len(set(origins.tolist())) != len(origins) or (origins < 0).any() or (origins >= 1 << 31).any():
            raise trees.EnsembleError("origins repeat or are not peer ids")
        if (versions < 1).any() or (versions > trees.MAX_TREES).any():
            raise trees.EnsembleError(f"versions must lie in 1..{trees.MAX_TREES}")
        if (samples < 0).any() or (samples > 1 << 40).any() or (sizes < 0).any():
            raise trees.EnsembleError("negative or absurd sample counts or sizes")
        if int(sizes.sum()) != blob.size:
            raise trees.EnsembleError(f"the index attaches {int(sizes.sum())} bytes, the message carries {blob.size}")
        for origin, raw in self._attached(index, blob):
            try:
                trees.from_wire(raw, n_features=self.n_features, n_classes=self.n_classes)
            except trees.EnsembleError as exc:
                raise trees.EnsembleError(f"ensemble of peer {origin}: {exc}") from None

    @staticmethod
    def _attached(index: np.ndarray, blob: np.ndarray):
        at = 0
        for origin, _, _, size in index:
            if size:
                yield int(origin), blob[at:at + size]
                at += size

    def mix(self, own: State, own_weight: float, others: Sequence[Any], rule: Any) -> None:
        """Keep the newest version of every ensemble the neighbours attached (``others``: contributions of
        checked states); ``own_weight`` and the averaging ``rule`` do not apply to trees."""
        for contribution in sorted(others, key=lambda c: c.sender):
            index, blob = np.asarray(contribution.state[INDEX]), np.asarray(contribution.state[ENSEMBLES])
            at = 0
            for origin, version, samples, size in index.tolist():
                raw = blob[at:at + size]
                at += size
                held = self.held.get(origin)
                mine = origin == self.id and not self.cyclic  # cyclic: our ensemble comes back longer
                if not size or mine or (held is not None and held.version >= version):
                    continue
                booster = trees.from_wire(raw, n_features=self.n_features, n_classes=self.n_classes)
                self.held[origin] = Member(version, samples, np.array(raw, dtype=np.uint8), booster)

    # -- normalisation statistics (--normalizer global): SharedStatistics ----------------------------------
    def _inputs_changed(self) -> None:
        self._x = trees.utterance_vectors(self.data.x_train)

    # -- checkpoints and outputs ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"boosted": self.boosted,
                "held": {o: {"version": m.version, "samples": m.samples, "raw": m.raw} for o, m in self.held.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.boosted = int(state["boosted"])
        self.held = {}
        for origin, m in state["held"].items():
            booster = trees.from_wire(m["raw"], n_features=self.n_features, n_classes=self.n_classes)
            self.held[int(origin)] = Member(int(m["version"]), int(m["samples"]), np.asarray(m["raw"]), booster)

    def identity(self) -> dict[str, Any]:
        return {"model": "xgb", "features": self.features, "samples": self.samples}

    def save(self, folder: str | Path, *, durable: bool = True) -> None:
        """``ensembles.npz``: the index and ensembles of the bag this peer predicts with (no pickle)."""
        chosen = {id(m) for m in self.bag()}
        state = pack({o: m for o, m in self.held.items() if id(m) in chosen}, {})
        write_atomically(Path(folder) / ENSEMBLES_FILE, lambda fh: np.savez(fh, **state), durable=durable)


def pack(held: Mapping[int, Member], known: Mapping[int, int], only: set[int] | None = None) -> dict[str, np.ndarray]:
    """The wire state of ``held``: all listed, those newer than ``known`` says (origin -> version) attached
    (of the origins in ``only``, when given)."""
    rows, blobs = [], []
    for origin, m in sorted(held.items()):
        send = known.get(origin, -1) < m.version and (only is None or origin in only)
        rows.append((origin, m.version, m.samples, len(m.raw) if send else 0))
        if send:
            blobs.append(m.raw)
    index = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return {INDEX: index, ENSEMBLES: np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)}
