"""How long a synchronous round waits for its neighbours: deadlines learned from observed latency.

A peer that waits the full ``round_timeout`` for a neighbour that has died loses that whole time (and so do
the peers waiting for it). ``Deadlines`` learns, per neighbour, how long its model usually takes to arrive
once we are ready for it (the *wait*), and ends a gather after a few normal round times instead:

- per neighbour, the TCP retransmission-timer estimator (Jacobson/Karels, RFC 6298): a smoothed wait ``s``
  and a smoothed deviation ``v``; the neighbour's own deadline is ``s + 4 v``;
- a floor under every deadline: ``FLOOR_S``, ``BUSY_MARGIN`` x our own work in the last round (training,
  evaluation: the longer it took, the further apart the neighbours may have drifted), and ``WAIT_MARGIN`` x
  the longest wait in the last ``window`` rounds (the spikes after evaluation and checkpoint rounds, and
  their echoes from peers further away, recur every cycle; a per-neighbour average forgets them in between);
- a neighbour that missed its deadline doubles its own deadline (Karn's backoff) until it is on time again;
- ``round_timeout`` on top of all: no wait is ever longer than in fixed mode, and it is the deadline whenever
  something is not yet known: during the first ``window`` rounds (see below), and for a neighbour never timed.

Why wait ``window`` rounds before adapting: lateness travels through a synchronous graph one hop per round.
A peer that started late, or a straggler, delays its neighbours at once, their neighbours a round later, and
a peer d hops away only at round d-1; until then that peer's own timings look fast and say nothing of the
wave coming (no message can warn it: news travels as fast as the wave). Cut short, such a wait would drop a
live neighbour, and a peer that drops all of them runs on alone. After ``window`` rounds every such wave has
crossed any graph of diameter below ``window`` - every topology we ship, up to 20 peers, and all but the
ring at 64 - and rounds run in lock step at the pace of the slowest peer.

What a crash still costs: the dead peer's neighbours wait one deadline for it, which makes their next models
one deadline late for their own neighbours, whose deadlines are as long: these may drop them for a round
(and, if all their neighbours were late, go a round or two alone). The lateness ripples once through the
graph, each peer losing about one deadline. Fixed deadlines ripple the same way, with the whole timeout.
Telling a late neighbour from a dead one at that moment needs a sign of life that a model exchange cannot
give (a heartbeat).

Why the floor does most of the work in dpsgd: rounds run in lock step, so waits are differences between
peers doing the same work, mostly tiny, with spikes at known places. The per-neighbour estimate matters
when a neighbour is steadily later than we are (a straggler seen by a fast peer).

The clock is whatever the runner answers ``Record`` with: wall seconds in a real peer, virtual seconds in the
simulator, so both take the same decisions on the same timings.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

# Sized on the worst fault-free run we know: `p2pser launch` of 20 processes on 2 cores shared with other
# work (load average 22; RAVDESS fold 1, exponential-20, svm, 4 local steps, evaluation every 5 rounds).
# There rounds took 0.3-1.5 s and evaluation rounds 5-12 s. After the warm-up, waits were at most 0.83 s
# except in the round after an evaluation (up to 3.6 s: some peers evaluated slower), i.e. at most 0.57x
# the evaluation round's own work (hence 3x). Scheduling stalls and fsync do not scale with anything: 3 s at
# least, 3.6x the worst such wait (0.83 s). Replayed on that run, no deadline came within 3.6x of its wait.
FLOOR_S = 3.0
BUSY_MARGIN = 3.0
WAIT_MARGIN = 2.0
MIN_WINDOW = 12  # rounds timed before adapting and kept in view: more than the diameter of a 20-peer ring
ALPHA, BETA, K = 1 / 8, 1 / 4, 4.0  # RFC 6298's gains and deviation multiplier
MAX_BACKOFF = 64.0


class WaitEstimate:
    """Smoothed wait and deviation of one neighbour (Jacobson/Karels), with Karn's backoff on a miss."""

    def __init__(self) -> None:
        self.mean: float | None = None
        self.dev = 0.0
        self.backoff = 1.0

    def observe(self, wait: float) -> None:
        if self.mean is None:
            self.mean, self.dev = wait, wait / 2
        else:
            self.dev = (1 - BETA) * self.dev + BETA * abs(self.mean - wait)
            self.mean = (1 - ALPHA) * self.mean + ALPHA * wait
        self.backoff = 1.0

    def missed(self) -> None:
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def deadline(self, floor: float) -> float | None:
        """Seconds to wait for this neighbour, or None before its first on-time arrival."""
        if self.mean is None:
            return None
        return self.backoff * max(floor, self.mean + K * self.dev)


class Deadlines:
    """Per-neighbour deadlines for the gathers of one algorithm run.

    Call ``timeout(expect)`` before a gather, ``observe(waits, missed)`` after it, and ``round_ended(t)``
    with the clock reading of each ``Record``. Waits seen before the first round ended are start-up (peers
    begin at different times), not latency, and are not learned from. Deadlines adapt once ``window``
    rounds have been timed; until then they are ``upper``.
    """

    def __init__(self, upper: float, *, adaptive: bool = True, window: int = MIN_WINDOW, owner: int = -1) -> None:
        self.upper = upper
        self.owner = owner  # the peer whose gathers these are, for the log
        self.adaptive = adaptive
        self.neighbours: dict[int, WaitEstimate] = {}
        self.rounds: deque[tuple[float, float]] = deque(maxlen=max(window, 1))  # (our work, longest wait)
        self._last_end: float | None = None
        self._wait = 0.0  # longest wait of this round's gather
        self._missed = False  # a deadline passed in this round: its length is no normal round time

    @classmethod
    def from_config(cls, cfg, owner: int = -1) -> Deadlines:
        """``cfg.liveness`` chooses adaptive or fixed; the window spans two evaluation and checkpoint
        periods too, so the longest regular round is always in view."""
        window = max(MIN_WINDOW, 2 * cfg.eval_every, 2 * cfg.checkpoint_every)
        return cls(cfg.round_timeout, adaptive=cfg.liveness == "adaptive", window=window, owner=owner)

    def floor(self) -> float | None:
        """The least any deadline may be, or None while fewer than ``window`` rounds have been timed."""
        if len(self.rounds) < (self.rounds.maxlen or 0):
            return None
        busy = self.rounds[-1][0]
        return max(FLOOR_S, BUSY_MARGIN * busy, WAIT_MARGIN * max(wait for _, wait in self.rounds))

    def timeout(self, expect: Iterable[int]) -> float:
        """Seconds the gather for ``expect`` may wait: the longest of their deadlines, at most ``upper``."""
        floor = self.floor()
        if not self.adaptive or floor is None:
            return self.upper
        longest = floor
        for j in expect:
            own = self.neighbours.get(j, WaitEstimate()).deadline(floor)
            if own is None:
                return self.upper
            longest = max(longest, own)
        return min(longest, self.upper)

    def observe(self, waits: Mapping[int, float], missed: Iterable[int] = ()) -> None:
        """Learn from one gather: the wait of each neighbour whose model arrived, and who missed it."""
        if self._last_end is None:
            return
        self._wait = max(waits.values(), default=0.0)
        for j, wait in waits.items():
            self.neighbours.setdefault(j, WaitEstimate()).observe(wait)
        for j in missed:
            self._missed = True
            estimate = self.neighbours.setdefault(j, WaitEstimate())
            estimate.missed()
            log.info("peer %d: neighbour %d missed its deadline; its next one is %gx as long", self.owner, j,
                     estimate.backoff)

    @staticmethod
    def row(timeout: float, waits: Mapping[int, float]) -> dict[str, float]:
        """Metrics of one gather: its deadline and the longest wait for a model that arrived (seconds)."""
        return {"deadline_s": round(timeout, 3), "wait_s": round(max(waits.values(), default=0.0), 3)}

    def round_ended(self, elapsed: float) -> None:
        """The clock at the end of a round (``Record``'s answer): times our work in the round that just
        ended (its length less the gather's wait), unless it waited out a deadline (that would stretch every
        later deadline by the time spent on the dead)."""
        if self._last_end is not None and not self._missed:
            self.rounds.append((max(elapsed - self._last_end - self._wait, 0.0), self._wait))
        self._last_end, self._missed, self._wait = elapsed, False, 0.0
