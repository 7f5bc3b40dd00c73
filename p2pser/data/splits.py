"""Speaker-independent folds, train/validation/test splits and the partition of training data into peers.

Everything here works on index arrays into one FeatureSet (or corpus listing), never on copies of the
data, and is deterministic given the seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pser.errors import UserError

SCHEMES = ("speaker", "dirichlet", "iid")
_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Fold:
    number: int  # 1-based, as users and papers count folds
    test_speakers: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 indices, sorted
    val: np.ndarray
    test: np.ndarray


def load_folds(path: str | Path, speakers: Iterable[str]) -> tuple[list[Fold], list[str] | None]:
    """Folds (and the optional class list fixing label order) from a folds.json checked against the corpus.

    Format: ``{"folds": [{"test_speakers": ["ravdess_01", ...]}, ...], "classes": [...]}`` (other keys,
    such as "name" and "about", are ignored).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"folds file {path} does not exist; pass --folds FILE or --test-speakers a,b") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read folds file {path}: {exc}") from exc
    except ValueError as exc:
        raise UserError(f"folds file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("folds"), list) or not doc["folds"]:
        raise UserError(f'folds file {path} needs a non-empty list "folds" of {{"test_speakers": [...]}}')
    known = set(speakers)
    folds = []
    for number, entry in enumerate(doc["folds"], start=1):
        tests = entry.get("test_speakers") if isinstance(entry, dict) else None
        if not isinstance(tests, list) or not tests or not all(isinstance(s, str) for s in tests):
            raise UserError(f'folds file {path}: fold {number} needs "test_speakers", a non-empty list of names')
        folds.append(_checked_fold(number, tests, known, f"folds file {path}, fold {number}"))
    classes = doc.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise UserError(f'folds file {path}: "classes" must be a non-empty list of distinct emotion names')
    return folds, classes


def folds_from_test_speakers(test_speakers: list[str], speakers: Iterable[str]) -> list[Fold]:
    """One fold testing on the given speakers (``--test-speakers a,b``) and training on all others."""
    tests = [s.strip() for s in test_speakers if s.strip()]
    if not tests:
        raise UserError("--test-speakers needs at least one speaker name")
    return [_checked_fold(1, tests, set(speakers), "--test-speakers")]


def _checked_fold(number: int, tests: list[str], known: set[str], where: str) -> Fold:
    unknown = sorted(set(tests) - known)
    if unknown:
        sample = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
        raise UserError(f"{where} names speakers not in the corpus: {', '.join(unknown)} (corpus has: {sample})")
    if len(set(tests)) != len(tests):
        raise UserError(f"{where} lists a test speaker twice: {tests}")
    if not known - set(tests):
        raise UserError(f"{where} tests on every speaker, which leaves nobody to train on")
    return Fold(number, tuple(tests))


def split_fold(
    speakers: np.ndarray, labels: np.ndarray, fold: Fold, *, val_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Test = the fold's speakers; validation = a class-stratified ``val_fraction`` of the others' utterances.

    No speaker is in both train and test; validation comes from training speakers only.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    speakers, labels = np.asarray(speakers), np.asarray(labels)
    is_test = np.isin(speakers, fold.test_speakers)
    test = np.flatnonzero(is_test)
    pool = np.flatnonzero(~is_test)
    if len(test) == 0 or len(pool) == 0:
        raise UserError(
            f"fold {fold.number} leaves {len(pool)} training and {len(test)} test utterances; "
            "check the fold's test speakers against the data"
        )
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == label])
        val.append(members[: round(len(members) * val_fraction)])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train = np.setdiff1d(pool, val_idx).astype(np.int64)
    return Split(train=train, val=val_idx, test=test.astype(np.int64))


def partition(
    indices: np.ndarray,
    speakers: np.ndarray,
    labels: np.ndarray,
    *,
    scheme: str = "speaker",
    n_peers: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``indices`` (into ``speakers``/``labels``) among peers; each peer gets a sorted index array.

    ``speaker``: one peer per speaker, in sorted speaker order (the natural decentralized SER setting).
    ``dirichlet``: label skew, each class spread over peers by Dirichlet(alpha) proportions (small alpha,
    few classes per peer). ``iid``: a shuffled near-equal split. Every peer gets at least one utterance;
    every index goes to exactly one peer.
    """
    indices = np.asarray(indices, dtype=np.int64)
    speakers, labels = np.asarray(speakers), np.asarray(labels)
    if scheme not in SCHEMES:
        raise UserError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "speaker":
        names = sorted(set(speakers[indices].tolist()))
        if n_peers is not None and n_peers != len(names):
            raise UserError(
                f"partition 'speaker' gives one peer per training speaker ({len(names)}), not {n_peers}; "
                "use that many peers, or the 'dirichlet' or 'iid' partition"
            )
        return [indices[speakers[indices] == name] for name in names]
    if n_peers is None or not 1 <= n_peers <= len(indices):
        raise UserError(f"partition {scheme!r} needs a number of peers between 1 and {len(indices)}, got {n_peers}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(indices), n_peers)]
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be positive, got {alpha}")
    return _dirichlet(indices, labels, n_peers, alpha, rng)


def _dirichlet(
    indices: np.ndarray, labels: np.ndarray, n_peers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for members in by_class:
            members = rng.permutation(members)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_peers, alpha)))[:-1] * len(members)).astype(int)
            for peer, chunk in enumerate(np.split(members, cuts)):
                parts[peer].append(chunk)
        peers = [np.concatenate(p) for p in parts]
        if all(len(p) for p in peers):
            break
    # Very small alpha with many peers can keep leaving a peer empty: give each empty peer one utterance
    # from the largest, which changes the label skew as little as possible.
    for k in range(n_peers):
        if not len(peers[k]):
            donor = max(range(n_peers), key=lambda j: len(peers[j]))
            pick = rng.integers(len(peers[donor]))
            peers[k] = peers[donor][pick : pick + 1]
            peers[donor] = np.delete(peers[donor], pick)
    return [np.sort(p).astype(np.int64) for p in peers]
