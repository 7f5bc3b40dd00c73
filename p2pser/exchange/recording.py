"""A record of what each peer's updates give away, for ``p2pser audit`` (``--record-updates first-layer``).

``RecordingUpdates`` wraps a peer's learner outermost, so it sees exactly what is sent. For every round in
which the peer trained, it keeps the *update* of the model's first weight tensor: the sent first layer
minus the first layer the peer started the round from (its state after the last mix). That is the worst
case of a curious neighbour: it sees the update exactly on a complete graph or as a fedavg hub, and up to
the other neighbours' share of the mix elsewhere. The first layer is where attribute-inference attacks on
federated SER find the most (Feng et al. 2022), and it keeps the record smaller than the model (cnn1d-shallow
on mfcc: 154 kB a round; the default mlp on ComParE: 6.5 MB, its 256 x 6373 first layer, of 6.7 MB).

At exit the peer writes ``updates.npz`` (``rounds`` [R], ``updates`` [R, *layer shape], float32; no
pickle) and ``updates.json`` (the layer, the peer's speakers and their attributes, the run's settings and
data folder): the target of an audit. The attributes are the auditor's ground truth and stay in the run
folder; they never cross the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.config import RunConfig, config_to_dict
from p2pser.files import write_atomically
from p2pser.learn.learner import LearnerWrapper
from p2pser.report.run_folder import write_json_atomic

UPDATES = "updates.npz"
UPDATES_META = "updates.json"


def first_layer(template: Mapping[str, tuple[tuple[int, ...], Any]]) -> str:
    """The name of the model's first weight tensor (two or more dimensions) in parameter order."""
    for name, (shape, _) in template.items():
        if len(shape) >= 2:
            return name
    return next(iter(template))


class RecordingUpdates(LearnerWrapper):
    def __init__(self, inner, cfg: RunConfig, peer_id: int, *, speakers: Sequence[str],
                 attributes: Mapping[str, Any], data_dir: str) -> None:
        super().__init__(inner)
        self.layer = first_layer(inner.template)
        self.meta = {"peer": peer_id, "layer": self.layer, "speakers": list(speakers),
                     "attributes": dict(attributes), "data_dir": data_dir, "config": config_to_dict(cfg)}
        self.start = inner.snapshot()[self.layer].copy()
        self.trained = False
        self.updates: dict[int, np.ndarray] = {}

    def train(self, steps: int, correction=None) -> float:
        self.trained = True
        return self.inner.train(steps, correction)

    def outgoing(self, state: Mapping[str, np.ndarray], round_: int) -> Mapping[str, np.ndarray]:
        sent = self.inner.outgoing(state, round_)
        if self.trained and round_ not in self.updates:
            self.updates[round_] = (np.asarray(sent[self.layer], dtype=np.float32) - self.start).astype(np.float32)
        return sent

    def mix(self, own: Mapping[str, np.ndarray], own_weight: float, others: Sequence[Any], rule: Any) -> None:
        self.inner.mix(own, own_weight, others, rule)
        self.start = self.inner.snapshot()[self.layer].copy()
        self.trained = False

    def save(self, folder: str | Path, *, durable: bool = True) -> None:
        self.inner.save(folder, durable=durable)
        rounds = sorted(self.updates)
        shape = self.start.shape
        updates = np.stack([self.updates[r] for r in rounds]) if rounds else np.zeros((0, *shape), np.float32)
        write_atomically(Path(folder) / UPDATES,
                         lambda fh: np.savez(fh, rounds=np.asarray(rounds, dtype=np.int64), updates=updates),
                         durable=durable)
        write_json_atomic(Path(folder) / UPDATES_META, self.meta | {"rounds_recorded": len(rounds)})


def speaker_attributes(plan, own: np.ndarray) -> tuple[list[str], dict[str, Any]]:
    """The speakers of a peer's utterances and the attributes they share (``sex``; ``age`` where the corpus
    labels it): one value, or None when the peer's speakers differ."""
    utterances = [plan.corpus.utterances[i] for i in own]
    speakers = sorted({u.speaker for u in utterances})
    attributes: dict[str, Any] = {}
    for name in ("sex", "age"):
        values = {getattr(u, name, None) for u in utterances}
        attributes[name] = values.pop() if len(values) == 1 else None
    return speakers, attributes
