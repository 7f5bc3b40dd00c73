"""Carry out an algorithm's effects for real: a ZeroMQ transport and the wall clock.

Only moving bytes and keeping time happen here; checking, filing, pull answers, wait times and metric rows
are the peer's ``Mailbox`` (shared with the simulator). No wait is unbounded: every ``Gather`` has a
deadline.
"""

from __future__ import annotations

import time
from typing import Any

from p2pser.carriers.mailbox import Mailbox
from p2pser.exchange.algorithms import Algorithm
from p2pser.exchange.effects import Compute, Drain, Gather, Gathered, Record, Send


class RealtimeRunner:
    def __init__(self, mailbox: Mailbox, transport) -> None:
        self.mailbox = mailbox
        self.transport = transport
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
            return self.mailbox.drain()
        if isinstance(effect, Record):
            elapsed = time.monotonic() - self._t0
            t = self.transport
            self.mailbox.record(effect.row, elapsed=elapsed, bytes_sent=t.bytes_sent,
                                bytes_received=t.bytes_received, dropped=t.messages_dropped)
            return elapsed
        raise TypeError(f"unknown effect {effect!r}")

    def _gather(self, effect: Gather) -> Gathered:
        start = time.monotonic()
        self.mailbox.begin_gather(effect, start)
        deadline = start + effect.timeout
        while not self.mailbox.complete(effect):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._receive(remaining)
        while self._receive(0.0):  # take what is already queued too: a late-but-present model is useful
            pass
        return self.mailbox.take(effect)

    def _receive(self, timeout: float) -> bool:
        """Receive and hand over at most one message; False when nothing arrived within ``timeout``."""
        item = self.transport.recv(timeout)
        if item is None:
            return False
        claimed, frames = item
        reply = self.mailbox.receive(claimed, frames, time.monotonic())
        if reply is not None:
            self.transport.send(claimed, reply)
        return True
