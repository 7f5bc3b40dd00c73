"""Speaker-independent folds and train/validation/test splits.

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
    speakers, labels = np.asarray(speakers), np.asarray(labels)
    is_test = np.isin(speakers, fold.test_speakers)
    test = np.flatnonzero(is_test)
    pool = np.flatnonzero(~is_test)
    if len(test) == 0 or len(pool) == 0:
        raise UserError(
            f"fold {fold.number} leaves {len(pool)} training and {len(test)} test utterances; "
            "check the fold's test speakers against the data"
        )
    val = hold_out(pool, labels, val_fraction, seed)
    train = np.setdiff1d(pool, val).astype(np.int64)
    return Split(train=train, val=val, test=test.astype(np.int64))


def hold_out(pool: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted ``fraction`` of the indices ``pool`` (into ``labels``), the same share of every class."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == label])
        val.append(members[: round(len(members) * fraction)])
    return np.sort(np.concatenate(val or [pool[:0]])).astype(np.int64)
