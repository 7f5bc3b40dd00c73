"""From a data folder to the arrays of an experiment: corpus, folds, classes and cached features.

Centralized training and the simulator use this one path, so they see the same utterances, label order
and folds for the same folder and settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from p2pser.data.corpora import Corpus, load_corpus
from p2pser.data.features import FeatureSet, FeatureSpec, extract_features
from p2pser.data.splits import Fold, Split, folds_from_test_speakers, load_folds, split_fold
from p2pser.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    corpus: Corpus
    features: FeatureSet
    folds: list[Fold]
    classes: list[str]
    folds_source: str  # the folds file, or "--test-speakers"

    def fold(self, number: int, val_fraction: float = 0.1, seed: int = 0) -> Split:
        """Index arrays into ``features`` for fold ``number`` (1-based)."""
        for fold in self.folds:
            if fold.number == number:
                return split_fold(
                    self.features.speakers, self.features.labels, fold, val_fraction=val_fraction, seed=seed
                )
        raise UserError(f"fold {number} does not exist: {self.folds_source} has folds 1..{len(self.folds)}")


def prepare_experiment(
    data_dir: str | Path,
    spec: FeatureSpec,
    *,
    folds_path: str | Path | None = None,
    test_speakers: list[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Experiment:
    """Read the corpus in ``data_dir``, resolve its folds and extract (or load cached) features.

    Folds come from ``test_speakers`` (one fold), else ``folds_path``, else ``data_dir/folds.json``. A
    "classes" list in the folds file fixes the label order and drops other emotions; otherwise the classes
    are the corpus's emotions, sorted.
    """
    if test_speakers and folds_path is not None:
        raise UserError("give either --folds or --test-speakers, not both")
    corpus = load_corpus(data_dir)
    speakers = corpus.speakers()
    classes: list[str] | None = None
    if test_speakers:
        folds, source = folds_from_test_speakers(test_speakers, speakers), "--test-speakers"
    else:
        path = Path(folds_path) if folds_path is not None else Path(data_dir) / "folds.json"
        if folds_path is None and not path.is_file():
            raise UserError(
                f"{data_dir} has no folds.json: pass --folds FILE or --test-speakers SPEAKER[,SPEAKER...]"
            )
        folds, classes = load_folds(path, speakers)
        source = str(path)
    features = extract_features(
        corpus.utterances, spec, classes=classes, cache_dir=cache_dir, workers=workers, progress=progress
    )
    log.info(
        "%s: %d utterances, %d classes, %d folds from %s",
        data_dir, len(features), len(features.classes), len(folds), source,
    )
    return Experiment(corpus=corpus, features=features, folds=folds, classes=features.classes, folds_source=source)
