"""The simulated carrier: many peers in one process, an in-memory network and a virtual clock.

Each peer runs the very algorithm coroutine that ``p2pser peer`` runs (``p2pser.exchange.algorithms``), and
each received message goes through the same ``Mailbox`` as in deployment; only moving bytes and keeping
time differ. A discrete-event loop advances a virtual clock: local training costs ``steps x
seconds-per-step`` of the peer, a message arrives after a sampled link delay unless it is dropped, cut by a
partition, or addressed to a crashed peer. Messages are encoded and decoded with the wire codec, so bytes
are counted exactly as on the wire and every check of a real peer applies.

Ties on the clock are broken by a sequence number, so the same seed gives the same run, bit for bit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from p2pser.carriers import SEND_QUEUE_LIMIT
from p2pser.carriers.faults import NEVER_STARTED, FaultPlan
from p2pser.carriers.mailbox import Mailbox
from p2pser.config import RunConfig
from p2pser.exchange import algorithms
from p2pser.exchange.checkpoint import Checkpointer
from p2pser.exchange.effects import Compute, Drain, Gather, Record, Send
from p2pser.exchange.peer import Peer
from p2pser.exchange.topology import Topology
from p2pser.report.metrics_log import MetricsWriter
from p2pser.report.run_folder import METRICS, peer_dir

log = logging.getLogger(__name__)


@dataclass
class _SimPeer:
    peer: Peer
    mailbox: Mailbox
    algorithm: Any
    checkpointer: Checkpointer
    epoch: int = 0  # bumped on crash: events scheduled for an earlier life are ignored
    alive: bool = True
    waiting: Gather | None = None
    round: int = -1
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: int = 0
    done: bool = False
    rejoin_scheduled: bool = False


def _frame_bytes(frames: list) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class Simulator:
    def __init__(self, peers: list[Peer], topology: Topology, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, progress: bool = False,
                 on_record: Callable[[int, dict], None] | None = None) -> None:
        """``on_record(peer, row)`` is told of every metrics row as it is recorded (measurements across
        peers that only a simulation can make, such as the average model per round)."""
        self.on_record = on_record
        self.topology = topology
        self.cfg = cfg
        self.faults = faults
        self.placement = algorithms.spec_of(cfg.algorithm).placement(topology)
        self.show_progress = progress
        self.now = 0.0
        self.rng = np.random.default_rng([cfg.seed, 23])
        self.step_seconds = faults.step_seconds(len(peers), cfg.seed)
        self.side = faults.cut(len(peers))
        self.outages = {o.peer: o for o in faults.churn}
        self._queue: list[tuple[float, int, int, int, str, Any]] = []
        self._seq = itertools.count()
        self.sim: list[_SimPeer] = []
        for p in peers:
            folder = peer_dir(out_dir, p.id)
            folder.mkdir(parents=True, exist_ok=True)
            # Checkpoints are real files, as in deployment, so a simulated restart loses exactly what a real
            # one would: the rounds since the last checkpoint. No fsync: a simulated crash is not an OS crash.
            # Only a peer that the fault plan crashes is ever restored, so only such a peer writes them during
            # the run (writing every peer's every few rounds was most of the file work of a run); every peer
            # leaves its final checkpoint at exit (``simulate_run``), as a real peer does.
            churned = p.id in self.outages
            checkpointer = Checkpointer(p, folder, cfg.checkpoint_every if churned else 0, durable=False)
            if churned:
                checkpointer.save()
            self.sim.append(_SimPeer(
                peer=p, mailbox=Mailbox(p, MetricsWriter(folder / METRICS), checkpointer=checkpointer),
                algorithm=algorithms.start(p, **self.placement), checkpointer=checkpointer,
                alive=not self._absent_from_start(p.id),
            ))
        # Messages queued towards a crashed peer, per (sender, receiver): like a real sender's socket queue,
        # it holds SEND_QUEUE_LIMIT of them; further sends are dropped.
        self._stranded: dict[tuple[int, int], int] = {}

    def _absent_from_start(self, i: int) -> bool:
        outage = self.outages.get(i)
        return outage is not None and outage.start == NEVER_STARTED

    def inject(self, at: float, to: int, sender: int, frames: list) -> None:
        """Deliver ``frames`` to peer ``to`` at virtual time ``at`` as if peer ``sender`` sent them: hostile
        or malformed input in a simulation, handled exactly as a real peer handles it."""
        self._schedule(at, to, "deliver", (sender, frames))

    # -- event queue -----------------------------------------------------------------------------------
    def _schedule(self, at: float, peer: int, kind: str, payload: Any = None) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), peer, self.sim[peer].epoch, kind, payload))

    def run(self) -> None:
        for i, s in enumerate(self.sim):
            if s.alive:
                self._schedule(0.0, i, "resume")
        self._progress = tqdm(total=len(self.sim) * algorithms.schedule_length(self.cfg), desc="peer rounds", unit="round",
                              disable=not self.show_progress, leave=False)
        while self._queue:
            at, _, i, epoch, kind, payload = heapq.heappop(self._queue)
            s = self.sim[i]
            if (epoch != s.epoch and kind != "rejoin") or (kind == "timeout" and s.waiting is not payload):
                continue  # an event of an earlier life, or a deadline whose wait already ended
            self.now = at
            if kind == "resume":
                self._advance(i, payload)
            elif kind == "deliver":
                self._deliver(i, payload)
            elif kind == "timeout":
                self._resolve_gather(i)
            elif kind == "rejoin":
                self._rejoin(i, payload)
        self._progress.close()
        for s in self.sim:
            s.mailbox.metrics.close()

    # -- carrying out effects --------------------------------------------------------------------------
    def _advance(self, i: int, value: Any) -> None:
        s = self.sim[i]
        while True:
            try:
                effect = s.algorithm.send(value)
            except StopIteration:
                s.done = True
                return
            if isinstance(effect, Compute):
                self._schedule(self.now + effect.steps * self.step_seconds[i], i, "resume")
                return
            if isinstance(effect, Send):
                self._send(i, effect)
                value = None
            elif isinstance(effect, Gather):
                s.mailbox.begin_gather(effect, self.now)
                s.waiting = effect
                if not s.mailbox.complete(effect):
                    self._schedule(self.now + effect.timeout, i, "timeout", effect)
                    return
                value = self._take(i)
            elif isinstance(effect, Drain):
                value = s.mailbox.drain()
            elif isinstance(effect, Record):
                value = self._record(i, effect.row)
                if value is None:  # the peer crashed at the end of this round
                    return
            else:
                raise TypeError(f"unknown effect {effect!r}")

    def _send(self, i: int, effect: Send) -> None:
        """As the real transport counts: ``bytes_sent`` for what entered the network, ``dropped`` for what
        never did (an injected loss or partition, or a full queue towards a crashed peer)."""
        s = self.sim[i]
        size = _frame_bytes(effect.frames)
        for to in effect.to:
            dest = self.sim[to]
            lost = self.faults.drop > 0 and self.rng.random() < self.faults.drop
            if lost or self._partitioned(i, to):
                s.dropped += 1
            elif not dest.alive:
                queued = self._stranded.get((i, to), 0)
                if queued < SEND_QUEUE_LIMIT:
                    self._stranded[(i, to)] = queued + 1
                    s.bytes_sent += size
                else:
                    s.dropped += 1
            else:
                s.bytes_sent += size
                self._schedule(self.now + self.faults.delay.sample(self.rng), to, "deliver", (i, effect.frames))

    def _partitioned(self, a: int, b: int) -> bool:
        window = self.faults.partition
        if window is None or self.side[a] == self.side[b]:
            return False
        current = max(self.sim[a].round, 0)
        return window[0] <= current < window[1]

    def _deliver(self, i: int, item: tuple[int, list]) -> None:
        s = self.sim[i]
        if not s.alive:
            return
        sender, frames = item
        s.bytes_received += _frame_bytes(frames)
        reply = s.mailbox.receive(sender, frames, self.now)
        if reply is not None:
            self._send(i, Send((sender,), reply))
        if s.waiting is not None and s.mailbox.complete(s.waiting):
            self._resolve_gather(i)

    def _take(self, i: int):
        s = self.sim[i]
        gather, s.waiting = s.waiting, None
        return s.mailbox.take(gather)

    def _resolve_gather(self, i: int) -> None:
        self._advance(i, self._take(i))

    def _record(self, i: int, row: dict) -> float | None:
        s = self.sim[i]
        s.round = row["round"]
        self._progress.update(1)
        s.mailbox.record(row, elapsed=self.now, bytes_sent=s.bytes_sent, bytes_received=s.bytes_received,
                         dropped=s.dropped)
        if self.on_record is not None:
            self.on_record(i, row)
        self._maybe_rejoin_others(s.round)
        outage = self.outages.get(i)
        if outage is not None and outage.start == s.round and s.alive:
            self._crash(i, outage)
            return None
        return self.now

    # -- churn -----------------------------------------------------------------------------------------
    def _crash(self, i: int, outage) -> None:
        s = self.sim[i]
        s.alive = False
        s.epoch += 1
        s.waiting = None
        s.algorithm.close()
        log.info("peer %d crashed after round %d (virtual t=%.3f)", i, outage.start, self.now)

    def _maybe_rejoin_others(self, round_: int) -> None:
        for o in self.outages.values():
            s = self.sim[o.peer]
            if not s.alive and o.end is not None and round_ + 1 >= o.end and not s.rejoin_scheduled:
                s.rejoin_scheduled = True
                self._schedule(self.now, o.peer, "rejoin", o.end)

    def _rejoin(self, i: int, others_round: int) -> None:
        """Restart as a real peer does: load the last checkpoint (what was learned since is lost), pull the
        neighbours' current models and rejoin at their round (``algorithms.catch_up``)."""
        s = self.sim[i]
        s.alive, s.done = True, False
        # What was queued for it is gone with the old process's connections (a real restarted peer receives
        # it and refuses it as stale, so it is never used either).
        self._stranded = {link: n for link, n in self._stranded.items() if link[1] != i}
        # A restarted process starts with an empty mailbox (its counters too) and appends to its metrics.
        s.mailbox = Mailbox(s.peer, s.mailbox.metrics, checkpointer=s.checkpointer)
        s.checkpointer.resume()
        s.algorithm = algorithms.start(s.peer, s.checkpointer.next_round, resumed=True, **self.placement)
        log.info("peer %d restarted from its round-%d checkpoint when the others reached round %d "
                 "(virtual t=%.3f)", i, s.checkpointer.next_round, others_round, self.now)
        self._advance(i, None)
