"""The effects an algorithm yields: everything that involves the network or the clock.

An algorithm is a generator over a ``Peer``. It trains and mixes by calling the peer directly, and yields
small *effect* requests for everything that involves the network or the clock:

- ``Compute(steps)``: local training just took ``steps`` minibatch steps (the simulator charges virtual time);
- ``Send(to, frames)``: send an encoded message to these neighbours;
- ``Gather(kind, round, expect, timeout)``: wait until all of ``expect`` delivered that round or the timeout
  passed; answered with a ``Gathered``;
- ``Drain()``: take whatever asynchronous models have arrived by now; answered with a list of messages;
- ``Record(row)``: a metrics row for this round; answered with the seconds elapsed since the run started.

``p2pser.carriers.realtime`` carries these out with ZeroMQ and the wall clock, ``p2pser.carriers.simulated``
with an in-memory network and a virtual clock. What both do beyond transport and clock (decoding, checks,
filing, pull answers, wait times, metric rows) lives once, in ``p2pser.carriers.mailbox``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pser.exchange.codec import Message


@dataclass(frozen=True)
class Compute:
    steps: int


@dataclass(frozen=True)
class Send:
    to: tuple[int, ...]
    frames: list


@dataclass(frozen=True)
class Gather:
    kind: str
    round: int
    expect: frozenset[int]
    timeout: float


@dataclass(frozen=True)
class Gathered:
    messages: dict[int, Message]
    heard: frozenset[int] = field(default_factory=frozenset)  # neighbours heard from since the last gather
    # Seconds from the gather's start until each message was filed (0: it was already there), on the
    # runner's clock: what p2pser.exchange.liveness learns deadlines from.
    waits: dict[int, float] = field(default_factory=dict)
    # The round the neighbours have reached (``Inbox.newest_seen``): far above our own round, it tells a
    # peer that it fell behind (a restart whose pull went unanswered, a partition, a stall).
    newest: int = -1


@dataclass(frozen=True)
class Drain:
    pass


@dataclass(frozen=True)
class Record:
    row: dict
