"""One peer of the protocol: who it is, who its neighbours are, where it is in the schedule, and its learner.

No sockets and no clock live here. The algorithms in ``algorithms.py`` drive a ``Peer`` and say what to
send and what to wait for; the real-time carrier and the simulator carry that out. That is how simulation
and deployment run the very same learning code. What is learned, and how, is the learner's business
(``p2pser.learn.learner``); the peer only encodes what the learner lets out and mixes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.config import ENSEMBLE_MODELS, RunConfig, train_config
from p2pser.errors import UserError
from p2pser.exchange.attacks import Attacking, is_attacker
from p2pser.exchange.codec import MAX_SAMPLES, Message, encode
from p2pser.exchange.mixing import Contribution, MixingRule, consensus_distance, make_rule
from p2pser.exchange.privacy import SpeakerPrivate, check_dp_config, dp_seed, speaker_plan, utterance_plan
from p2pser.exchange.recording import RecordingUpdates, speaker_attributes
from p2pser.exchange.topology import Topology, metropolis_hastings_weights, rounds_to_agree
from p2pser.features.augment import Copies, perturbations
from p2pser.learn.data import PeerData
from p2pser.learn.learner import Learner, TorchLearner
from p2pser.learn.tasks import CLASSIFICATION, Task, experiment_task
from p2pser.partition.experiment import rows

log = logging.getLogger(__name__)


class Peer:
    def __init__(
        self,
        peer_id: int,
        neighbours: Sequence[int],
        learner: Learner,
        config: RunConfig,
        *,
        mix_weights: Mapping[int, float],
        rule: MixingRule | None = None,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        """``max_samples``: the most training utterances any peer of the run can hold (from the partition),
        so a neighbour claiming more is refused instead of outweighing the others."""
        self.id = peer_id
        self.max_samples = max_samples
        self.neighbours = sorted(neighbours)
        self.learner = learner
        self.config = config
        self.mix_weights = dict(mix_weights)  # includes our own id: the diagonal of the mixing matrix
        self.rule = rule or make_rule(config)
        # Where the algorithm is: the round in progress, and for asynchronous gossip the model's age (local
        # steps it has seen). Answers to a neighbour's pull and checkpoints report them.
        self.round = 0
        self.age = 0.0
        # What the algorithm carries from round to round besides the learner (the registry names it, e.g.
        # gradient tracking's tracker): checkpointed with the peer, restored on resume.
        self.algorithm_state: dict[str, Any] = {}
        self.statistics_rounds = 0  # rounds of agreeing on normalisation statistics (--normalizer global)

    @property
    def samples(self) -> int:
        return self.learner.samples

    @property
    def template(self):
        """Names, shapes and dtypes every received model must match."""
        return self.learner.template

    def snapshot(self) -> dict[str, np.ndarray]:
        return self.learner.snapshot()

    def local_update(self, steps: int, correction: Mapping[str, np.ndarray] | None = None) -> float:
        return self.learner.train(steps, correction)

    def evaluate(self) -> dict[str, float]:
        return self.learner.evaluate()

    def fast_forward(self, round_: int, age: float = 0.0) -> None:
        """Jump to ``round_`` (after catching up with neighbours): the learning-rate schedule and the model
        age follow, so we continue where they are, not where our checkpoint was."""
        self.round = round_
        self.age = max(self.age, age)
        self.learner.advance_to(round_ * self.config.local_steps)

    def encode(self, state: Mapping[str, np.ndarray], round_: int, *, age: float = 0.0, kind: str = "model",
               extra: Mapping[str, np.ndarray] | None = None) -> list:
        """Frames of what we send of ``state`` (as the learner lets it out) and the algorithm's ``extra``
        tensors (a tracker)."""
        tensors = dict(self.learner.outgoing(state, round_)) | dict(extra or {})
        return encode(tensors, sender=self.id, round=round_, samples=self.samples, age=age, kind=kind)

    def pull_request(self) -> list:
        """Ask neighbours for their current parameters (after a restart, to catch up at once)."""
        return encode({}, sender=self.id, round=self.round, samples=0, kind="pull")

    def answer_pull(self) -> list:
        """Our current parameters, round and age, for a neighbour that pulled them."""
        return self.encode(self.snapshot(), self.round, age=self.age, kind="state")

    def mix(
        self, own: Mapping[str, np.ndarray], received: Mapping[int, Message], weights: Mapping[int, float]
    ) -> float | None:
        """Replace our parameters by the mix of ``own`` and the received models under our rule.

        Returns the consensus distance to the neighbours heard, measured before mixing (None if none).
        """
        others = [Contribution(s, weights[s], {k: m.tensors[k] for k in own}) for s, m in sorted(received.items())]
        # A learner whose states are not points of one parameter space (tree ensembles) has no distance.
        averageable = getattr(self.learner, "averageable", True)
        distance = consensus_distance(own, [c.state for c in others]) if averageable else None
        self.learner.mix(own, weights[self.id], others, self.rule)
        return distance

    def privacy(self) -> dict[str, Any]:
        """The learner's differential-privacy fields of a metrics row (empty without DP)."""
        report = getattr(self.learner, "privacy", None)
        return dict(report()) if report is not None else {}

    def save_outputs(self, folder: str | Path, *, durable: bool = True) -> None:
        """What a peer leaves in its folder at exit for the report (the learner's files; ``durable``: fsynced,
        as a real peer does; a simulation, whose crashes are simulated, skips it)."""
        self.learner.save(folder, durable=durable)


def make_learner(data: PeerData, cfg: RunConfig, peer_id: int, task: Task = CLASSIFICATION, *,
                 n_peers: int = 1) -> Learner:
    """The learner of peer ``peer_id`` under ``cfg`` for ``task``, wrapped by the run's cross-cutting
    behaviour. ``n_peers`` (the run's) bounds a meaningful delta of speaker-level DP."""
    check_dp_config(cfg)
    if cfg.model in ENSEMBLE_MODELS:
        if task.name != CLASSIFICATION.name:
            raise UserError(f"--model {cfg.model} learns categories only: use --task categorical, or an "
                            "averageable model for dimensions")
        if cfg.dp != "none":
            raise UserError(f"--dp {cfg.dp} protects gradients and averaged models; --model {cfg.model} has "
                            "neither (use an averageable model)")
        if cfg.boosting == "histogram":  # one ensemble grown by all peers on summed gradient histograms
            from p2pser.learn.histboost import HistogramLearner

            learner: Learner = HistogramLearner(data, cfg.features, task, peer_id=peer_id, seed=cfg.seed,
                                                n_peers=n_peers)
        else:
            from p2pser.learn.bagging import BaggingLearner  # imports xgboost: only runs that use it pay

            learner = BaggingLearner(data, cfg.features, task, peer_id=peer_id, seed=cfg.seed,
                                     total_trees=cfg.rounds * cfg.local_steps, boosting=cfg.boosting,
                                     n_peers=n_peers)
    else:
        learner = TorchLearner(
            data, cfg.model, cfg.features, train_config(cfg), task,
            model_seed=cfg.seed, trainer_seed=cfg.seed * 100_003 + peer_id,
            total_steps=cfg.rounds * cfg.local_steps,
            optimizer_state=cfg.optimizer_state, momentum=0.9 if cfg.momentum is None else cfg.momentum,
            privacy=utterance_plan(cfg, len(data.y_train)) if cfg.dp == "utterance" else None,
            dp_seed=dp_seed(cfg, peer_id),
        )
    if cfg.dp == "speaker":  # everything sent is clipped and noised; the attacker below lies about that
        learner = SpeakerPrivate(learner, speaker_plan(cfg, max(n_peers, 1)), dp_seed(cfg, peer_id))
    if is_attacker(cfg, peer_id):  # an experiment's Byzantine peer: lies on the wire, never to itself
        learner = Attacking(learner, cfg, peer_id)
    return learner


def build_peer(plan, topology: Topology, peer_id: int, cfg: RunConfig, features, row_of: dict[int, int],
               test: tuple[np.ndarray, np.ndarray, np.ndarray], *, learner: Learner | None = None,
               copies: Copies | None = None) -> Peer:
    """The one way a peer is assembled, shared by real processes and the simulator.

    ``test`` is the fold's test set (x, y, lengths; ``test_set``), passed in so that simulated peers share
    one copy. ``learner``: one built elsewhere by this function (the simulator's learner worker processes,
    ``p2pser.carriers.workers``) instead of a new one. ``copies``: perturbed copies of training rows
    (``--augment``; ``copies_for``), of which the peer's own join its training part.
    """
    own = rows(row_of, plan.peers[peer_id])
    if len(own) == 0:
        raise UserError(f"peer {peer_id} has no usable training audio: all {len(plan.peers[peer_id])} of its "
                        "files were skipped (reasons above); fix or remove them, or use fewer peers")
    if learner is None:
        data = PeerData.from_arrays(
            features.x, plan.experiment.row_targets(features, row_of), features.lengths, own, test, plan.classes,
            val_fraction=cfg.val_fraction, seed=cfg.seed * 7919 + peer_id, mode=cfg.normalizer,
            speakers=features.speakers, copies=copies,
        )
        learner = make_learner(data, cfg, peer_id, experiment_task(plan.experiment), n_peers=len(plan.peers))
        if cfg.record_updates != "off":  # outermost: it records exactly what is sent (p2pser audit)
            speakers, attributes = speaker_attributes(plan, plan.peers[peer_id])
            learner = RecordingUpdates(learner, cfg, peer_id, speakers=speakers, attributes=attributes,
                                       data_dir=str(plan.corpus.root))
    w = _mixing_weights(topology)
    neighbours = topology.neighbours(peer_id)
    if cfg.model in ENSEMBLE_MODELS and cfg.boosting == "histogram":  # relays along shortest paths
        learner.use_topology([topology.neighbours(p) for p in range(topology.n)])
    if cfg.model in ENSEMBLE_MODELS and cfg.boosting == "cyclic" and topology.n > 1 \
            and (peer_id + 1) % topology.n not in neighbours:
        raise UserError(f"--boosting cyclic passes each ensemble from peer k to peer k + 1, but peer {peer_id} is "
                        f"not linked to peer {(peer_id + 1) % topology.n}: use a topology that contains the ring "
                        "(ring, exponential, a torus or complete graph), or --boosting own")
    # A peer's samples are its training files less validation and skipped ones: never more than its share.
    most = max(len(files) for files in plan.peers) * (1 + len(perturbations(cfg.augment, cfg.augment_copies)))
    peer = Peer(peer_id, neighbours, learner, cfg,
                mix_weights={j: float(w[peer_id, j]) for j in [*neighbours, peer_id]}, max_samples=most)
    if cfg.normalizer == "global":
        peer.statistics_rounds = rounds_to_agree(topology, cfg.stats_tolerance)
    return peer


_weights: tuple[Topology, np.ndarray] | None = None


def _mixing_weights(topology: Topology) -> np.ndarray:
    """The topology's Metropolis-Hastings matrix, computed once for all the peers a simulation builds (an
    N x N matrix per peer made building 1,000 peers quadratic in memory traffic)."""
    global _weights
    if _weights is None or _weights[0] is not topology:
        _weights = (topology, metropolis_hastings_weights(topology))
    return _weights[1]
