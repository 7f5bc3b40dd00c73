"""Carry out an algorithm's effects for real: ZeroMQ transport, wall clock, metrics on disk.

Every received message is decoded and checked against the local model before it can be used; a message
that fails any check is dropped with one logged line naming the sender and the reason, and training goes
on. No wait is unbounded: every ``Gather`` has a deadline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pser.exchange.algorithms import Algorithm, Compute, Drain, Gather, Gathered, Record, Send
from p2pser.exchange.codec import CodecError, Decoder
from p2pser.exchange.inbox import Inbox
from p2pser.exchange.pulls import PullLimiter
from p2pser.learn.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class MetricsWriter:
    """Append-only JSONL, flushed per row so a crash loses at most the row being written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the whole run

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class RealtimeRunner:
    def __init__(self, peer_id: int, neighbours, transport, decoder: Decoder, metrics: MetricsWriter,
                 *, synchronous: bool, answer_pull: Callable[[], list] | None = None,
                 checkpointer: Checkpointer | None = None, rounds: int | None = None,
                 pulls: PullLimiter | None = None) -> None:
        """``answer_pull`` gives the frames to send to a neighbour that pulls our current parameters, as
        often as ``pulls`` allows (default: always); ``checkpointer`` is told of every finished round;
        ``rounds`` is the schedule's length."""
        self.peer_id = peer_id
        self.answer_pull = answer_pull
        self.pulls = pulls or PullLimiter(0)
        self.checkpointer = checkpointer
        self.transport = transport
        self.decoder = decoder
        self.metrics = metrics
        self.synchronous = synchronous
        self.inbox = Inbox(neighbours, rounds=rounds)
        self.rejected = 0
        self._heard: set[int] = set()
        self._filed: dict[tuple[str, int, int], float] = {}  # (kind, round, sender) -> when filed, this gather
        self._t0 = time.monotonic()

    def run(self, algorithm: Algorithm) -> None:
        value: Any = None
        while True:
            try:
                effect = algorithm.send(value)
            except StopIteration:
                return
            value = self._carry_out(effect)

    def _carry_out(self, effect: Any) -> Any:
        if isinstance(effect, Compute):
            return None
        if isinstance(effect, Send):
            for to in effect.to:
                self.transport.send(to, effect.frames)
            return None
        if isinstance(effect, Gather):
            return self._gather(effect)
        if isinstance(effect, Drain):
            while self._receive(0.0):
                pass
            return self.inbox.drain()
        if isinstance(effect, Record):
            elapsed = time.monotonic() - self._t0
            self.metrics.write(
                effect.row
                | {
                    "time": round(elapsed, 3),
                    "bytes_sent": self.transport.bytes_sent,
                    "bytes_received": self.transport.bytes_received,
                    "rejected": self.rejected,
                }
            )
            if self.checkpointer is not None:
                self.checkpointer.after_round(effect.row["round"])
            return elapsed
        raise TypeError(f"unknown effect {effect!r}")

    def _gather(self, effect: Gather) -> Gathered:
        if effect.kind == "state":
            self.inbox.await_states(effect.expect)
        start = time.monotonic()
        self._filed.clear()  # a message filed before this gather began waited 0 s for it
        deadline = start + effect.timeout
        while not self.inbox.has_all(effect.kind, effect.round, effect.expect):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._receive(remaining)
        while self._receive(0.0):  # take what is already queued too: a late-but-present model is useful
            pass
        heard, self._heard = frozenset(self._heard), set()
        messages = self.inbox.take(effect.kind, effect.round)
        waits = {s: max(self._filed.get((m.kind, m.round, s), start) - start, 0.0) for s, m in messages.items()}
        return Gathered(messages, heard, waits, self.inbox.newest_seen)

    def _receive(self, timeout: float) -> bool:
        """Receive and file at most one message; False when nothing arrived within ``timeout``."""
        item = self.transport.recv(timeout)
        if item is None:
            return False
        claimed, frames = item
        try:
            message = self.decoder.decode(frames)
        except CodecError as exc:
            self._reject(claimed, str(exc))
            return True
        if claimed != message.sender:
            self._reject(claimed, f"header says sender {message.sender} but the connection is peer {claimed}")
            return True
        if message.sender in self.inbox.neighbours:
            self._heard.add(message.sender)
            if message.kind == "pull" and self.answer_pull is not None:
                if self.pulls.allow(message.sender, time.monotonic()):
                    self.transport.send(message.sender, self.answer_pull())
                else:
                    self._reject(claimed, f"pull from {message.sender} not answered: more than {self.pulls.burst} "
                                 f"in a row, or more than {self.pulls.rate:g} a second", logging.INFO)
                return True
        reason = self.inbox.add(message, synchronous=self.synchronous)
        if reason is not None:
            # Late or duplicate models are ordinary in a lossy network: counted, logged quietly.
            self._reject(claimed, reason, logging.INFO)
        elif self.synchronous:
            self._filed[(message.kind, message.round, message.sender)] = time.monotonic()
        return True

    def _reject(self, claimed: int | None, reason: str, level: int = logging.WARNING) -> None:
        self.rejected += 1
        log.log(level, "peer %d: rejected a message from %s: %s", self.peer_id, claimed, reason)
