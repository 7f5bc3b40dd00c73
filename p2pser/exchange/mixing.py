"""Averaging rules: how a peer combines its own parameters with what its neighbours sent.

A rule is one small class with one method, ``mix`` (the Flower-strategy idea): the algorithm decides the
weights (Metropolis-Hastings for dpsgd, model age for gossip, sample counts for fedavg), the rule decides
how to combine. Contributions are always taken in sender order so that a simulation and a real run add
floating-point numbers in the same order and get the same result.

Two Byzantine-robust rules bound what a lying neighbour can do to an honest peer (issue 6):
``ClippedGossip`` (self-centred clipping) and ``TrimmedMean`` (coordinate-wise, BRIDGE-style). Both equal
the plain average when every neighbour is honest and close, so the price without an attack stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

State = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Contribution:
    sender: int
    weight: float
    state: State


class MixingRule(Protocol):
    name: str

    @classmethod
    def from_config(cls, config) -> MixingRule:
        """The rule with the run config's settings for it."""

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        """Return the new parameters; ``own_weight`` and the contributions' weights need not sum to 1."""


class WeightedAverage:
    """Plain weighted average, renormalised over what actually arrived (a missing neighbour never stalls)."""

    name = "average"

    @classmethod
    def from_config(cls, config) -> WeightedAverage:
        return cls()

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        ordered = sorted(others, key=lambda c: c.sender)
        total = own_weight + sum(c.weight for c in ordered)
        scales = [c.weight / total for c in ordered]
        mixed = {}
        for name, value in own.items():
            # own * w + sum(other * w_j) in float64, the terms added in sender order: every element sees the
            # operations of ``value.astype(np.float64) * w + ...`` in the same order, so the result is the
            # same to the bit, but block by block in cache instead of one float64 temporary of the whole
            # tensor per term (17.2 ms -> 10.5 ms of CPU for 1.67 M parameters and 6 neighbours: step.json).
            out = np.empty_like(value)
            flat_out, flat_own = out.reshape(-1), value.reshape(-1)
            flat = [c.state[name].reshape(-1) for c in ordered]
            acc = np.empty(min(flat_own.size, _BLOCK), dtype=np.float64)
            term = np.empty_like(acc)
            for lo in range(0, flat_own.size, _BLOCK):
                hi = min(lo + _BLOCK, flat_own.size)
                a, t = acc[: hi - lo], term[: hi - lo]
                np.multiply(flat_own[lo:hi], own_weight / total, out=a, dtype=np.float64)
                for other, scale in zip(flat, scales):
                    a += np.multiply(other[lo:hi], scale, out=t, dtype=np.float64)
                flat_out[lo:hi] = a
            mixed[name] = out
        return mixed


# Elements per block of the mixing arithmetic: 256 KB of float64, within a core's L2 cache.
_BLOCK = 1 << 15


def _pairwise(n: int, leaf) -> float:
    """The sum of ``leaf(lo, hi)`` over blocks of ``[0, n)``, added in the order of numpy's pairwise summation
    (``np.sum`` of a contiguous float64 array halves it at a multiple of 8 until a block is small), so that
    with ``leaf = np.sum of that block`` the result equals ``np.sum`` of the whole array to the bit
    (``tests/test_speed.py`` pins this against the numpy installed)."""
    def part(lo: int, size: int) -> float:
        if size <= _BLOCK:
            return leaf(lo, lo + size)
        half = size // 2
        half -= half % 8
        return part(lo, half) + part(lo + half, size - half)

    return part(0, n)


def squared_distances(own: State, others: Sequence[State]) -> list[float]:
    """``sum over tensors of np.sum((own[k] - other[k]) ** 2)`` in float64 for each of ``others``: the same
    numbers as that expression, computed block by block in cache (own widened once per block, not once per
    neighbour) instead of three float64 temporaries of every tensor per neighbour."""
    sq = [0.0] * len(others)
    for k, value in own.items():
        flat_own = value.reshape(-1)
        flat = [other[k].reshape(-1) for other in others]
        wide = np.empty(min(flat_own.size, _BLOCK), dtype=np.float64)
        diff = np.empty_like(wide)

        # One pass over the blocks for all neighbours: each block of own is widened once.
        sums: list[list] = [[] for _ in others]
        for lo, hi in _leaves(flat_own.size):
            w, d = wide[: hi - lo], diff[: hi - lo]
            w[:] = flat_own[lo:hi]
            for j, other in enumerate(flat):
                np.subtract(w, other[lo:hi], out=d)
                np.multiply(d, d, out=d)
                sums[j].append(np.sum(d))
        for j in range(len(others)):
            it = iter(sums[j])
            sq[j] += float(_pairwise(flat_own.size, lambda lo, hi, it=it: next(it)))
    return sq


def _leaves(n: int) -> list[tuple[int, int]]:
    """The blocks ``_pairwise`` visits, in its order."""
    out: list[tuple[int, int]] = []
    _pairwise(n, lambda lo, hi: out.append((lo, hi)) or 0.0)
    return out


def _distance(a: State, b: State) -> float:
    """L2 norm of ``a - b`` over the whole parameter vector (all tensors together), in float64."""
    return squared_distances(b, [a])[0] ** 0.5


class ClippedGossip:
    """Self-centred clipping (He, Karimireddy and Jaggi 2022, "Byzantine-robust decentralized learning via
    ClippedGossip", arXiv:2202.01545)::

        x_i <- x_i + sum_j w_ij * CLIP(x_j - x_i, tau_i),   CLIP(z, tau) = min(1, tau / ||z||) * z

    with the norm over the whole parameter vector and the weights renormalised over what arrived, as in
    ``WeightedAverage`` (so with no clipping the two agree). A neighbour can move us by at most
    ``w_ij * tau_i``, however far from us the model it sends is.

    ``radius > 0`` fixes tau. ``radius == 0`` chooses it each round from the neighbours' distances: the
    authors' code (epfml/byzantine-robust-decentralized-optimizer, ``codes/aggregator.py``,
    ``SelfCenteredClipping`` with ``tau=None``) takes the second-largest distance, so exactly the farthest
    neighbour is clipped and one Byzantine neighbour is tolerated. Here a peer may have several attackers
    among its neighbours (2 of 20 peers on an exponential graph), so we take the median distance (the
    alternative left in that code): a Byzantine minority among the neighbours then pulls no harder than a
    typical honest neighbour, at the price of also shortening the pull of the farther half of the honest
    ones. It still pulls every round in the same direction, so a sustained attack is limited, not removed
    (measured in BENCHMARKS.md). With one or two neighbours the median is the farthest and nothing is
    clipped: a peer cannot tell which of two disagreeing models to trust.
    """

    name = "clipped"

    def __init__(self, radius: float = 0.0) -> None:
        self.radius = radius

    @classmethod
    def from_config(cls, config) -> ClippedGossip:
        return cls(config.clip_radius)

    def tau(self, own: State, others: Sequence[Contribution]) -> float:
        """The clipping radius for this round (``others`` non-empty)."""
        if self.radius > 0:
            return self.radius
        distances = sorted(_distance(c.state, own) for c in others)
        return distances[len(distances) // 2]

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        ordered = sorted(others, key=lambda c: c.sender)
        if not ordered:
            return {name: value.copy() for name, value in own.items()}
        total = own_weight + sum(c.weight for c in ordered)
        tau = self.tau(own, ordered)
        acc = {name: value.astype(np.float64) for name, value in own.items()}
        for c in ordered:
            norm = _distance(c.state, own)
            scale = c.weight / total * (min(1.0, tau / norm) if norm > 0 else 1.0)
            for name, value in own.items():
                acc[name] += (c.state[name].astype(np.float64) - value) * scale
        return {name: acc[name].astype(value.dtype) for name, value in own.items()}


class TrimmedMean:
    """Coordinate-wise trimmed mean over the neighbours, combined with the own model (BRIDGE-T, Yang and
    Bajwa 2019, "BRIDGE: Byzantine-resilient decentralized gradient descent", arXiv:1908.08098).

    For every coordinate the ``trim`` largest and ``trim`` smallest of the received values are dropped and
    the rest averaged (unweighted: a coordinate's survivors come from different senders, so per-sender
    weights no longer apply). The own model is never trimmed (a peer trusts itself) and keeps its weight:
    ``x_i <- (w_ii x_i + W m) / (w_ii + W)`` where ``m`` is the trimmed mean and ``W`` the summed weight of
    the neighbours heard. With ``trim = 0`` and equal neighbour weights this is exactly the plain average.

    Too few neighbours to trim (fewer than ``2 * trim + 1`` arrived, e.g. a ring, or neighbours that missed
    the deadline): the own model joins the values and the result is their coordinate-wise median, which is
    what trimming as much as possible leaves. With one neighbour that is the midpoint of the two models;
    with two it is the median of three, which still ignores one outlying neighbour. A peer told to adopt
    (own weight 0, a fedavg client) has no vote: the median is over the received models alone. Never an
    error, never a wait.
    """

    name = "trimmed"

    def __init__(self, trim: int = 1) -> None:
        self.trim = trim

    @classmethod
    def from_config(cls, config) -> TrimmedMean:
        return cls(config.trim)

    def mix(self, own: State, own_weight: float, others: Sequence[Contribution]) -> dict[str, np.ndarray]:
        ordered = sorted(others, key=lambda c: c.sender)
        if not ordered:
            return {name: value.copy() for name, value in own.items()}
        n, b = len(ordered), self.trim
        mixed = {}
        if n < 2 * b + 1:
            log.debug("trimmed mean: %d neighbours heard, too few to trim %d at each end; median with own", n, b)
            voters = ([own] if own_weight > 0 else []) + [c.state for c in ordered]
            for name, value in own.items():
                stacked = np.stack([v[name].astype(np.float64) for v in voters])
                mixed[name] = np.median(stacked, axis=0).astype(value.dtype)
            return mixed
        weight = sum(c.weight for c in ordered)
        total = own_weight + weight
        for name, value in own.items():
            # Sorting each coordinate makes the sum independent of the senders' order as well.
            stacked = np.sort(np.stack([c.state[name].astype(np.float64) for c in ordered]), axis=0)
            trimmed = stacked[b:n - b].sum(axis=0) / (n - 2 * b)
            mixed[name] = (value.astype(np.float64) * (own_weight / total) + trimmed * (weight / total)).astype(
                value.dtype
            )
        return mixed


MIXING_RULES: dict[str, type[MixingRule]] = {"average": WeightedAverage, "clipped": ClippedGossip, "trimmed": TrimmedMean}


def make_rule(config) -> MixingRule:
    """The mixing rule a run's config asks for (``mixing``, with ``trim`` and ``clip_radius``)."""
    return MIXING_RULES[config.mixing].from_config(config)


def consensus_distance(own: State, others: Sequence[State]) -> float | None:
    """Mean L2 distance between our parameters and each neighbour's, over all tensors (None when alone)."""
    if not others:
        return None
    return float(np.mean([s**0.5 for s in squared_distances(own, others)]))
