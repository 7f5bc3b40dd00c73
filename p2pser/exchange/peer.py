"""One peer's learning state: its own data, its model and trainer, and how it mixes neighbours' models.

No sockets and no clock live here. The algorithms in ``algorithms.py`` drive a ``Peer`` and say what to
send and what to wait for; the real-time runner and the simulator carry that out. That is how simulation and
deployment run the very same learning code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2pser.config import RunConfig, train_config
from p2pser.data.features import Normalizer
from p2pser.exchange.attacks import corrupt, is_attacker
from p2pser.exchange.codec import MAX_SAMPLES, Decoder, Message, encode, template_of
from p2pser.exchange.mixing import Contribution, MixingRule, consensus_distance, make_rule
from p2pser.files import write_atomically
from p2pser.learn.models import build_model
from p2pser.learn.trainer import LocalTrainer, evaluate

log = logging.getLogger(__name__)


@dataclass
class PeerData:
    """A peer's own training and validation utterances (normalised with its own statistics) and the
    fold's test set (shared, read-only; normalised batch by batch at evaluation so that many simulated
    peers never hold copies of it)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    lengths_test: np.ndarray  # valid frames per test utterance: padding stays exactly zero when normalised
    classes: list[str]
    normalizer: Normalizer

    @classmethod
    def from_arrays(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        lengths: np.ndarray,
        own: np.ndarray,
        test: tuple[np.ndarray, np.ndarray, np.ndarray],
        classes: Sequence[str],
        *,
        val_fraction: float,
        seed: int,
    ) -> PeerData:
        """Split the peer's own rows ``own`` of ``x`` into train and validation; ``test`` = (x, y, lengths)
        of the fold's test set, shared, not copied."""
        rng = np.random.default_rng(seed)
        own = rng.permutation(np.asarray(own))
        n_val = round(len(own) * val_fraction) if len(own) > 2 else 0
        val, train = own[:n_val], own[n_val:]
        normalizer = Normalizer.fit(x[train], lengths[train])
        x_test, y_test, lengths_test = test
        return cls(
            x_train=normalizer.apply(x[train], lengths[train]),
            y_train=y[train],
            x_val=normalizer.apply(x[val], lengths[val]),
            y_val=y[val],
            x_test=x_test,
            y_test=y_test,
            lengths_test=lengths_test,
            classes=list(classes),
            normalizer=normalizer,
        )


class Peer:
    def __init__(
        self,
        peer_id: int,
        neighbours: Sequence[int],
        data: PeerData,
        config: RunConfig,
        *,
        mix_weights: Mapping[int, float],
        rule: MixingRule | None = None,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        """``max_samples``: the most training utterances any peer of the run can hold (from the partition),
        so a neighbour claiming more is refused instead of outweighing the others."""
        self.id = peer_id
        self.neighbours = sorted(neighbours)
        self.data = data
        self.config = config
        self.mix_weights = dict(mix_weights)  # includes our own id: the diagonal of the mixing matrix
        self.rule = rule or make_rule(config)
        _, channels, frames = data.x_train.shape
        # Every peer starts from the same initial weights (same seed): the usual D-PSGD set-up, and the
        # consensus distance then measures only what training and mixing did.
        self.model = build_model(config.model, channels, frames, len(data.classes), seed=config.seed)
        self._float_params = {
            name: t for name, t in self.model.state_dict().items() if torch.is_floating_point(t)
        }
        train_cfg = train_config(config)
        self.trainer = LocalTrainer(
            self.model,
            data.x_train,
            data.y_train,
            len(data.classes),
            train_cfg,
            seed=config.seed * 100_003 + peer_id,
            total_steps=config.rounds * config.local_steps,
        )
        self.template = template_of(self.snapshot())
        self.samples = len(data.y_train)
        self.max_samples = max_samples
        self.timings = {"train": 0.0, "eval": 0.0}  # seconds, to tell learning from overhead
        # Where the algorithm is: the round in progress, and for asynchronous gossip the model's age (local
        # steps it has seen). Answers to a neighbour's pull and checkpoints report them.
        self.round = 0
        self.age = 0.0

    def snapshot(self) -> dict[str, np.ndarray]:
        """A copy of the shared parameters: what goes on the wire must not change while it is being sent."""
        return {name: t.detach().cpu().numpy().copy() for name, t in self._float_params.items()}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, t in self._float_params.items():
                t.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))

    def local_update(self, steps: int) -> float:
        t0 = time.perf_counter()
        loss = float(self.trainer.train_steps(steps))
        self.timings["train"] += time.perf_counter() - t0
        return loss

    def fast_forward(self, round_: int, age: float = 0.0) -> None:
        """Jump to ``round_`` (after catching up with neighbours): the learning-rate schedule and the model
        age follow, so we continue where they are, not where our checkpoint was."""
        self.round = min(round_, self.config.rounds)
        self.age = max(self.age, age)
        self.trainer.step = max(self.trainer.step, round_ * self.config.local_steps)

    def decoder(self) -> Decoder:
        """How this peer checks what it receives: its model's layout, and no ``samples`` or ``age`` beyond
        what an honest neighbour of this run can send (a model's age grows by ``local_steps`` a round at
        most, and mixing takes the largest age, so no honest age exceeds ``rounds x local_steps``)."""
        cfg = self.config
        return Decoder(self.template, max_samples=self.max_samples, max_age=float(cfg.rounds * cfg.local_steps))

    def encode(self, state: Mapping[str, np.ndarray], round_: int, *, age: float = 0.0, kind: str = "model") -> list:
        if is_attacker(self.config, self.id):  # an experiment's Byzantine peer: lies on the wire, never to itself
            state = corrupt(state, self.config, self.id, round_)
        return encode(state, sender=self.id, round=round_, samples=self.samples, age=age, kind=kind)

    def pull_request(self) -> list:
        """Ask neighbours for their current parameters (after a restart, to catch up at once)."""
        return encode({}, sender=self.id, round=self.round, samples=0, kind="pull")

    def answer_pull(self) -> list:
        """Our current parameters, round and age, for a neighbour that pulled them."""
        return self.encode(self.snapshot(), self.round, age=self.age, kind="state")

    def mix(
        self, own: Mapping[str, np.ndarray], received: Mapping[int, Message], weights: Mapping[int, float]
    ) -> float | None:
        """Replace our parameters by the weighted mix of ``own`` and the received models.

        Returns the consensus distance to the neighbours heard, measured before mixing (None if none).
        """
        others = [Contribution(s, weights[s], m.tensors) for s, m in sorted(received.items())]
        distance = consensus_distance(own, [c.state for c in others])
        if others:
            self.load(self.rule.mix(own, weights[self.id], others))
        return distance

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        data = self.data
        row: dict[str, float] = {}
        if len(data.y_val):
            row["val_ua"] = evaluate(self.model, data.x_val, data.y_val, data.classes)["ua"]
        if len(data.y_test):
            x_test = data.normalizer.apply(data.x_test, data.lengths_test)
            report = evaluate(self.model, x_test, data.y_test, data.classes)
            row.update(test_ua=report["ua"], test_wa=report["wa"], test_macro_f1=report["macro_f1"])
        self.timings["eval"] += time.perf_counter() - t0
        return row

    def save_model(self, path: str | Path) -> None:
        """Write the shared parameters as .npz (no pickle), atomically: a crash leaves the old file."""
        state = self.snapshot()
        write_atomically(path, lambda fh: np.savez(fh, **state))
