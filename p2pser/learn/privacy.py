"""Differential privacy of what a learner learns: the accountant, noise calibration and DP-SGD.

Two granularities share this module (``--dp``):

- ``utterance``: DP-SGD (Abadi et al. 2016, "Deep learning with differential privacy"): every step samples
  each training utterance with probability ``q`` (Poisson sampling, which the accountant's subsampling
  amplification assumes), clips each utterance's gradient to ``clip`` and adds Gaussian noise of standard
  deviation ``noise_multiplier * clip`` to their sum. Per-sample gradients come from Opacus's
  ``GradSampleModule``. The same step with rows grouped by speaker (``groups``) is user-level DP-SGD
  (McMahan et al. 2018), which the pooled baseline uses for ``--dp speaker``.
- ``speaker`` in decentralized runs: the change of a peer's model since its last mix is clipped and noised
  before it is sent (``p2pser.exchange.privacy.SpeakerPrivate``): one Gaussian mechanism per round on the
  peer's whole data set, without subsampling.

Both are counted by ``Accountant``: Opacus's RDP accountant (Mironov 2017; conservative, fast) or PRV
accountant (Gopi et al. 2021; tight). Neighbouring data sets differ by adding or removing one unit (an
utterance, or a peer's whole data), the convention of Opacus and of DP-FedAvg.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from p2pser.errors import UserError

log = logging.getLogger(__name__)



@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Rényi DP of one subsampled Gaussian mechanism at Opacus's orders. RDP composes by addition, so a run
    of k steps costs k times this: computed once (about 0.5 s), then every epsilon is a cheap conversion."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    return orders, tuple(float(v) for v in compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                                        steps=1, orders=list(orders)))


@functools.lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` Gaussian mechanisms with ``noise_multiplier``, each on a Poisson sample of rate
    ``sample_rate`` (1.0: the whole data set), at ``delta``: Opacus's RDP or PRV accountant."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        orders, rdp = _rdp_per_step(float(noise_multiplier), float(sample_rate))
        eps, _ = get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp) * steps, delta=delta)
        return float(eps)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # PRV warns about numerical precision far below what we report
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (within 0.1%) whose ``steps`` mechanisms spend at most ``target_epsilon``
    (cached: the peers of a simulation with equal data sizes share one calibration)."""
    low, high = 0.0, 10.0
    while epsilon_spent(high, sample_rate, steps, delta, accountant) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise UserError(f"--dp-epsilon {target_epsilon} cannot be reached in {steps} steps at delta {delta}")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if epsilon_spent(mid, sample_rate, steps, delta, accountant) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanism one learner runs: noise, clip, sampling rate, planned steps and the target."""

    mode: str  # "utterance" or "speaker"
    noise_multiplier: float
    clip: float
    delta: float
    sample_rate: float  # per step (1.0: each step uses the whole data set)
    steps: int  # mechanisms planned for the whole run
    target_epsilon: float | None  # None: no cap (an explicit noise multiplier alone)
    accountant: str = "rdp"

    @classmethod
    def make(cls, mode: str, *, epsilon: float | None, noise_multiplier: float | None, clip: float, delta: float,
             sample_rate: float, steps: int, records: int, accountant: str = "rdp") -> PrivacyPlan:
        """Calibrate the noise to ``epsilon`` over ``steps``, or check an explicit ``noise_multiplier``
        against it. ``records`` (utterances, or peers) bounds a meaningful ``delta`` (below 1/records)."""
        unit = "utterances" if mode == "utterance" else "peers"
        if delta >= 1.0 / max(records, 1):
            raise UserError(f"--dp-delta {delta:g} is not below 1/{records} (one over the {records} {unit}): a "
                            f"mechanism could then reveal a whole record; use a smaller delta, e.g. 1e-5")
        if noise_multiplier is None:
            if epsilon is None:
                raise UserError(f"--dp {mode} needs --dp-epsilon E (a target) or --dp-noise-multiplier S")
            noise_multiplier = calibrate(epsilon, delta, sample_rate, steps, accountant)
        plan = cls(mode, float(noise_multiplier), float(clip), float(delta), float(sample_rate), int(steps),
                   epsilon, accountant)
        planned = plan.epsilon(steps)
        if epsilon is not None and planned > epsilon * (1 + 1e-6):
            raise UserError(f"--dp-noise-multiplier {noise_multiplier:g} would spend epsilon {planned:.3g} in the "
                            f"{steps} planned steps, more than --dp-epsilon {epsilon:g}: raise the noise or lower "
                            "the rounds")
        log.info("dp %s: noise multiplier %.4g, clip %g, sample rate %.4g, %d steps: epsilon %.4g at delta %g",
                 mode, plan.noise_multiplier, clip, sample_rate, steps, planned, delta)
        return plan

    def epsilon(self, steps: int) -> float:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)


class Accountant:
    """Counts the mechanisms a learner ran and reports the epsilon spent."""

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.steps = 0

    def epsilon(self, steps: int | None = None) -> float:
        return self.plan.epsilon(self.steps if steps is None else steps)

    def would_exceed(self, more: int) -> bool:
        """True when ``more`` further mechanisms would spend more than the target epsilon."""
        target = self.plan.target_epsilon
        return target is not None and self.epsilon(self.steps + more) > target * (1 + 1e-6)

    def row(self) -> dict[str, float]:
        """Metrics-row fields: the epsilon spent so far, and the noise it was bought with."""
        return {"dp_epsilon": round(self.epsilon(), 6), "dp_noise_multiplier": round(self.plan.noise_multiplier, 6)}


def make_dp_compatible(model: nn.Module) -> None:
    """Prepare ``model`` in place for per-sample gradients: in-place ReLUs break Opacus's backward hooks,
    and ``nn.GRU`` becomes Opacus's ``DPGRU`` (same parameter names and values, so the wire template, the
    checkpoints and the average model are unchanged)."""
    from opacus.layers import DPGRU

    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GRU):
                replacement = DPGRU(child.input_size, child.hidden_size, num_layers=child.num_layers,
                                    bias=child.bias, batch_first=child.batch_first, dropout=child.dropout,
                                    bidirectional=child.bidirectional)
                replacement.load_state_dict(child.state_dict())
                setattr(module, name, replacement)


class DPSGD:
    """Per-unit gradient clipping and Gaussian noise for one model's training steps.

    Call ``forward`` for the scores of a batch, ``backward`` the *summed* loss, then ``privatize``: it
    replaces every ``.grad`` by (sum over units of the clipped unit gradients + N(0, (sigma * clip)^2)) /
    ``expected_units``. A unit is an utterance, or with ``groups`` all rows of one group (a speaker).
    """

    def __init__(self, model: nn.Module, plan: PrivacyPlan, *, expected_units: float, seed: int | None) -> None:
        from opacus import GradSampleModule

        from p2pser.runtime import keep_blocks_up_to

        make_dp_compatible(model)
        self.model = model
        self.plan = plan
        self.expected_units = float(expected_units)
        self.grad_sample = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Per-sample gradients are a batch's worth of whole models at every step: keep such blocks in the
        # process (a Poisson batch may run to about twice its expected size) instead of mapping them afresh.
        per_unit = sum(p.numel() * p.element_size() for p in self.params)
        keep_blocks_up_to(int(2 * max(self.expected_units, 1.0) * per_unit))
        # Seeded (reproducible, like Opacus without secure_mode) or from the OS's entropy (--dp-noise os).
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(np.random.bytes(8), "little") >> 1)
        self.accountant = Accountant(plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grad_sample(x)

    def privatize(self, groups: torch.Tensor | None = None) -> None:
        """Clip per unit, sum, add noise, scale; one mechanism counted. Without a forward pass (an empty
        Poisson sample) the gradient is the noise alone."""
        rows = [p.grad_sample for p in self.params if getattr(p, "grad_sample", None) is not None]
        clip, std = self.plan.clip, self.plan.noise_multiplier * self.plan.clip
        if rows:
            n = rows[0].shape[0]
            flat = [g.reshape(n, -1) for g in rows]
            if groups is not None:
                # Sum each group's rows: its gradient is then one unit, clipped as a whole.
                _, index = torch.unique(groups, return_inverse=True)
                count = int(index.max()) + 1
                flat = [torch.zeros(count, f.shape[1], dtype=f.dtype).index_add_(0, index, f) for f in flat]
            norms = torch.sqrt(sum((f * f).sum(dim=1) for f in flat))
            factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
            clipped = [(factor @ f).reshape(p.shape) for f, p in zip(flat, self.params, strict=True)]
        else:
            clipped = [torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, clipped, strict=True):
            noise = torch.normal(0.0, std, p.shape, generator=self.generator)
            p.grad = (g + noise) / self.expected_units
            p.grad_sample = None
        self.accountant.steps += 1

    def close(self) -> None:
        self.grad_sample._close()
