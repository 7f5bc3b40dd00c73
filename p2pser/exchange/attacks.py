"""Byzantine attack modes for experiments: what a peer listed in ``--attackers`` sends instead of its model.

An attacker trains and mixes honestly; it lies only on the wire: ``Attacking`` wraps its learner and
changes only what the learner lets out (``outgoing``). Its own parameters are
never touched, so what it sends each round is a function of an honest model, which is the usual threat
model of the robust-aggregation literature (the attacker knows the honest models and tracks them):

- ``sign-flip``: ``-x``, the model with its sign flipped (a full-strength pull towards the negated model;
  ``--attack-scale`` is not used, so the attack is the same whatever the scale);
- ``scale``: ``attack_scale * x``;
- ``random``: random parameters, Gaussian with mean 0 and standard deviation ``attack_scale``, drawn from a
  generator seeded by (run seed, peer, round), so the same run sends the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from p2pser.config import RunConfig
from p2pser.learn.learner import LearnerWrapper

# Separates the attack's random stream from every other use of (seed, peer, round).
_STREAM = 0xB1


def attacking_peers(config: RunConfig) -> frozenset[int]:
    """The peers that lie on the wire in this run (none unless an attack is chosen)."""
    return config.attacker_ids() if config.attack != "none" else frozenset()


def is_attacker(config: RunConfig, peer_id: int) -> bool:
    return peer_id in attacking_peers(config)


def corrupt(state: Mapping[str, np.ndarray], config: RunConfig, peer_id: int, round_: int) -> dict[str, np.ndarray]:
    """What attacker ``peer_id`` sends in ``round_`` instead of ``state``: new arrays of the same names,
    shapes and dtypes; ``state`` itself is left unchanged. An honest peer's state comes back as is."""
    if not is_attacker(config, peer_id):
        return dict(state)
    if config.attack == "sign-flip":
        return {name: np.negative(value) for name, value in state.items()}
    if config.attack == "scale":
        return {name: (value * config.attack_scale).astype(value.dtype) for name, value in state.items()}
    rng = np.random.default_rng([config.seed, peer_id, round_, _STREAM])
    return {name: rng.normal(0.0, config.attack_scale, value.shape).astype(value.dtype) for name, value in state.items()}


class Attacking(LearnerWrapper):
    """The learner of an experiment's Byzantine peer: everything honest except what it sends."""

    def __init__(self, inner, config: RunConfig, peer_id: int) -> None:
        super().__init__(inner)
        self.config = config
        self.peer_id = peer_id

    def outgoing(self, state: Mapping[str, np.ndarray], round_: int) -> dict[str, np.ndarray]:
        return corrupt(self.inner.outgoing(state, round_), self.config, self.peer_id, round_)
