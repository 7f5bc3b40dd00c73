"""Everything a carrier does for one peer beyond moving bytes and keeping time, written once.

Both carriers, the real-time one (ZeroMQ, wall clock) and the simulator (memory, virtual clock), hand every
received message to a ``Mailbox`` and let it answer the algorithm's gathers, drains and records. So the
rules below hold in deployment and simulation alike, and their metric rows agree field by field (timing
fields aside; ``tests/test_carriers.py`` runs one scenario through both and compares):

- every message is decoded and checked against the local model (``Decoder``); the sender named in the
  header must be the peer the carrier received it from;
- a ``pull`` from a neighbour is answered with our current state, without waiting for our next round, as
  often as the pull rate allows (``PullLimiter``);
- models are filed by kind, round and sender (``Inbox``: stale, duplicate, far-ahead and foreign ones are
  refused); every refusal is counted in ``rejected`` and logged with the sender and the reason;
- a message filed while a gather is in progress records when it came, so the gather reports how long each
  neighbour made us wait (what ``p2pser.exchange.liveness`` learns deadlines from);
- each ``Record`` becomes one metrics row with the carrier's counters, and may trigger a checkpoint.
"""

from __future__ import annotations

import logging

from p2pser.exchange.algorithms import schedule_length, spec_of
from p2pser.exchange.checkpoint import Checkpointer
from p2pser.exchange.codec import CodecError, Decoder, Message
from p2pser.exchange.effects import Gather, Gathered
from p2pser.exchange.inbox import Inbox
from p2pser.exchange.peer import Peer
from p2pser.exchange.pulls import PullLimiter
from p2pser.report.metrics_log import MetricsWriter

log = logging.getLogger(__name__)


class Mailbox:
    def __init__(self, peer: Peer, metrics: MetricsWriter, *, checkpointer: Checkpointer | None = None) -> None:
        self.peer = peer
        spec = spec_of(peer.config.algorithm)
        self.synchronous = spec.synchronous
        # Models carry what the algorithm sends with them; answers to a pull carry the learner's state alone.
        cfg = peer.config
        templates = {"model": spec.message_template(peer.template)}
        if cfg.normalizer == "global":
            templates["stats"] = peer.learner.moments_template()
        # No samples or age beyond what an honest neighbour of this run can claim: a model's age grows by
        # local_steps a round at most and mixing takes the largest, so it never exceeds rounds x local_steps.
        # A learner whose state is more than fixed-shape numbers (tree ensembles) checks its content too.
        check = getattr(peer.learner, "check", None)
        checks = {kind: check for kind in ("model", "state")} if check is not None else None
        self.decoder = Decoder(peer.template, templates=templates, max_samples=peer.max_samples,
                               max_age=float(cfg.rounds * cfg.local_steps), checks=checks)
        self.pulls = PullLimiter(cfg.pull_rate)
        self.inbox = Inbox(peer.neighbours, rounds=schedule_length(peer.config))
        self.metrics = metrics
        self.checkpointer = checkpointer
        self.rejected = 0  # messages received and refused (undecodable, wrong sender, stale, foreign ...)
        self._heard: set[int] = set()  # neighbours heard from since the last gather
        self._gather_since: float | None = None  # clock reading when the gather in progress began
        self._filed: dict[tuple[str, int, int], float] = {}  # (kind, round, sender) -> when, this gather

    # -- receiving -------------------------------------------------------------------------------------
    def receive(self, claimed: int | None, frames: list, now: float) -> list | None:
        """Decode, check and file one message that the carrier got from peer ``claimed``.

        Returns the frames to send back to that peer (our state, answering its pull), or None.
        """
        try:
            message = self.decoder.decode(frames)
        except CodecError as exc:
            self._reject(claimed, str(exc))
            return None
        if claimed != message.sender:
            self._reject(claimed, f"header says sender {message.sender} but the connection is peer {claimed}")
            return None
        if message.sender in self.inbox.neighbours:
            self._heard.add(message.sender)
            if message.kind == "pull":
                if self.pulls.allow(message.sender, now):
                    return self.peer.answer_pull()
                self._reject(claimed, f"pull from {message.sender} not answered: more than {self.pulls.burst} in "
                             f"a row, or more than {self.pulls.rate:g} a second", logging.INFO)
                return None
        reason = self.inbox.add(message, synchronous=self.synchronous)
        if reason is not None:
            # Late or duplicate models are ordinary in a lossy network: counted, logged quietly.
            self._reject(claimed, reason, logging.INFO)
        elif self._gather_since is not None:  # filed outside a gather: the next one finds it, a wait of 0
            self._filed[(message.kind, message.round, message.sender)] = now
        return None

    def _reject(self, claimed: int | None, reason: str, level: int = logging.WARNING) -> None:
        self.rejected += 1
        log.log(level, "peer %d: rejected a message from %s: %s", self.peer.id, claimed, reason)

    # -- answering the algorithm ----------------------------------------------------------------------
    def begin_gather(self, gather: Gather, now: float) -> None:
        if gather.kind == "state":
            self.inbox.await_states(gather.expect)
        self._gather_since = now
        self._filed = {}

    def complete(self, gather: Gather) -> bool:
        """True when every expected sender delivered (the gather need not wait any longer)."""
        return self.inbox.has_all(gather.kind, gather.round, gather.expect)

    def take(self, gather: Gather) -> Gathered:
        """End the gather: what arrived for it, who was heard, and how long each sender made us wait."""
        since = self._gather_since if self._gather_since is not None else 0.0
        filed, self._filed, self._gather_since = self._filed, {}, None
        heard, self._heard = frozenset(self._heard), set()
        messages = self.inbox.take(gather.kind, gather.round)
        waits = {s: max(filed.get((m.kind, m.round, s), since) - since, 0.0) for s, m in messages.items()}
        return Gathered(messages, heard, waits, self.inbox.newest_seen)

    def drain(self) -> list[Message]:
        return self.inbox.drain()

    def record(self, row: dict, *, elapsed: float, bytes_sent: int, bytes_received: int, dropped: int) -> None:
        """Write the round's metrics row with the carrier's counters; checkpoint when one is due.

        ``dropped`` counts messages this peer sent that never entered the network (a full queue towards a
        dead neighbour; in simulation also the injected losses, partitions and crashed receivers).
        """
        self.metrics.write(row | {"time": round(elapsed, 6), "bytes_sent": bytes_sent,
                                  "bytes_received": bytes_received, "rejected": self.rejected, "dropped": dropped})
        if self.checkpointer is not None:
            self.checkpointer.after_round(row["round"])
