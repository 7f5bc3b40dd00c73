"""The simulator's learners in worker processes: one process per core, each holding a share of the peers.

The simulator's event loop, the network, every mailbox and every algorithm coroutine stay in the main
process, in the same order as with one process; only the learners (model, optimiser, data) move. A peer's
learner is replaced by a ``RemoteLearner`` that forwards each ``Learner`` call to the worker holding the
real one (built there by the very ``build_peer`` of a real peer process). A worker answers its calls in
the order they were made, so each learner sees exactly the calls, arguments and order it sees in one
process, and computes bit for bit the same (torch pinned to one thread in every process): the same seed
gives the same metrics with any number of workers.

What runs in parallel is training: ``train`` returns at once with a pending loss (``float()`` waits for
it), so while one peer trains in one worker the event loop goes on to the next peer, whose training goes
to the other worker. A synchronous round, where every peer trains at the same virtual time, keeps all
workers busy. Every other call waits for its answer (most are cheap; evaluation is pipelined behind the
other worker's training). Peers are dealt out round-robin (peer ``i`` to worker ``i % n``), so consecutive
peers alternate workers.

Workers are forked after the features are loaded, so they share them without copying.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle  # only between the simulator and the workers it forked (a Pipe), never network bytes
import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

from p2pser.errors import UserError

log = logging.getLogger(__name__)

# Learner attributes that never change after construction: fetched once.
_CONSTANT = ("task", "samples", "template")
# Calls whose answer the caller does not need at once (they change the learner and return nothing, or
# return a loss that is only read when the round's metrics row is written): sent without waiting.
_DEFERRED = ("train", "load", "mix", "adopt_mix", "advance_to", "adopt_moments", "restore")


# The Learner protocol's other methods (known to be methods: no round trip to find out).
_METHODS = ("step_size", "evaluate", "snapshot", "outgoing", "moments", "moments_template", "checkpoint_state",
            "identity", "save", "privacy")
METHOD = "<method>"  # what a worker answers when the attribute read is a method
MISSING = "<missing>"  # ... and when the learner has no such attribute (optional ones: getattr's default)


class WorkerError(RuntimeError):
    """A learner call failed in a worker process (the worker's traceback is in the message)."""


class Pending:
    """A result that a worker will send: ``float()`` (or ``result()``) waits for it."""

    __slots__ = ("_done", "_error", "_pool", "_value", "_worker")

    def __init__(self, pool: WorkerPool, worker: int) -> None:
        self._pool, self._worker = pool, worker
        self._done, self._value, self._error = False, None, None

    def _set(self, ok: bool, value: Any) -> None:
        self._done = True
        if ok:
            self._value = value
        else:
            self._error = value

    def result(self) -> Any:
        if not self._done:
            self._pool._wait(self._worker, self)
        if self._error is not None:
            raise WorkerError(self._error)
        return self._value

    def __float__(self) -> float:
        return float(self.result())


def _shortcuts(learner: Any) -> dict[str, bool]:
    """What the main process may do without asking the worker, for a plain ``TorchLearner`` (not wrapped):

    - ``plain_outgoing``: it sends its state as it is (no round trip to learn what it sends);
    - ``plain_mix``: its ``mix`` is the rule's mix then ``adopt_mix``, so the main process, which holds the
      neighbours' models, mixes and sends the worker one state instead of its own and every neighbour's
      (7 copies of 1.67 M parameters through the pipe a round for an ``mlp`` peer with 6 neighbours);
    - ``no_privacy``: it keeps no privacy account (its metrics rows have no DP fields);
    - ``averageable``: its state is a point of one parameter space (``Learner``).

    Without them every round paid three round trips, each waiting for the worker's queue (other peers'
    training included), and seven model copies through the pipe."""
    from p2pser.learn.learner import TorchLearner

    def same(name: str) -> bool:
        return getattr(type(learner), name, None) is getattr(TorchLearner, name)

    return {"plain_outgoing": same("outgoing"),
            "plain_mix": same("mix") and same("adopt_mix"),
            "no_privacy": same("privacy") and getattr(getattr(learner, "trainer", None), "dp", 0) is None,
            "averageable": getattr(learner, "averageable", True)}


def _serve(conn, build: Callable[[int], Any], peers: list[int]) -> None:
    """A worker's loop: build its learners, then answer (peer, name, args, kwargs) calls in order."""
    from p2pser.runtime import pin_threads

    pin_threads(1)
    learners: dict[int, Any] = {}
    try:
        for i in peers:
            learners[i] = build(i)
        conn.send((True, {i: {k: getattr(lr, k) for k in _CONSTANT} | _shortcuts(lr) for i, lr in learners.items()}))
    except UserError as exc:  # a user's mistake (a peer without usable audio): the same one line
        conn.send((False, exc))
        return
    except BaseException:  # noqa: BLE001 -- reported to the main process, which raises it
        conn.send((False, traceback.format_exc()))
        return
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            conn.send((True, None))
            return
        peer, name, args, kwargs = request
        try:
            if args is None:  # reading an attribute: a method does not cross processes, only the fact
                attr = getattr(learners[peer], name, MISSING)
                conn.send((True, METHOD if callable(attr) else attr))
            else:
                conn.send((True, getattr(learners[peer], name)(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 -- a failing call is the caller's error, raised there
            conn.send((False, traceback.format_exc()))


class WorkerPool:
    """``n`` forked processes holding the learners ``build(i)`` of peers ``0 .. n_peers - 1``."""

    def __init__(self, n: int, n_peers: int, build: Callable[[int], Any]) -> None:
        context = multiprocessing.get_context("fork")
        self.n = max(1, min(n, n_peers))
        self.owner = [i % self.n for i in range(n_peers)]
        self._conns, self._procs = [], []
        self._pending: list[deque[Pending]] = [deque() for _ in range(self.n)]
        for w in range(self.n):
            here, there = context.Pipe()
            proc = context.Process(target=_serve, args=(there, build, [i for i in range(n_peers) if i % self.n == w]),
                                   name=f"p2pser-learners-{w}", daemon=True)
            proc.start()
            there.close()
            self._conns.append(here)
            self._procs.append(proc)
        self.constants: dict[int, dict[str, Any]] = {}
        try:
            for w, conn in enumerate(self._conns):
                ok, value = conn.recv()
                if not ok:
                    raise value if isinstance(value, UserError) else WorkerError(value)
                self.constants.update(value)
        except BaseException:
            self.close()
            raise
        # A thread per direction and worker moves the bytes, so that neither side ever blocks on a full pipe
        # (a model's parameters are larger than a pipe's buffer): the event loop goes on while a busy worker
        # has not yet read what it was sent, and a worker's answers are read as soon as they are written.
        self._outbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(self.n)]
        self._inbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(self.n)]
        self._threads = []
        for w in range(self.n):
            for target in (self._write, self._read):
                thread = threading.Thread(target=target, args=(w,), daemon=True, name=f"p2pser-pipe-{w}")
                thread.start()
                self._threads.append(thread)

    def _write(self, w: int) -> None:
        conn, outbox = self._conns[w], self._outbox[w]
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except OSError:
                return

    def _read(self, w: int) -> None:
        conn, inbox = self._conns[w], self._inbox[w]
        while True:
            try:
                inbox.put(conn.recv_bytes())
            except (EOFError, OSError):
                inbox.put(None)
                return

    def call(self, peer: int, name: str, args: tuple | None = (), kwargs: dict | None = None, *,
             wait: bool = True) -> Any:
        """Call ``learner.name(*args, **kwargs)`` of ``peer`` (``args=None``: read the attribute)."""
        w = self.owner[peer]
        future = Pending(self, w)
        self._outbox[w].put(ForkingPickler.dumps((peer, name, args, kwargs or {})))
        self._pending[w].append(future)
        return future.result() if wait else future

    def _wait(self, w: int, future: Pending) -> None:
        while not future._done:
            data = self._inbox[w].get()
            if data is None:
                raise WorkerError(f"learner worker {w} (pid {self._procs[w].pid}) exited unexpectedly")
            ok, value = pickle.loads(data)
            done = self._pending[w].popleft()
            done._set(ok, value)
            if not ok:  # raised now even if it was a deferred call nobody waits for
                raise WorkerError(value)

    def sync(self) -> None:
        """Wait for every call made so far (surfacing a deferred call's error)."""
        for w in range(self.n):
            while self._pending[w]:
                self._pending[w][-1].result()

    def close(self) -> None:
        threads = getattr(self, "_threads", [])
        for w, conn in enumerate(self._conns):
            self._pending[w].clear()
            if threads:
                self._outbox[w].put(ForkingPickler.dumps(None))
                self._outbox[w].put(None)  # ends the writer thread
            else:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for thread in threads:
            thread.join(timeout=30)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs, self._threads = [], [], []


class RemoteLearner:
    """A ``Learner`` whose real object lives in a worker process of ``pool``."""

    def __init__(self, pool: WorkerPool, peer: int) -> None:
        self._pool, self._peer = pool, peer
        constants = dict(pool.constants[peer])
        if constants.pop("plain_outgoing"):
            self.outgoing = _as_is
        if constants.pop("plain_mix"):
            self.mix = self._mix_here
        if constants.pop("no_privacy"):
            self.privacy = dict
        for key, value in constants.items():
            setattr(self, key, value)

    def _mix_here(self, own, own_weight: float, others, rule) -> None:
        """``TorchLearner.mix`` with the rule's arithmetic in this process (the same function on the same
        arrays, so the same result): only the mixed state goes to the worker."""
        mixed = rule.mix(own, own_weight, others) if others else None
        self._pool.call(self._peer, "adopt_mix", (mixed,), wait=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _DEFERRED:
            return lambda *args, **kwargs: self._pool.call(self._peer, name, args, kwargs, wait=False)
        if name in _METHODS:
            return lambda *args, **kwargs: self._pool.call(self._peer, name, args, kwargs)
        value = self._pool.call(self._peer, name, None)
        if value == METHOD:
            return lambda *args, **kwargs: self._pool.call(self._peer, name, args, kwargs)
        if value == MISSING:
            raise AttributeError(name)
        return value


def _as_is(state, round_):
    return state


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
