"""Differential privacy of a run's peers: the plan each peer runs, and speaker-level DP on the wire.

``--dp utterance`` is DP-SGD inside local training (``p2pser.learn.privacy``); this module only plans it.
``--dp speaker`` is ``SpeakerPrivate``, a ``LearnerWrapper``: before a peer sends a model it has trained
since its last mix, the change since that mix is clipped to ``dp_clip`` (L2 over all tensors) and Gaussian
noise of standard deviation ``noise_multiplier * dp_clip`` is added; what goes out is ``base + clipped
change + noise``. The mix then starts from that release instead of the private model, so the peer's state
after every mix, and whatever it sends without having trained since (final averaging rounds, a fedavg
hub's average, answers to pulls), is a function of releases alone: post-processing, free of charge. One
release per training round, each a Gaussian mechanism on the peer's whole data set (sensitivity
``dp_clip`` when that data set is removed), composed over the rounds by the accountant.

Not covered, by design of the formal unit: the sample count in every message header (the size of the data
set) and the fact that a peer takes part at all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.learn.learner import LearnerWrapper
from p2pser.learn.privacy import Accountant, PrivacyPlan

log = logging.getLogger(__name__)

# Separates the DP noise's random stream from every other use of (seed, peer).
_STREAM = 0xD9
# Default clipping bounds, not tuned. Utterance: a per-utterance gradient norm, as in Opacus's examples.
# Speaker: of the order of one round's model change of the default recipe (cnn1d-shallow, 8 AdamW steps of
# at most lr = 2e-3 per coordinate). The signal-to-noise ratio per coordinate, 1 / (noise_multiplier *
# sqrt(parameters)), does not depend on it; the clip only sets how far the noise throws the model.
DEFAULT_CLIP = {"utterance": 1.0, "speaker": 0.5}


def check_dp_config(cfg: RunConfig) -> None:
    """What DP cannot protect in this run: a ``UserError`` naming the setting."""
    if cfg.dp == "none":
        return
    if cfg.normalizer == "global":
        raise UserError(f"--dp {cfg.dp} with --normalizer global: the peers would send their feature statistics "
                        "unprotected; use --normalizer speaker or local")
    if cfg.dp == "speaker" and cfg.algorithm == "kgt":
        raise UserError("--dp speaker with --algorithm kgt: its tracking tensors would leave unprotected; use "
                        "dpsgd, gossip or fedavg")


def preflight(cfg: RunConfig, peer_sizes: list[int]) -> None:
    """Refuse a run whose DP settings cannot hold, before any peer starts (``launch``): the checks each peer
    makes, on the plan's sizes (a peer's training utterances are its files less validation)."""
    check_dp_config(cfg)
    if cfg.dp == "speaker":
        speaker_plan(cfg, len(peer_sizes))
    elif cfg.dp == "utterance":
        for size in sorted(set(peer_sizes)):
            utterance_plan(cfg, max(1, int(size * (1 - cfg.val_fraction))))


def dp_seed(cfg: RunConfig, peer_id: int) -> int | None:
    """The noise generator's seed of a peer: from the run's seed (reproducible) or None (the OS's entropy)."""
    if cfg.dp_noise == "os":
        return None
    return int(np.random.SeedSequence([cfg.seed, peer_id, _STREAM]).generate_state(1, np.uint64)[0] >> 1)


def utterance_plan(cfg: RunConfig, train_utterances: int) -> PrivacyPlan:
    """DP-SGD for one peer: Poisson rate batch/utterances, rounds x local_steps steps."""
    rate = min(1.0, cfg.batch_size / max(train_utterances, 1))
    return PrivacyPlan.make("utterance", epsilon=cfg.dp_epsilon, noise_multiplier=cfg.dp_noise_multiplier,
                            clip=cfg.dp_clip or DEFAULT_CLIP["utterance"], delta=cfg.dp_delta, sample_rate=rate,
                            steps=cfg.rounds * cfg.local_steps, records=train_utterances,
                            accountant=cfg.dp_accountant)


def speaker_plan(cfg: RunConfig, n_peers: int) -> PrivacyPlan:
    """Speaker-level DP for one peer: one release of the whole data set per training round."""
    return PrivacyPlan.make("speaker", epsilon=cfg.dp_epsilon, noise_multiplier=cfg.dp_noise_multiplier,
                            clip=cfg.dp_clip or DEFAULT_CLIP["speaker"], delta=cfg.dp_delta, sample_rate=1.0,
                            steps=cfg.rounds, records=n_peers, accountant=cfg.dp_accountant)


def clip_and_noise(base: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray], clip: float, std: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``base + change * min(1, clip / |change|) + N(0, std^2)`` per coordinate, ``change = state - base``."""
    change = {k: state[k].astype(np.float64) - base[k] for k in state}
    norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in change.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (base[k] + change[k] * scale + rng.normal(0.0, std, state[k].shape)).astype(state[k].dtype)
            for k in state}


class SpeakerPrivate(LearnerWrapper):
    """Speaker-level DP of everything a peer sends (see the module's docstring)."""

    def __init__(self, inner, plan: PrivacyPlan, seed: int | None) -> None:
        super().__init__(inner)
        self.plan = plan
        self.accountant = Accountant(plan)
        self.rng = np.random.default_rng(seed)
        self.base = {k: v.astype(np.float64) for k, v in inner.snapshot().items()}  # the common initial model
        self.trained = False  # trained since the last mix: the state is private until released
        self.pending: dict[str, np.ndarray] | None = None  # this round's release, once made

    def train(self, steps: int, correction=None) -> float:
        self.trained = True
        return self.inner.train(steps, correction)

    def _release(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.pending is None:
            std = self.plan.noise_multiplier * self.plan.clip
            self.pending = clip_and_noise(self.base, state, self.plan.clip, std, self.rng)
            self.accountant.steps += 1
        return self.pending

    def outgoing(self, state: Mapping[str, np.ndarray], round_: int) -> Mapping[str, np.ndarray]:
        # Once released, a round's model is the same message whoever asks (a neighbour's pull included).
        return self.inner.outgoing(self._release(state) if self.trained else state, round_)

    def mix(self, own: Mapping[str, np.ndarray], own_weight: float, others: Sequence[Any], rule: Any) -> None:
        released = self._release(own) if self.trained else own
        self.inner.load(released)  # mixing without neighbours keeps the release, never the private model
        self.inner.mix(released, own_weight, others, rule)
        self.base = {k: v.astype(np.float64) for k, v in self.inner.snapshot().items()}
        self.trained, self.pending = False, None

    def privacy(self) -> dict[str, Any]:
        return self.accountant.row() | ({"dp_exhausted": True} if self.accountant.would_exceed(1) else {})

    def checkpoint_state(self) -> dict[str, Any]:
        return self.inner.checkpoint_state() | {"speaker_dp": {
            "base": dict(self.base), "trained": self.trained, "releases": self.accountant.steps,
            "rng": self.rng.bit_generator.state}}

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)
        saved = state.get("speaker_dp")
        if saved is not None:
            self.base = {k: np.asarray(v, dtype=np.float64) for k, v in saved["base"].items()}
            self.trained, self.pending = bool(saved["trained"]), None
            self.accountant.steps = int(saved["releases"])
            self.rng.bit_generator.state = saved["rng"]
