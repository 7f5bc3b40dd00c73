"""The messages a peer has received and not yet used, filed by kind, round and sender.

Pure bookkeeping, no sockets and no clock: the real-time runner and the simulator both feed it, so the
rules for stale, duplicate and far-ahead messages are the same in simulation and deployment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from p2pser.exchange.codec import Message


class Inbox:
    """Synchronous rounds keep a floor: a message for a round already finished is stale and dropped.

    Asynchronous gossip ignores rounds; there a newer model from a sender replaces its older one, so the
    buffer holds at most one model per neighbour.
    """

    def __init__(self, neighbours: Iterable[int], *, max_rounds_ahead: int = 8, rounds: int | None = None) -> None:
        """``rounds``: the schedule's length; a model for a round past it is refused (a lie or another run)."""
        self.neighbours = frozenset(neighbours)
        self.max_rounds_ahead = max_rounds_ahead
        self.rounds = rounds
        # Lowest round still awaited, per kind of round: the models' rounds, and the rounds in which peers
        # agree on normalisation statistics before training ("stats"), which are numbered apart.
        self._floors = {"model": 0, "stats": 0}
        self._by_round: dict[tuple[str, int], dict[int, Message]] = defaultdict(dict)
        self._latest: dict[int, Message] = {}
        self._last_round: dict[int, int] = {}  # survives drain(), so a replayed old model is refused
        self._newest: dict[tuple[str, int], int] = {}  # (kind, sender) -> newest synchronous round accepted
        # (kind, sender) -> newest round claimed, even by a message refused as too far ahead: only ever used
        # to stop waiting for that sender (a liar gains nothing by it), never to move us.
        self._claimed: dict[tuple[str, int], int] = {}
        self._states: dict[int, Message] = {}  # answers to our pull, by sender: any round, newest wins
        self._pulled: frozenset[int] = frozenset()  # neighbours whose answer to our pull we are waiting for

    def add(self, message: Message, *, synchronous: bool = True) -> str | None:
        """File a decoded message; return why it was refused, or None when it was accepted."""
        if message.sender not in self.neighbours:
            return f"sender {message.sender} is not a neighbour"
        if message.kind == "state":
            # A neighbour's current parameters answering our pull: whatever round it is at is the point. An
            # unsolicited one is refused: it would replace our model wholesale.
            if message.sender not in self._pulled:
                return f"state from {message.sender} that we did not pull"
            self._states[message.sender] = message
            return None
        if message.kind not in self._floors:
            return f"unexpected {message.kind!r} message"
        if message.kind == "model" and self.rounds is not None and message.round >= self.rounds:
            return f"round {message.round} from {message.sender} is past the schedule's end (round {self.rounds - 1})"
        if not synchronous:
            last = self._last_round.get(message.sender, -1)
            if message.round <= last:
                return f"round {message.round} from {message.sender} is not newer than round {last} (replay?)"
            self._last_round[message.sender] = message.round
            self._latest[message.sender] = message
            return None
        key = (message.kind, message.sender)
        self._claimed[key] = max(self._claimed.get(key, -1), message.round)
        floor = self._floors[message.kind]
        if message.round < floor:
            return f"stale round {message.round} from {message.sender} (now at round {floor})"
        if message.round > floor + self.max_rounds_ahead:
            return f"round {message.round} from {message.sender} is too far ahead of round {floor}"
        slot = self._by_round[(message.kind, message.round)]
        if message.sender in slot:
            return f"duplicate {message.kind} for round {message.round} from {message.sender}"
        slot[message.sender] = message
        key = (message.kind, message.sender)
        self._newest[key] = max(self._newest.get(key, -1), message.round)
        return None

    def await_states(self, senders: Iterable[int]) -> None:
        """We just pulled ``senders``: accept their "state" answers until the next ``take("state")``."""
        self._pulled = frozenset(senders) & self.neighbours

    @property
    def newest_seen(self) -> int:
        """The round the neighbours have reached by the models we accepted: the lower median over them of
        each one's newest round (-1 for one not heard). A median, so that one lying or runaway neighbour
        cannot make us believe we fell behind; accepted models only, so nothing we refused counts."""
        newest = sorted(self._newest.get(("model", s), -1) for s in self.neighbours)
        return newest[(len(newest) - 1) // 2] if newest else -1

    def has_all(self, kind: str, round_: int, senders: Iterable[int]) -> bool:
        """True when each sender delivered this round, or a later one: a neighbour that restarted ahead of
        us has skipped this round and will never send it, so waiting for it would only burn the deadline.
        For "state" (pull answers) the round does not matter."""
        if kind == "state":
            return all(s in self._states for s in senders)
        slot = self._by_round.get((kind, round_), {})
        return all(s in slot or self._claimed.get((kind, s), -1) > round_ for s in senders)

    def take(self, kind: str, round_: int) -> dict[int, Message]:
        """Everything for (kind, round) from any neighbour; that round and earlier ones become stale.

        Taking "state" answers moves the floor to the newest round among them: the caller catches up to
        its neighbours and their models for that round must not be refused as too far ahead.
        """
        if kind == "state":
            got, self._states, self._pulled = self._states, {}, frozenset()
            self._floors["model"] = max([self.floor, *(m.round for m in got.values())])
            return dict(sorted(got.items()))
        got = self._by_round.pop((kind, round_), {})
        self._floors[kind] = max(self._floors[kind], round_ + 1)
        for key in [k for k in self._by_round if k[1] < self._floors[k[0]]]:
            del self._by_round[key]
        return got

    @property
    def floor(self) -> int:
        """Lowest model round still awaited."""
        return self._floors["model"]

    def drain(self) -> list[Message]:
        """All buffered asynchronous models, in sender order."""
        got = [self._latest[s] for s in sorted(self._latest)]
        self._latest.clear()
        return got
