"""From a data folder to who trains and tests on which utterances: the one data path of every run.

``load_experiment`` resolves, from the corpus listing alone (no audio read), the folds (a folds file or
``--test-speakers``), the task (categories, dimensions or both), the classes and their order, and each
utterance's targets: its class (``encode_labels``, the one rule the feature extractor labels rows by too)
and its dimensions, rescaled from the corpus's scale to -1..1 so that every corpus trains alike. From it come a fold's train and test utterances and, for
decentralized runs, the ``Plan`` that partitions the training utterances into peers. ``p2pser train``,
``simulate``, ``launch`` and every ``peer`` resolve a folder the same way, so for the same folder, settings
and seed they see the same utterances, labels and folds.

Features are extracted afterwards, only for the utterances a caller needs: a real peer asks for its own
utterances and the test set and never touches another peer's speech.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pser.audio.corpora import Corpus, load_corpus
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.features.augment import Copies, extract_copies, perturbations
from p2pser.features.extract import extract_features
from p2pser.features.normalize import standardize_by_speaker
from p2pser.features.spec import FeatureSet, FeatureSpec, encode_labels
from p2pser.partition import targets as task_targets
from p2pser.partition.folds import Fold, folds_from_test_speakers, load_folds, split_fold
from p2pser.partition.peers import partition
from p2pser.partition.targets import DIMENSIONS

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    corpus: Corpus
    folds: list[Fold]
    folds_source: str  # the folds file, or "--test-speakers"
    classes: list[str]  # label order: the folds file's "classes", else the corpus's emotions sorted
    labels: np.ndarray  # int64 per corpus utterance: index into classes, -1 when its emotion is not a class
    speakers: np.ndarray  # str per corpus utterance
    task: str = "categorical"  # p2pser.partition.targets.TASK_NAMES; p2pser.learn.tasks.task_named builds it
    dimensions: tuple[str, ...] = ()  # the dimensions the corpus labels (DIMENSIONS order)
    targets: np.ndarray | None = None  # per corpus utterance, the task's y (p2pser.partition.targets)

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.labels
        self.strata = task_targets.strata(self.task, self.targets)  # per utterance; -1: nothing to learn from
        # The targets of the last feature set asked for (peers of a simulation share one): weakly held, so
        # that dropping the features frees them.
        self._row_targets: tuple[weakref.ref, np.ndarray] | None = None

    @property
    def labelled(self) -> np.ndarray:
        """Indices of the utterances that carry a label of the task: all that any run uses."""
        return np.flatnonzero(self.strata >= 0)

    def row_targets(self, features: FeatureSet, row_of: dict[int, int]) -> np.ndarray:
        """The task's targets of each row of ``features`` (extracted by ``extract``, mapped by ``row_of``)."""
        if self._row_targets is not None and self._row_targets[0]() is features:
            return self._row_targets[1]
        y = np.zeros((len(features), *self.targets.shape[1:]), dtype=self.targets.dtype)
        for index, row in row_of.items():
            y[row] = self.targets[index]
        self._row_targets = (weakref.ref(features), y)
        return y

    def fold(self, number: int) -> Fold:
        """Fold ``number`` (1-based)."""
        if not 1 <= number <= len(self.folds):
            raise UserError(f"fold {number} does not exist: {self.folds_source} has folds 1..{len(self.folds)}")
        return self.folds[number - 1]

    def split(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted indices into ``corpus.utterances`` of fold ``number``'s training and test utterances."""
        kept = self.labelled
        split = split_fold(self.speakers[kept], self.strata[kept], self.fold(number), val_fraction=0.0)
        return kept[split.train], kept[split.test]

    def plan(self, number: int, *, scheme: str, n_peers: int | None, alpha: float = 0.5, seed: int = 0) -> Plan:
        """Fold ``number`` with its training utterances partitioned into peers (``p2pser.partition.peers``)."""
        train, test = self.split(number)
        peers = partition(train, self.speakers, self.strata, scheme=scheme, n_peers=n_peers, alpha=alpha, seed=seed)
        return Plan(self, self.fold(number), [np.sort(p) for p in peers], np.sort(test))

    def extract(
        self, indices: np.ndarray, spec: FeatureSpec, *, cache_dir: str | Path | None = None,
        workers: int | None = None, progress: bool = False,
    ) -> tuple[FeatureSet, dict[int, int]]:
        """Features of the given utterances only, and a map from utterance index to feature row.

        Files that cannot be read are skipped by the extractor (with a logged reason) and are absent from
        the map, so callers select rows through it (``rows``) rather than assuming alignment.
        """
        indices = [int(i) for i in indices]
        # Classes filter what the extractor keeps; a task with dimensions keeps utterances without a class.
        features = extract_features(
            [self.corpus.utterances[i] for i in indices], spec,
            classes=self.classes if self.task == "categorical" else None, cache_dir=cache_dir,
            workers=workers, progress=progress,
        )
        row_of_path = {str(u.path): row for row, u in enumerate(features.utterances)}
        paths = {i: str(self.corpus.utterances[i].path) for i in indices}
        return features, {i: row_of_path[p] for i, p in paths.items() if p in row_of_path}


def load_experiment(
    data_dir: str | Path, *, folds_path: str | Path | None = None, test_speakers: list[str] | None = None,
    task: str = "categorical",
) -> Experiment:
    """Read the corpus listing in ``data_dir`` and resolve its folds, task, classes and targets (no audio is
    read).

    Folds come from ``test_speakers`` (one fold), else ``folds_path``, else ``data_dir/folds.json``. A
    "classes" list in the folds file fixes the label order and drops other emotions; otherwise the classes
    are the corpus's emotions, sorted. ``task`` is ``categorical``, ``dimensional`` (the dimensions the
    corpus labels) or ``both``.
    """
    if test_speakers and folds_path is not None:
        raise UserError("give either --folds or --test-speakers, not both")
    corpus = load_corpus(data_dir)
    classes: list[str] | None = None
    if test_speakers:
        folds, source = folds_from_test_speakers(test_speakers, corpus.speakers()), "--test-speakers"
    else:
        path = Path(folds_path) if folds_path is not None else Path(data_dir) / "folds.json"
        if folds_path is None and not path.is_file():
            raise UserError(
                f"{data_dir} has no folds.json: pass --folds FILE or --test-speakers SPEAKER[,SPEAKER...]"
            )
        folds, classes = load_folds(path, corpus.speakers())
        source = str(path)
    classes = list(classes) if classes else corpus.emotions()
    labels = encode_labels([u.emotion for u in corpus.utterances], classes)
    check_task(task, corpus, classes, data_dir)
    dimensions = tuple(corpus.dimensions())
    targets = task_targets.make_targets(task, labels, scaled_dimensions(corpus), dimensions)
    experiment = Experiment(corpus=corpus, folds=folds, folds_source=source, classes=classes, labels=labels,
                            speakers=np.array([u.speaker for u in corpus.utterances]), task=task,
                            dimensions=dimensions, targets=targets)
    log.info("%s: %d of %d utterances labelled for the %s task (%d classes, dimensions %s), %d folds from %s",
             data_dir, len(experiment.labelled), len(labels), task, len(classes),
             ",".join(corpus.dimensions()) or "none", len(folds), source)
    return experiment


def check_task(name: str, corpus: Corpus, classes: list[str], data_dir: str | Path) -> None:
    """A UserError when the corpus lacks the labels task ``name`` learns from."""
    if name not in task_targets.TASK_NAMES:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(task_targets.TASK_NAMES)}")
    dimensions = corpus.dimensions()
    if name in ("dimensional", "both") and not dimensions:
        raise UserError(f"{data_dir} labels no arousal, valence or dominance: --task {name} needs them "
                        "(manifest columns arousal, valence, dominance); use --task categorical")
    if name in ("categorical", "both") and len(classes) < 2:
        hint = f"; it labels {', '.join(dimensions)}: use --task dimensional" if dimensions else ""
        raise UserError(f"{data_dir} has {len(classes)} emotion categories, --task {name} needs at least 2{hint}")


def scaled_dimensions(corpus: Corpus) -> np.ndarray:
    """float32 ``[N, 3]`` (``DIMENSIONS`` order) of each utterance's dimensions mapped from the corpus's
    scale (``Corpus.range_of``) to -1..1, NaN where unlabelled: a model's regression outputs start near the
    middle of every scale, and CCC, which the task is scored by, is unchanged by the mapping."""
    out = np.full((len(corpus.utterances), len(DIMENSIONS)), np.nan, dtype=np.float32)
    for j, name in enumerate(DIMENSIONS):
        low, high = corpus.range_of(name)
        half = (high - low) / 2 or 1.0
        for i, u in enumerate(corpus.utterances):
            value = u.dimension(name)
            if value is not None:
                out[i, j] = (value - (low + high) / 2) / half
    return out


# ---- decentralized runs: the plan every peer process, the launcher and the simulator compute alike ----


@dataclass
class Plan:
    experiment: Experiment
    fold: Fold
    peers: list[np.ndarray]  # per peer: indices into corpus.utterances of its own (train + val) data
    test: np.ndarray  # indices of the fold's test utterances

    @property
    def corpus(self) -> Corpus:
        return self.experiment.corpus

    @property
    def classes(self) -> list[str]:
        return self.experiment.classes

    @property
    def n_peers(self) -> int:
        return len(self.peers)


def make_plan(data_dir: str | Path, cfg: RunConfig, n_peers: int | None = None) -> Plan:
    """The run's fold and partition from the configuration (``n_peers`` None: one peer per training
    speaker, which only the speaker partition can choose)."""
    # Names are checked before anything is read, so a typo costs no feature extraction.
    feature_spec(cfg)
    if n_peers is None and cfg.partition != "speaker":
        raise UserError(f"--partition {cfg.partition} needs a number of peers (--peers N or a topology)")
    experiment = load_experiment(
        data_dir, folds_path=cfg.folds, test_speakers=cfg.test_speakers.split(",") if cfg.test_speakers else None,
        task=cfg.task,
    )
    return experiment.plan(cfg.fold, scheme=cfg.partition, n_peers=n_peers, alpha=cfg.alpha, seed=cfg.seed)


def feature_spec(cfg: RunConfig) -> FeatureSpec:
    return FeatureSpec(kind=cfg.features, max_seconds=cfg.max_seconds)


def extract_for(
    plan: Plan, indices: np.ndarray, cfg: RunConfig, *, workers: int | None = None, progress: bool = False
) -> tuple[FeatureSet, dict[int, int]]:
    """``Experiment.extract`` with the run's feature settings."""
    return plan.experiment.extract(indices, feature_spec(cfg), cache_dir=cfg.cache_dir, workers=workers,
                                   progress=progress)


def copies_for(features: FeatureSet, row_of: dict[int, int], indices: np.ndarray, cfg: RunConfig, *,
               workers: int | None = None, progress: bool = False) -> Copies | None:
    """The run's perturbed copies (``--augment``) of the given training utterances, or None without any."""
    tokens = perturbations(cfg.augment, cfg.augment_copies)
    if not tokens:
        return None
    return extract_copies(features, rows(row_of, indices), tokens, cache_dir=cfg.cache_dir, workers=workers,
                          progress=progress)


def rows(mapping: dict[int, int], indices: np.ndarray) -> np.ndarray:
    """Feature rows of those ``indices`` whose audio could be used."""
    return np.array([mapping[int(i)] for i in indices if int(i) in mapping], dtype=np.int64)


def test_set(features: FeatureSet, row_of: dict[int, int], plan: Plan,
             normalizer: str = "local") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, targets, lengths) of the fold's test utterances that could be read; with the ``speaker``
    normaliser each test speaker is standardised with the statistics of their own (unlabelled) test audio."""
    test_rows = rows(row_of, plan.test)
    x, lengths = features.x[test_rows], features.lengths[test_rows]
    if normalizer == "speaker":
        x = standardize_by_speaker(x, lengths, features.speakers[test_rows])
    return x, plan.experiment.row_targets(features, row_of)[test_rows], lengths
