"""The simulated network and its faults: link delays, message loss, slow peers, churn and partitions.

Everything here is drawn from seeded generators, so the same seed gives the same schedule. Distributions are
written as text so they fit a flag or a TOML value: ``const:0.01``, ``uniform:0.005:0.05``, ``exp:0.02``
(mean), ``lognormal:0.02:0.5`` (median, sigma). Times are virtual seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pser.errors import UserError


@dataclass(frozen=True)
class Distribution:
    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, text: str, what: str) -> Distribution:
        kind, _, rest = text.partition(":")
        arity = {"const": 1, "uniform": 2, "exp": 1, "lognormal": 2}
        try:
            params = tuple(float(p) for p in rest.split(":")) if rest else ()
        except ValueError:
            params = ()
        if kind not in arity or len(params) != arity[kind] or any(p < 0 for p in params):
            raise UserError(
                f"{what} {text!r} is not a distribution: use const:X, uniform:A:B, exp:MEAN or "
                "lognormal:MEDIAN:SIGMA with non-negative numbers"
            )
        return cls(kind, params)

    def sample(self, rng: np.random.Generator) -> float:
        p = self.params
        if self.kind == "const":
            return p[0]
        if self.kind == "uniform":
            return float(rng.uniform(p[0], p[1]))
        if self.kind == "exp":
            return float(rng.exponential(p[0])) if p[0] > 0 else 0.0
        return float(p[0] * np.exp(rng.normal(0.0, p[1])))


NEVER_STARTED = -1  # an outage's start for a peer that is down from the beginning (``PEER@start-``)


@dataclass(frozen=True)
class Outage:
    """Peer ``peer`` is down from the end of its round ``start`` (``NEVER_STARTED``: from the beginning)
    until the others reach round ``end``."""

    peer: int
    start: int
    end: int | None  # None: never comes back


def parse_churn(text: str | None, n_peers: int, *, rounds: int = 0, seed: int = 0) -> list[Outage]:
    """``"3@10-20,5@15-"``: peer 3 down after its round 10 and back at round 20; peer 5 gone from 15.
    ``"7@start-"``: peer 7 never starts (``"7@start-12"``: it joins when the others reach round 12, catching
    up like a restarted peer).

    ``"random:0.25"``: a seeded random quarter of the peers each crash once, after a round drawn from the
    first half of the ``rounds``, and come back 10-25% of the rounds later (the churn benchmark's schedule).
    """
    outages = []
    for item in filter(None, (text or "").split(",")):
        if item.startswith("random:"):
            outages.extend(_random_churn(item, n_peers, rounds, seed))
            continue
        try:
            peer_text, window = item.split("@")
            start_text, _, end_text = window.partition("-")
            start = NEVER_STARTED if start_text == "start" else int(start_text)
            outage = Outage(int(peer_text), start, int(end_text) if end_text else None)
        except ValueError:
            raise UserError(f"churn entry {item!r} must look like PEER@START-END, PEER@START-, PEER@start- or "
                            "random:FRACTION") from None
        if not 0 <= outage.peer < n_peers or (outage.end is not None and outage.end <= outage.start):
            raise UserError(f"churn entry {item!r}: peer must be 0..{n_peers - 1} and END after START")
        outages.append(outage)
    if len({o.peer for o in outages}) != len(outages):
        raise UserError(f"churn {text!r} names a peer twice: each peer crashes at most once")
    return outages


def _random_churn(item: str, n_peers: int, rounds: int, seed: int) -> list[Outage]:
    try:
        fraction = float(item.removeprefix("random:"))
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"churn entry {item!r}: FRACTION must be a number in [0, 1]")
    if rounds < 8:
        raise UserError(f"churn entry {item!r} needs at least 8 rounds, the run has {rounds}")
    rng = np.random.default_rng([seed, 29])
    peers = sorted(int(p) for p in rng.choice(n_peers, size=round(fraction * n_peers), replace=False))
    outages = []
    for peer in peers:
        start = int(rng.integers(1, rounds // 2 + 1))
        down = int(rng.integers(max(1, rounds // 10), max(2, rounds // 4) + 1))
        outages.append(Outage(peer, start, start + down))
    return outages


def parse_window(text: str | None) -> tuple[int, int] | None:
    """``"10-20"``: rounds 10 to 19 inclusive."""
    if not text:
        return None
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"partition window {text!r} must look like START-END (rounds)") from None
    if b <= a:
        raise UserError(f"partition window {text!r}: END must be after START")
    return a, b


@dataclass(frozen=True)
class FaultPlan:
    drop: float = 0.0
    delay: Distribution = Distribution("const", (0.0,))
    step_time: Distribution = Distribution("const", (0.01,))
    stragglers: float = 0.0  # share of peers that are slow
    straggler_factor: float = 5.0
    churn: tuple[Outage, ...] = ()
    partition: tuple[int, int] | None = None  # round window during which the two halves cannot talk

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise UserError(f"--drop must be in [0, 1), got {self.drop}")
        if not 0.0 <= self.stragglers <= 1.0 or self.straggler_factor < 1.0:
            raise UserError("--stragglers must be in [0, 1] and --straggler-factor at least 1")

    def step_seconds(self, n_peers: int, seed: int) -> np.ndarray:
        """Per-peer virtual seconds per local step; stragglers are a seeded random subset."""
        rng = np.random.default_rng([seed, 11])
        speed = np.array([self.step_time.sample(rng) for _ in range(n_peers)])
        slow = rng.permutation(n_peers)[: round(self.stragglers * n_peers)]
        speed[slow] *= self.straggler_factor
        return speed

    def cut(self, n_peers: int) -> np.ndarray:
        """Side of the partition for each peer: the lower and the upper half of the ids."""
        return (np.arange(n_peers) >= n_peers // 2).astype(int)
