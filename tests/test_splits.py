"""Folds from the real folds.json files, speaker-independent splits, per-peer partitions, the experiment resolver."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.features.spec import FeatureSpec
from p2pser.partition.experiment import load_experiment, make_plan
from p2pser.partition.folds import Fold, folds_from_test_speakers, load_folds, split_fold
from p2pser.partition.peers import partition


def manifest(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Speakers and integer labels of every file of a corpus, from its MANIFEST.tsv."""
    with open(root / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    classes = sorted({r["emotion"] for r in rows})
    return np.array([r["speaker"] for r in rows]), np.array([classes.index(r["emotion"]) for r in rows]), classes


@pytest.fixture(scope="module")
def ravdess(shared_data):
    return manifest(shared_data / "ravdess")


def test_load_real_folds(shared_data, ravdess):
    speakers = sorted(set(ravdess[0]))
    folds, classes = load_folds(shared_data / "ravdess" / "folds.json", speakers)
    assert [f.number for f in folds] == [1, 2, 3, 4, 5, 6]
    assert folds[0].test_speakers == ("ravdess_01", "ravdess_11", "ravdess_20", "ravdess_21")
    tested = [s for f in folds for s in f.test_speakers]
    assert sorted(tested) == speakers  # the six folds test every actor exactly once
    assert classes == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]

    emodb_speakers = sorted(set(manifest(shared_data / "emodb")[0]))
    folds, classes = load_folds(shared_data / "emodb" / "folds.json", emodb_speakers)
    assert len(folds) == 5 and all(len(f.test_speakers) == 2 for f in folds) and len(classes) == 7


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("{not json", "not valid JSON"),
        ({"name": "x"}, '"folds"'),
        ({"folds": []}, '"folds"'),
        ({"folds": [{"speakers": ["a"]}]}, "fold 1 needs"),
        ({"folds": [{"test_speakers": ["a"]}, {"test_speakers": "b"}]}, "fold 2 needs"),
        ({"folds": [{"test_speakers": ["a", "zed", "ghost"]}]}, "ghost, zed"),
        ({"folds": [{"test_speakers": ["a", "a"]}]}, "twice"),
        ({"folds": [{"test_speakers": ["a", "b", "c"]}]}, "nobody to train"),
        ({"folds": [{"test_speakers": ["a"]}], "classes": ["sad", "sad"]}, '"classes"'),
    ],
)
def test_bad_folds_files_name_the_file_and_problem(tmp_path, doc, words):
    path = write(tmp_path / "folds.json", doc)
    with pytest.raises(UserError) as exc:
        load_folds(path, ["a", "b", "c"])
    assert str(path) in str(exc.value) and words in str(exc.value)


def test_missing_folds_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_folds(tmp_path / "nope.json", ["a"])


def test_folds_from_test_speakers():
    assert folds_from_test_speakers(["b", " c"], ["a", "b", "c"]) == [Fold(1, ("b", "c"))]
    with pytest.raises(UserError, match="x"):
        folds_from_test_speakers(["x"], ["a", "b"])
    with pytest.raises(UserError):
        folds_from_test_speakers([""], ["a", "b"])


def test_split_fold_is_speaker_independent_stratified_and_deterministic(shared_data, ravdess):
    speakers, labels, _ = ravdess
    folds, _ = load_folds(shared_data / "ravdess" / "folds.json", sorted(set(speakers)))
    for fold in folds:
        split = split_fold(speakers, labels, fold, val_fraction=0.1, seed=3)
        parts = np.concatenate([split.train, split.val, split.test])
        assert sorted(parts.tolist()) == list(range(len(speakers)))  # each utterance in exactly one part
        assert set(speakers[split.test]) == set(fold.test_speakers)
        assert not set(speakers[split.train]) & set(fold.test_speakers)
        assert not set(speakers[split.val]) & set(fold.test_speakers)
        pool = np.concatenate([split.train, split.val])
        for c in np.unique(labels):
            n_c, v_c = (labels[pool] == c).sum(), (labels[split.val] == c).sum()
            assert v_c == round(0.1 * n_c)
    again = split_fold(speakers, labels, folds[0], val_fraction=0.1, seed=3)
    other = split_fold(speakers, labels, folds[0], val_fraction=0.1, seed=4)
    first = split_fold(speakers, labels, folds[0], val_fraction=0.1, seed=3)
    assert np.array_equal(again.val, first.val) and not np.array_equal(other.val, first.val)
    assert len(split_fold(speakers, labels, folds[0], val_fraction=0.0).val) == 0


def test_split_fold_errors(ravdess):
    speakers, labels, _ = ravdess
    with pytest.raises(UserError, match="validation fraction"):
        split_fold(speakers, labels, Fold(1, ("ravdess_01",)), val_fraction=1.0)
    with pytest.raises(UserError, match="fold 2"):
        split_fold(speakers, labels, Fold(2, ("nobody",)))


def check_cover(peers: list[np.ndarray], indices: np.ndarray) -> None:
    assert all(len(p) > 0 for p in peers)
    assert sorted(np.concatenate(peers).tolist()) == sorted(indices.tolist())
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in peers)


def test_speaker_partition_one_peer_per_speaker(ravdess):
    speakers, labels, _ = ravdess
    train = np.flatnonzero(~np.isin(speakers, ["ravdess_01", "ravdess_02"]))
    peers = partition(train, speakers, labels, scheme="speaker")
    check_cover(peers, train)
    assert [set(speakers[p]) for p in peers] == [{s} for s in sorted(set(speakers[train]))]
    same = partition(train, speakers, labels, scheme="speaker", n_peers=22, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(peers, same))  # one speaker per peer: no seed involved
    with pytest.raises(UserError, match="at most 22 peers") as exc:
        partition(train, speakers, labels, scheme="speaker", n_peers=23)
    assert "\n" not in str(exc.value)


def speakers_of(peers: list[np.ndarray], speakers: np.ndarray) -> list[set[str]]:
    return [set(speakers[p].tolist()) for p in peers]


def test_fewer_peers_than_speakers_spreads_whole_speakers_evenly_by_seed(ravdess):
    speakers, labels, _ = ravdess
    train = np.flatnonzero(~np.isin(speakers, ["ravdess_01", "ravdess_02"]))
    peers = partition(train, speakers, labels, scheme="speaker", n_peers=8, seed=0)
    check_cover(peers, train)
    groups = speakers_of(peers, speakers)
    assert len(groups) == 8 and sum(len(g) for g in groups) == 22  # each speaker on exactly one peer
    # RAVDESS actors have 60 utterances each: 22 actors on 8 peers is six sites of 3 and two of 2.
    assert sorted(len(p) for p in peers) == [120] * 2 + [180] * 6
    again = partition(train, speakers, labels, scheme="speaker", n_peers=8, seed=0)
    other = partition(train, speakers, labels, scheme="speaker", n_peers=8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(peers, again))
    assert speakers_of(other, speakers) != groups


def test_speaker_spreading_balances_uneven_speakers():
    # Sizes 30, 30, 20, 20, 20 on two peers: placing the largest first gives 70/50; a swap reaches 60/60.
    sizes = {"a": 30, "b": 30, "c": 20, "d": 20, "e": 20}
    speakers = np.repeat(list(sizes), list(sizes.values()))
    labels = np.zeros(len(speakers), dtype=np.int64)
    for seed in range(5):
        peers = partition(np.arange(len(speakers)), speakers, labels, scheme="speaker", n_peers=2, seed=seed)
        assert sorted(map(sorted, speakers_of(peers, speakers))) == [["a", "b"], ["c", "d", "e"]]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=15), n_peers=st.integers(1, 15),
       seed=st.integers(0, 2**16))
def test_speaker_spreading_covers_each_speaker_once_within_one_speaker_of_even(sizes, n_peers, seed):
    speakers = np.repeat([f"s{i:02d}" for i in range(len(sizes))], sizes)
    labels = np.zeros(len(speakers), dtype=np.int64)
    indices = np.arange(len(speakers))
    if n_peers > len(sizes):
        with pytest.raises(UserError, match=f"at most {len(sizes)} peers"):
            partition(indices, speakers, labels, scheme="speaker", n_peers=n_peers, seed=seed)
        return
    peers = partition(indices, speakers, labels, scheme="speaker", n_peers=n_peers, seed=seed)
    check_cover(peers, indices)
    groups = speakers_of(peers, speakers)
    assert len(groups) == n_peers and sum(len(g) for g in groups) == len(sizes)
    loads = [len(p) for p in peers]
    assert max(loads) - min(loads) <= max(sizes)  # no peer could take another's speaker and end nearer even


def test_dirichlet_partition_skews_labels_and_is_deterministic(ravdess):
    speakers, labels, _ = ravdess
    train = np.arange(len(speakers))
    skewed = partition(train, speakers, labels, scheme="dirichlet", n_peers=10, alpha=0.1, seed=1)
    check_cover(skewed, train)
    iid = partition(train, speakers, labels, scheme="iid", n_peers=10, seed=1)
    check_cover(iid, train)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1

    def dominant_share(peers):  # mean share of each peer's most frequent class
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in peers])

    assert dominant_share(skewed) > 0.5 and dominant_share(iid) < 0.25
    same = partition(train, speakers, labels, scheme="dirichlet", n_peers=10, alpha=0.1, seed=1)
    other = partition(train, speakers, labels, scheme="dirichlet", n_peers=10, alpha=0.1, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, same))
    assert not all(np.array_equal(a, b) for a, b in zip(skewed, other))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 120),
    n_classes=st.integers(1, 6),
    n_peers=st.integers(1, 40),
    alpha=st.sampled_from([0.01, 0.1, 1.0, 100.0]),
    scheme=st.sampled_from(["dirichlet", "iid"]),
    seed=st.integers(0, 2**16),
)
def test_partitions_cover_every_index_once_and_leave_no_peer_empty(n, n_classes, n_peers, alpha, scheme, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, 3 * n)
    speakers = np.array([f"s{i % 7}" for i in range(3 * n)])
    indices = np.sort(rng.choice(3 * n, n, replace=False))
    if n_peers > n:
        with pytest.raises(UserError):
            partition(indices, speakers, labels, scheme=scheme, n_peers=n_peers, alpha=alpha, seed=seed)
        return
    peers = partition(indices, speakers, labels, scheme=scheme, n_peers=n_peers, alpha=alpha, seed=seed)
    assert len(peers) == n_peers
    check_cover(peers, indices)
    again = partition(indices, speakers, labels, scheme=scheme, n_peers=n_peers, alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(peers, again))


def test_partition_errors(ravdess):
    speakers, labels, _ = ravdess
    idx = np.arange(100)
    with pytest.raises(UserError, match="unknown partition"):
        partition(idx, speakers, labels, scheme="random", n_peers=4)
    with pytest.raises(UserError, match="number of peers"):
        partition(idx, speakers, labels, scheme="iid")
    with pytest.raises(UserError, match="alpha"):
        partition(idx, speakers, labels, scheme="dirichlet", n_peers=4, alpha=0)


def small_ravdess(shared_data: Path, dest: Path, actors: range) -> Path:
    """Eight files each of a few actors in the original RAVDESS layout."""
    for actor in actors:
        src = shared_data / "ravdess" / f"Actor_{actor:02d}"
        (dest / src.name).mkdir(parents=True)
        for f in sorted(src.iterdir())[::8]:
            shutil.copy(f, dest / src.name / f.name)
    return dest


def test_experiment_resolves_folds_classes_and_labels_from_the_listing(shared_data, tmp_path):
    from p2pser.experiments.centralized import prepare_pooled

    data = small_ravdess(shared_data, tmp_path / "ravdess", range(1, 5))
    with pytest.raises(UserError, match="--folds FILE or --test-speakers"):
        load_experiment(data)

    exp = load_experiment(data, test_speakers=["ravdess_02"])
    assert exp.classes == sorted(set(exp.classes)) and exp.folds_source == "--test-speakers"
    assert (exp.labels >= 0).all() and len(exp.labels) == 32
    train, test = exp.split(1)
    assert set(exp.speakers[test]) == {"ravdess_02"} and not set(exp.speakers[train]) & {"ravdess_02"}
    with pytest.raises(UserError, match="fold 2 does not exist"):
        exp.fold(2)

    write(data / "folds.json", {"classes": ["angry", "sad", "neutral"], "folds": [
        {"test_speakers": ["ravdess_01", "ravdess_02"]}, {"test_speakers": ["ravdess_03", "ravdess_04"]}]})
    exp = load_experiment(data)
    assert exp.classes == ["angry", "sad", "neutral"] and [f.number for f in exp.folds] == [1, 2]
    kept = exp.labelled
    assert [exp.corpus.utterances[i].emotion for i in kept] == [exp.classes[k] for k in exp.labels[kept]]
    assert all(exp.corpus.utterances[i].emotion not in exp.classes for i in np.flatnonzero(exp.labels < 0))
    train, test = exp.split(2)
    assert set(exp.speakers[test]) == {"ravdess_03", "ravdess_04"} and set(train) | set(test) == set(kept)

    pooled = prepare_pooled(data, FeatureSpec(kind="logmel", max_seconds=2.0), cache_dir=tmp_path / "cache",
                            workers=1, progress=False)
    f = pooled.features
    assert f.x.shape[1:] == (64, 201) and len(f) == len(kept) and f.classes == exp.classes
    split = pooled.split(2, val_fraction=0.5, seed=0)
    assert set(f.speakers[split.test]) == {"ravdess_03", "ravdess_04"} and len(split.val) > 0
    assert not set(split.val) & set(split.train)

    with pytest.raises(UserError, match="ravdess_07"):
        load_experiment(data, test_speakers=["ravdess_07"])
    with pytest.raises(UserError, match="not both"):
        load_experiment(data, folds_path=data / "folds.json", test_speakers=["ravdess_01"])


def test_centralized_and_peers_see_the_same_fold_classes_and_labels(synth_corpus, tmp_path):
    """One resolver: the pooled training set of ``p2pser train`` is exactly the union of the peers' data."""
    from p2pser.experiments.centralized import prepare_pooled

    spec = FeatureSpec(kind="logmel", max_seconds=2.0)
    pooled = prepare_pooled(synth_corpus, spec, cache_dir=tmp_path, workers=1, progress=False)
    folds, classes = load_folds(synth_corpus / "folds.json", pooled.experiment.corpus.speakers())
    assert pooled.experiment.folds == folds and pooled.classes == classes and len(pooled.features) == 288
    for fold in folds:
        split = pooled.split(fold.number)
        for scheme, n_peers in (("speaker", None), ("speaker", 2), ("iid", 3)):
            plan = make_plan(synth_corpus, RunConfig(fold=fold.number, partition=scheme), n_peers)
            assert plan.classes == pooled.classes and len(plan.peers) == (n_peers or 4)
            assert {pooled.row_of[int(i)] for p in plan.peers for i in p} == set(split.train.tolist())
            assert {pooled.row_of[int(i)] for i in plan.test} == set(split.test.tolist())
            if scheme == "speaker":  # whole speakers per peer, never a test speaker
                names = [set(pooled.experiment.speakers[p]) for p in plan.peers]
                assert sum(map(len, names)) == 4 and not set().union(*names) & set(fold.test_speakers)
