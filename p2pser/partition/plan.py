"""Who holds which utterances in a decentralized run, decided from file metadata alone.

The plan (fold, partition into peers) is computed from the corpus listing, before any audio is read, and is
the same in every peer process, the launcher and the simulator because it depends only on the corpus, the
configuration and the seed. A real peer then extracts features for its own utterances and the test set
only: it never touches another peer's speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pser.config import RunConfig
from p2pser.data.corpora import Corpus, load_corpus
from p2pser.data.features import FeatureSet, FeatureSpec, extract_features
from p2pser.data.splits import Fold, folds_from_test_speakers, load_folds, partition, split_fold
from p2pser.errors import UserError
from p2pser.learn.models import MODEL_NAMES


@dataclass
class Plan:
    corpus: Corpus
    classes: list[str]
    fold: Fold
    peers: list[np.ndarray]  # per peer: indices into corpus.utterances of its own (train + val) data
    test: np.ndarray  # indices of the fold's test utterances

    @property
    def n_peers(self) -> int:
        return len(self.peers)


def make_plan(data_dir: str | Path, cfg: RunConfig, n_peers: int | None = None) -> Plan:
    # Names are checked before anything is read, so a typo costs no feature extraction.
    if cfg.model not in MODEL_NAMES:
        raise UserError(f"unknown model {cfg.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    feature_spec(cfg)
    corpus = load_corpus(data_dir)
    speakers_all = corpus.speakers()
    if cfg.test_speakers:
        folds, classes = folds_from_test_speakers(cfg.test_speakers.split(","), speakers_all), None
    else:
        folds_path = Path(cfg.folds) if cfg.folds else Path(data_dir) / "folds.json"
        if not folds_path.is_file():
            raise UserError(f"no folds file at {folds_path}: pass --folds FILE or --test-speakers a,b")
        folds, classes = load_folds(folds_path, speakers_all)
    if not 1 <= cfg.fold <= len(folds):
        raise UserError(f"fold {cfg.fold} does not exist: the folds file has folds 1..{len(folds)}")
    fold = folds[cfg.fold - 1]
    classes = list(classes) if classes else corpus.emotions()
    keep = np.array([u.emotion in classes for u in corpus.utterances])
    speakers = np.array([u.speaker for u in corpus.utterances])
    labels = np.array([classes.index(u.emotion) if k else -1 for u, k in zip(corpus.utterances, keep)])
    split = split_fold(speakers[keep], labels[keep], fold, val_fraction=0.0, seed=cfg.seed)
    kept = np.flatnonzero(keep)
    train, test = kept[split.train], kept[split.test]
    if cfg.partition == "speaker":
        n_speakers = len(set(speakers[train]))
        if n_peers is not None and n_peers != n_speakers:
            raise UserError(
                f"{n_peers} peers but fold {cfg.fold} has {n_speakers} training speakers: use a topology of "
                f"{n_speakers} peers, or --partition dirichlet or iid"
            )
        n_peers = n_speakers
    elif n_peers is None:
        raise UserError(f"--partition {cfg.partition} needs a number of peers (--peers N or a topology)")
    peers = partition(
        train, speakers, labels, scheme=cfg.partition, n_peers=n_peers, alpha=cfg.alpha, seed=cfg.seed
    )
    return Plan(corpus=corpus, classes=classes, fold=fold, peers=[np.sort(p) for p in peers], test=np.sort(test))


def feature_spec(cfg: RunConfig) -> FeatureSpec:
    return FeatureSpec(kind=cfg.features, max_seconds=cfg.max_seconds)


def extract_for(
    plan: Plan, indices: np.ndarray, cfg: RunConfig, *, workers: int | None = None, progress: bool = False
) -> tuple[FeatureSet, dict[int, int]]:
    """Features for the given utterances only; returns them and a map from utterance index to row.

    Files that cannot be read are skipped by the extractor (with a logged reason) and are absent from the
    map, so callers select rows through it rather than assuming alignment.
    """
    utterances = [plan.corpus.utterances[i] for i in indices]
    features = extract_features(
        utterances, feature_spec(cfg), cache_dir=cfg.cache_dir, workers=workers, progress=progress,
        classes=plan.classes,
    )
    row_of_path = {str(u.path): row for row, u in enumerate(features.utterances)}
    rows = {int(i): row_of_path[str(plan.corpus.utterances[i].path)]
            for i in indices if str(plan.corpus.utterances[i].path) in row_of_path}
    return features, rows


def rows(mapping: dict[int, int], indices: np.ndarray) -> np.ndarray:
    return np.array([mapping[int(i)] for i in indices if int(i) in mapping], dtype=np.int64)


def test_set(features: FeatureSet, row_of: dict[int, int], plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, labels, lengths) of the fold's test utterances that could be read."""
    test_rows = rows(row_of, plan.test)
    return features.x[test_rows], features.labels[test_rows], features.lengths[test_rows]
