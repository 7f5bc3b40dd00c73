"""Averaging rules: how a peer combines its own parameters with what its neighbours sent.

A rule is one small class with one method, ``mix`` (the Flower-strategy idea): the algorithm decides the
weights (Metropolis-Hastings for dpsgd, model age for gossip, sample counts for fedavg), the rule decides
how to combine. Contributions are always taken in sender order so that a simulation and a real run add
floating-point numbers in the same order and get the same result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

State = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    sender: int
    weight: float
    state: State


class MixingRule(Protocol):
    name: str

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        """Return the new parameters; ``own_weight`` and the contributions' weights need not sum to 1."""


class WeightedAverage:
    """Plain weighted average, renormalised over what actually arrived (a missing neighbour never stalls)."""

    name = "average"

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        ordered = sorted(others, key=lambda c: c.sender)
        total = own_weight + sum(c.weight for c in ordered)
        mixed = {}
        for name, value in own.items():
            acc = value.astype(np.float64) * (own_weight / total)
            for c in ordered:
                acc += c.state[name].astype(np.float64) * (c.weight / total)
            mixed[name] = acc.astype(value.dtype)
        return mixed


MIXING_RULES: dict[str, type] = {"average": WeightedAverage}


def consensus_distance(own: State, others: Sequence[State]) -> float | None:
    """Mean L2 distance between our parameters and each neighbour's, over all tensors (None when alone)."""
    if not others:
        return None
    dists = []
    for other in others:
        sq = sum(float(np.sum((own[k].astype(np.float64) - other[k]) ** 2)) for k in own)
        dists.append(sq**0.5)
    return float(np.mean(dists))
