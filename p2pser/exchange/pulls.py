"""How often a neighbour may make us answer a pull: a token bucket per neighbour.

Answering a pull costs a snapshot of our parameters and a full model on the wire, and a pull costs its
sender one empty header: without a limit, a neighbour could keep us busy copying and sending. An honest
peer pulls only to catch up: ``algorithms.catch_up`` sends at most ``PULL_TRIES`` (4) pulls, spread over one
``round_timeout``, and catches up again only after falling several rounds behind. So a burst of 4 answers
and then one every ``1 / rate`` seconds never refuses an honest catch-up, while a flood gets one answer
every few seconds.

Pure bookkeeping: the caller passes the time (wall clock in a real peer, virtual time in the simulator), so
the same pulls at the same times get the same answers.
"""

from __future__ import annotations

BURST = 4  # algorithms.PULL_TRIES: one catch-up's pulls, all answered


class PullLimiter:
    """``allow(sender, now)``: answer this pull? A token bucket per sender holding at most ``burst`` answers,
    refilled at ``rate`` per second (``RunConfig.pull_rate``); ``rate = 0`` answers every pull."""

    def __init__(self, rate: float, burst: int = BURST) -> None:
        if rate < 0 or burst < 1:
            raise ValueError(f"a pull limit needs rate >= 0 and burst >= 1, got rate {rate}, burst {burst}")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[int, tuple[float, float]] = {}  # sender -> (answers left, when counted)

    def allow(self, sender: int, now: float) -> bool:
        if self.rate == 0:
            return True
        left, then = self._buckets.get(sender, (float(self.burst), now))
        # A clock that went backwards (it should not) refills nothing, now or later.
        left = min(float(self.burst), left + max(now - then, 0.0) * self.rate)
        allowed = left >= 1.0
        self._buckets[sender] = (left - 1.0 if allowed else left, max(now, then))
        return allowed
