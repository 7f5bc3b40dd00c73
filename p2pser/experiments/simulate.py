"""``p2pser simulate``: many peers in one process, the same peer code, a virtual clock, faults on demand.

Each peer runs the very algorithm coroutine that ``p2pser peer`` runs (``p2pser.exchange.algorithms``); only
the carrying-out of its effects differs. Here a discrete-event loop advances a virtual clock: local training
costs ``steps x seconds-per-step`` of the peer, a message arrives after a sampled link delay unless it is
dropped, cut by a partition, or addressed to a crashed peer. Messages are encoded and decoded with the
wire codec, so bytes are counted exactly as on the wire and every check of a real peer applies.

Ties on the clock are broken by a sequence number, so the same seed gives the same run, bit for bit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from p2pser.carriers.faults import FaultPlan
from p2pser.carriers.realtime import MetricsWriter
from p2pser.config import RunConfig
from p2pser.deploy.peer_process import build_peer, hub_of, peer_dir, write_json_atomic
from p2pser.exchange import algorithms
from p2pser.exchange.algorithms import Compute, Drain, Gather, Gathered, Record, Send
from p2pser.exchange.attacks import attacking_peers
from p2pser.exchange.codec import CodecError, Decoder
from p2pser.exchange.inbox import Inbox
from p2pser.exchange.peer import Peer
from p2pser.exchange.pulls import PullLimiter
from p2pser.exchange.topology import Topology
from p2pser.learn.checkpoint import Checkpointer
from p2pser.partition.plan import Plan, extract_for, test_set

log = logging.getLogger(__name__)


@dataclass
class _SimPeer:
    peer: Peer
    inbox: Inbox
    decoder: Decoder
    metrics: MetricsWriter
    algorithm: Any
    checkpointer: Checkpointer
    epoch: int = 0  # bumped on crash: events scheduled for an earlier life are ignored
    alive: bool = True
    waiting: Gather | None = None
    round: int = -1
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: int = 0
    heard: set[int] = field(default_factory=set)
    waiting_since: float = 0.0  # virtual time the current gather began
    filed: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (kind, round, sender) -> when
    done: bool = False
    rejoin_scheduled: bool = False
    pulls: PullLimiter = field(default_factory=lambda: PullLimiter(0))


def _frame_bytes(frames: list) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class Simulator:
    def __init__(self, peers: list[Peer], topology: Topology, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, hub: int = 0, progress: bool = False) -> None:
        self.topology = topology
        self.cfg = cfg
        self.faults = faults
        self.hub = hub
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
            checkpointer = Checkpointer(p, folder, cfg.checkpoint_every, durable=False)
            checkpointer.save()
            self.sim.append(_SimPeer(
                peer=p, inbox=Inbox(p.neighbours, rounds=cfg.rounds), decoder=p.decoder(),
                metrics=MetricsWriter(folder / "metrics.jsonl"), algorithm=algorithms.start(p, hub=hub),
                checkpointer=checkpointer, pulls=PullLimiter(cfg.pull_rate),
            ))

    # -- event queue -----------------------------------------------------------------------------------
    def _schedule(self, at: float, peer: int, kind: str, payload: Any = None) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), peer, self.sim[peer].epoch, kind, payload))

    def run(self) -> None:
        for i in range(len(self.sim)):
            self._schedule(0.0, i, "resume")
        self._progress = tqdm(total=len(self.sim) * self.cfg.rounds, desc="peer rounds", unit="round",
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
            s.metrics.close()

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
                if effect.kind == "state":
                    s.inbox.await_states(effect.expect)
                s.waiting, s.waiting_since = effect, self.now
                if not s.inbox.has_all(effect.kind, effect.round, effect.expect):
                    self._schedule(self.now + effect.timeout, i, "timeout", effect)
                    return
                value = self._take(i, effect)
            elif isinstance(effect, Drain):
                value = s.inbox.drain()
            elif isinstance(effect, Record):
                value = self._record(i, effect.row)
                if value is None:  # the peer crashed at the end of this round
                    return
            else:
                raise TypeError(f"unknown effect {effect!r}")

    def _send(self, i: int, effect: Send) -> None:
        s = self.sim[i]
        size = _frame_bytes(effect.frames)
        for to in effect.to:
            s.bytes_sent += size
            dest = self.sim[to]
            lost = self.faults.drop > 0 and self.rng.random() < self.faults.drop
            if lost or self._partitioned(i, to) or not dest.alive:
                s.dropped += 1
                continue
            self._schedule(self.now + self.faults.delay.sample(self.rng), to, "deliver", effect.frames)

    def _partitioned(self, a: int, b: int) -> bool:
        window = self.faults.partition
        if window is None or self.side[a] == self.side[b]:
            return False
        current = max(self.sim[a].round, 0)
        return window[0] <= current < window[1]

    def _deliver(self, i: int, frames: list) -> None:
        s = self.sim[i]
        if not s.alive:
            return
        s.bytes_received += _frame_bytes(frames)
        try:
            message = s.decoder.decode(frames)
        except CodecError as exc:
            log.warning("peer %d: rejected a message: %s", i, exc)
            return
        s.heard.add(message.sender)
        if message.kind == "pull" and message.sender in s.inbox.neighbours:
            if s.pulls.allow(message.sender, self.now):
                self._send(i, Send((message.sender,), s.peer.answer_pull()))
            else:
                log.debug("peer %d: pull from %d not answered: over the pull rate", i, message.sender)
            return
        reason = s.inbox.add(message, synchronous=self.cfg.algorithm != "gossip")
        if reason is not None:
            log.debug("peer %d: refused a message: %s", i, reason)
        elif s.waiting is not None:  # filed outside a gather: the next one finds it there, a wait of 0
            s.filed[(message.kind, message.round, message.sender)] = self.now
        waiting = s.waiting
        if waiting is not None and s.inbox.has_all(waiting.kind, waiting.round, waiting.expect):
            self._resolve_gather(i)

    def _take(self, i: int, effect: Gather) -> Gathered:
        s = self.sim[i]
        s.waiting = None
        heard, s.heard = frozenset(s.heard), set()
        messages = s.inbox.take(effect.kind, effect.round)
        since, filed, s.filed = s.waiting_since, s.filed, {}
        waits = {j: filed.get((m.kind, m.round, j), since) - since for j, m in messages.items()}
        return Gathered(messages, heard, waits, s.inbox.newest_seen)

    def _resolve_gather(self, i: int) -> None:
        self._advance(i, self._take(i, self.sim[i].waiting))

    def _record(self, i: int, row: dict) -> float | None:
        s = self.sim[i]
        s.round = row["round"]
        self._progress.update(1)
        s.metrics.write(row | {"time": round(self.now, 6), "bytes_sent": s.bytes_sent,
                               "bytes_received": s.bytes_received, "dropped": s.dropped})
        s.checkpointer.after_round(s.round)
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
        s.inbox = Inbox(s.peer.neighbours, rounds=self.cfg.rounds)
        s.checkpointer.resume()
        s.algorithm = algorithms.start(s.peer, s.checkpointer.next_round, hub=self.hub, resumed=True)
        log.info("peer %d restarted from its round-%d checkpoint when the others reached round %d "
                 "(virtual t=%.3f)", i, s.checkpointer.next_round, others_round, self.now)
        self._advance(i, None)


def simulate_run(plan: Plan, topology: Topology, topology_name: str, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, features=None, row_of=None, progress: bool = False) -> dict:
    """One simulated run into ``out_dir``; ``features`` may be passed in to share them across a sweep."""
    from p2pser.report.summary import average_model_ua, summarize

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if features is None:
        needed = np.unique(np.concatenate([*plan.peers, plan.test]))
        features, row_of = extract_for(plan, needed, cfg, progress=False)
    hub = hub_of(topology) if cfg.algorithm == "fedavg" else 0
    test = test_set(features, row_of, plan)
    peers = [build_peer(plan, topology, k, cfg, features, row_of, test) for k in range(topology.n)]
    sim = Simulator(peers, topology, cfg, faults, out_dir, hub=hub, progress=progress)
    t0 = time.perf_counter()
    sim.run()
    loop_s = time.perf_counter() - t0
    training_s = sum(p.timings["train"] + p.timings["eval"] for p in peers)
    for p in peers:
        folder = peer_dir(out_dir, p.id)
        p.save_model(folder / "model.npz")
        write_json_atomic(folder / "normalizer.json", p.data.normalizer.to_dict())
        alive = sim.sim[p.id].alive
        if alive:
            sim.sim[p.id].checkpointer.save()  # as a real peer does at exit
        state = "done" if alive else "crashed"
        write_json_atomic(folder / "status.json", {"peer": p.id, "state": state})
    base = {
        "mode": "simulate", "algorithm": cfg.algorithm, "topology": topology_name, "model": cfg.model,
        "features": cfg.features, "fold": cfg.fold, "seed": cfg.seed, "crashed_peers": [],
        "virtual_time_s": round(sim.now, 3),
        # Share of the simulation's own time spent outside local training and evaluation: mixing,
        # encoding, decoding, the event loop and bookkeeping.
        "overhead_fraction": round(max(loop_s - training_s, 0.0) / max(loop_s, 1e-9), 4),
    }
    ua_avg = average_model_ua(out_dir, cfg.model, cfg.seed, test, plan.classes)
    return summarize(out_dir, base, wall_s=time.monotonic() - start, ua_average_model=ua_avg,
                     attackers=attacking_peers(cfg))
