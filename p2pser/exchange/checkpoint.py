"""Peer checkpoints: model, optimiser, random state and position in one file, replaced atomically.

A checkpoint is one ``.npz`` archive (no pickle): every tensor is an array entry, and a JSON document
(entry ``__tree__``) holds the rest of the structure with references to those arrays. It is written to a
temporary file, fsynced, renamed over the previous checkpoint and the folder is fsynced: a ``kill -9`` (or a
power cut) at any moment leaves either the old checkpoint or the new one, never a torn file.

The position saved is the next round to run and the model age (gossip); a restarted peer loads the
checkpoint, pulls its neighbours' current models and rejoins at their round (``algorithms.catch_up``).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pser.errors import UserError
from p2pser.exchange.peer import Peer
from p2pser.files import temporary_of, write_atomically

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = 2  # 2: learner state and algorithm state in their own entries
_TREE = "__tree__"


@dataclass(frozen=True)
class Checkpoint:
    next_round: int
    age: float
    meta: dict[str, Any]
    learner: dict[str, Any]  # what the learner's ``checkpoint_state`` returned
    algorithm_state: dict[str, Any]  # what the algorithm keeps across rounds (``Peer.algorithm_state``)


def _flatten(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able tree with tensors and arrays moved into ``arrays``; dict keys keep their type (the
    optimiser's state is keyed by int)."""
    if isinstance(value, torch.Tensor):
        key = f"a{len(arrays)}"
        arrays[key] = value.detach().cpu().numpy()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__ndarray__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _flatten(v, arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _unflatten(node: Any, arrays: Any) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return torch.from_numpy(np.array(arrays[node["__tensor__"]]))
        if "__ndarray__" in node:
            return np.array(arrays[node["__ndarray__"]])
        return {k: _unflatten(v, arrays) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [_unflatten(v, arrays) for v in node]
    return node


def save_checkpoint(path: str | Path, peer: Peer, next_round: int, *, durable: bool = True) -> None:
    """Write ``peer``'s full learning state atomically: its position, its learner's state (for a torch
    learner: ``model`` and ``trainer``) and what its algorithm declares as extra state. ``durable=False``
    skips the fsyncs (the simulator: a simulated crash is not an operating-system crash)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    tree = {
        "format": FORMAT,
        "meta": {"peer": peer.id, "algorithm": peer.config.algorithm, **peer.learner.identity()},
        "next_round": int(next_round),
        "age": float(peer.age),
        "learner": _flatten(peer.learner.checkpoint_state(), arrays),
        "algorithm_state": _flatten(dict(peer.algorithm_state), arrays),
    }
    arrays[_TREE] = np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)
    write_atomically(path, lambda fh: np.savez(fh, **arrays), durable=durable)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a damaged or foreign file is a ``UserError`` naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            tree = json.loads(bytes(archive[_TREE]).decode())
            if tree.get("format") != FORMAT:
                raise ValueError(f"format {tree.get('format')!r}, this version reads {FORMAT}")
            learner = _unflatten(tree["learner"], archive)
            algorithm_state = _unflatten(tree["algorithm_state"], archive)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise UserError(
            f"checkpoint {path} is damaged or not a p2pser checkpoint ({exc}); move it away to start this peer "
            "afresh, or pass --resume off"
        ) from None
    return Checkpoint(next_round=int(tree["next_round"]), age=float(tree["age"]), meta=tree["meta"],
                      learner=learner, algorithm_state=algorithm_state)


def restore(peer: Peer, checkpoint: Checkpoint, source: str | Path) -> None:
    """Load ``checkpoint`` into ``peer``; one made for another peer, model or data is a ``UserError``."""
    meta = checkpoint.meta
    want = {"peer": peer.id, **peer.learner.identity()}
    for key, value in want.items():
        if meta.get(key) != value:
            raise UserError(
                f"checkpoint {source} was made with {key} {meta.get(key)!r}, this run has {value!r}: use the run "
                "folder of this configuration, or pass --resume off to start afresh"
            )
    peer.learner.restore(checkpoint.learner)
    peer.algorithm_state.clear()
    peer.algorithm_state.update(checkpoint.algorithm_state)
    peer.round = checkpoint.next_round
    peer.age = checkpoint.age


class Checkpointer:
    """Saves a peer every ``every`` rounds (0: only when asked) into ``folder/checkpoint.npz``, and knows
    the round to resume from at exit."""

    def __init__(self, peer: Peer, folder: str | Path, every: int, *, durable: bool = True) -> None:
        self.peer = peer
        self.path = Path(folder) / CHECKPOINT_NAME
        self.every = every
        self.durable = durable
        self.next_round = peer.round

    def after_round(self, round_: int) -> None:
        self.next_round = round_ + 1
        if self.every and self.next_round % self.every == 0:
            self.save()

    def save(self) -> None:
        save_checkpoint(self.path, self.peer, self.next_round, durable=self.durable)

    def resume(self) -> bool:
        """Restore the saved checkpoint if there is one; True when the peer resumed from it."""
        stale = temporary_of(self.path)
        if stale.exists():
            log.warning("peer %d: removing %s, a checkpoint write cut short by a crash", self.peer.id, stale)
            stale.unlink()
        if not self.path.exists():
            return False
        restore(self.peer, load_checkpoint(self.path), self.path)
        self.next_round = self.peer.round
        log.info("peer %d: resumed from %s at round %d", self.peer.id, self.path, self.next_round)
        return True
