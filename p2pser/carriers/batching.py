"""The simulator's peers trained together: ``train`` is deferred, and many peers' deferred training runs as one
vectorised step (``p2pser.learn.batched``) when any of them is next looked at.

The algorithm coroutines are unchanged: each peer calls ``learner.train`` and yields ``Compute``, exactly as
``p2pser peer`` does. Here ``train`` only queues the request and returns a pending loss (``float()`` reads
it, as with the learner worker processes of ``p2pser.carriers.workers``). The next time anything of a queued
learner is used (its parameters to send, its evaluation, a mix, a checkpoint, the loss itself), every queued
request is carried out at once (using a learner with nothing queued carries out nothing). In a synchronous round every peer queues its training before any of them
resumes (they all compute at the same virtual time), so the whole round's local steps run as one batch.

Each peer's training sees exactly the calls, arguments and learner state it would see unbatched (nothing of a
queued learner is read or changed before its request is carried out), so the only difference from
stepping peers one by one is the floating-point rounding of batched kernels (``p2pser.learn.batched``).
"""

from __future__ import annotations

from typing import Any

# Learner attributes that never change after construction: read without carrying out queued training.
_CONSTANT = ("task", "samples", "template", "averageable")


class PendingLoss:
    """A deferred ``train``'s loss: ``float()`` carries out the queued training if it has not run yet."""

    __slots__ = ("_batch", "value")

    def __init__(self, batch: PeerBatch) -> None:
        self._batch, self.value = batch, None

    def __float__(self) -> float:
        if self.value is None:
            self._batch.flush()
        return float(self.value)


class PeerBatch:
    """The queue of deferred training requests of the learners it wraps."""

    def __init__(self) -> None:
        self._queue: list[tuple[Any, int, Any, PendingLoss]] = []
        self._queued: set[int] = set()  # ids of the learners in the queue
        self.flushes = 0  # how many times queued requests were carried out (and how many requests in all)
        self.requests = 0

    def wrap(self, learner: Any) -> BatchedLearner:
        return BatchedLearner(learner, self)

    def defer(self, learner: Any, steps: int, correction: Any) -> PendingLoss:
        self.flush_for(learner)  # a second request of the same learner: the first must run first
        pending = PendingLoss(self)
        self._queue.append((learner, steps, correction, pending))
        self._queued.add(id(learner))
        return pending

    def flush_for(self, learner: Any) -> None:
        """Carry out the queue if ``learner`` is in it (its state is about to be used); a learner with
        nothing queued is up to date, and the others' requests wait for more to join them."""
        if id(learner) in self._queued:
            self.flush()

    def flush(self) -> None:
        if not self._queue:
            return
        from p2pser.learn.batched import train_learners

        queue, self._queue = self._queue, []
        self._queued = set()
        self.flushes += 1
        self.requests += len(queue)
        losses = train_learners([(learner, steps, correction) for learner, steps, correction, _ in queue])
        for (*_, pending), loss in zip(queue, losses, strict=True):
            pending.value = loss


class BatchedLearner:
    """A ``TorchLearner`` whose ``train`` is queued in ``batch``; anything else first carries out the queue
    if this learner is in it."""

    def __init__(self, inner: Any, batch: PeerBatch) -> None:
        self.inner, self._batch = inner, batch
        for key in _CONSTANT:
            setattr(self, key, getattr(inner, key))

    def train(self, steps: int, correction: Any = None) -> PendingLoss:
        return self._batch.defer(self.inner, steps, correction)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("inner", "_batch"):
            raise AttributeError(name)
        self._batch.flush_for(self.inner)
        return getattr(self.inner, name)
