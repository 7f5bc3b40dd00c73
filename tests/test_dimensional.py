"""Dimensional emotions (arousal, valence, dominance) by regression, on real speech: BAVED's files by their
own names and through manifests, CCC, the task in training, simulation and a real two-peer launch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pser.audio.corpora import describe, load_corpus
from p2pser.errors import UserError
from p2pser.learn.losses import ccc_loss
from p2pser.learn.tasks import MultiTask, Regression, task_named
from p2pser.partition.experiment import load_experiment

# Three BAVED speakers who speak every word at every activation level (7 words x 3 levels each).
SPEAKERS = ("baved_017", "baved_046", "baved_048")
TEST_SPEAKER = "baved_048"


@pytest.fixture(scope="module")
def baved(shared_data) -> Path:
    return shared_data / "baved"


def baved_rows(baved: Path) -> list[dict]:
    with (baved / "MANIFEST.tsv").open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def small_baved(baved, tmp_path_factory) -> Path:
    """A dimensional-only manifest (no emotion column) over the real audio of three BAVED speakers."""
    folder = tmp_path_factory.mktemp("baved_small")
    lines = ["file,speaker,sex,arousal[-1:1]"]
    for row in baved_rows(baved):
        if row["speaker"] in SPEAKERS:
            lines.append(f"{baved / row['file']},{row['speaker']},{row['sex']},{row['arousal']}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def p2pser(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pser", *map(str, args)], capture_output=True, text=True,
                          check=False, **kw)


def test_baved_reader_agrees_with_its_manifest(baved):
    corpus = load_corpus(baved)
    assert corpus.name == "baved" and len(corpus.utterances) == 1935 and not corpus.skipped
    expected = {row["file"]: row for row in baved_rows(baved)}
    for u in corpus.utterances:
        row = expected[u.path.relative_to(baved).as_posix()]
        assert (u.speaker, u.sex, u.age, u.arousal) == (row["speaker"], row["sex"], float(row["age"]),
                                                        float(row["arousal"]))
        assert u.emotion == "" and u.valence is None
    assert corpus.emotions() == [] and corpus.dimensions() == ["arousal"]
    assert corpus.range_of("arousal") == (-1.0, 1.0)


def test_dimensional_only_manifest_loads_and_data_info_shows_it(small_baved):
    corpus = load_corpus(small_baved)
    assert len(corpus.utterances) == 63 and corpus.dimensions() == ["arousal"]
    assert corpus.declared_ranges == {"arousal": (-1.0, 1.0)}
    dims = describe(corpus)["dimensions"]["arousal"]
    assert dims["labelled"] == 63 and dims["declared"] and dims["range"] == [-1.0, 1.0]
    assert dims["mean"] == pytest.approx(0.0) and dims["speaker_means_std"] == pytest.approx(0.0)

    experiment = load_experiment(small_baved, test_speakers=[TEST_SPEAKER], task="dimensional")
    assert experiment.targets.shape == (63, 1) and experiment.targets.dtype == np.float32
    assert sorted(np.unique(experiment.targets)) == [-1.0, 0.0, 1.0] and len(experiment.labelled) == 63
    with pytest.raises(UserError, match="has 0 emotion categories.*use --task dimensional"):
        load_experiment(small_baved, test_speakers=[TEST_SPEAKER], task="categorical")

    shown = p2pser("data", "info", small_baved, timeout=120)
    assert shown.returncode == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if row.startswith("arousal"))
    assert "-1..1 (decl.)" in line and " 63 " in line


def test_a_non_numeric_arousal_is_one_line_naming_file_and_row(small_baved, tmp_path):
    rows = (small_baved / "manifest.csv").read_text().splitlines()
    name, *rest = rows[3].split(",")
    rows[3] = ",".join([name, *rest[:-1], "high"])
    bad = tmp_path / "manifest.csv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=rf"manifest {bad} line 4: arousal 'high' is not a number"):
        load_corpus(bad)
    result = p2pser("data", "info", bad, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and str(bad) in message[0] and "line 4" in message[0] and "'high'" in message[0]


def test_manifest_dimensions_on_their_own_scale(tmp_path, baved):
    files = sorted((baved / "0").glob("*.flac"))[:3]
    (tmp_path / "m.tsv").write_text("file\tspeaker\temotion\tvalence\tdominance[1:5]\n"
                                    f"{files[0]}\ts1\tangry\t2\t4\n{files[1]}\ts1\t\t8\t\n{files[2]}\ts2\tsad\t\t\n")
    corpus = load_corpus(tmp_path / "m.tsv")
    assert [u.emotion for u in corpus.utterances] == ["angry", "", "sad"]
    assert corpus.range_of("valence") == (2.0, 8.0) and corpus.range_of("dominance") == (1.0, 5.0)
    (tmp_path / "m.tsv").write_text(f"file\tspeaker\tdominance[1:5]\n{files[0]}\ts1\t6\n")
    with pytest.raises(UserError, match="line 2: dominance 6 lies outside its declared scale 1..5"):
        load_corpus(tmp_path / "m.tsv")
    (tmp_path / "m.tsv").write_text(f"file\tspeaker\temotion\tarousal\n{files[0]}\ts1\t\t\n")
    with pytest.raises(UserError, match="line 2: no emotion and no arousal value"):
        load_corpus(tmp_path / "m.tsv")


def test_ccc_of_a_perfect_and_a_constant_predictor():
    y = np.random.default_rng(0).uniform(-1, 1, size=(40, 1))
    task = Regression(dimensions=("arousal",))
    assert task.score(y, y)["ccc_arousal"] == pytest.approx(1.0)
    constant = task.score(y, np.full_like(y, y.mean()))
    assert constant["ccc"] == pytest.approx(0.0) and constant["pearson_arousal"] == 0.0
    centred = y - y.mean()
    assert task.score(centred, -centred)["ccc"] == pytest.approx(-1.0)  # perfectly wrong
    # The training loss is 1 - CCC: 0 for the perfect predictor, 1 for a constant one.
    target = torch.tensor(y, dtype=torch.float32)
    assert float(ccc_loss(target, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(ccc_loss(torch.zeros_like(target), target)) == pytest.approx(1.0, abs=1e-6)


def test_multi_task_scores_categories_and_dimensions_side_by_side():
    task = task_named("both", ["arousal"])
    assert isinstance(task, MultiTask) and task.headline == ("ua", "ccc") and task.n_outputs(3) == 4
    y = np.array([[0, -0.5], [1, 0.5], [2, 1.0], [-1, 0.0]], dtype=np.float32)  # the last row: no category
    outputs = np.array([[3, 0, 0, -0.5], [0, 3, 0, 0.5], [0, 0, 3, 1.0], [3, 0, 0, 0.0]], dtype=np.float32)
    report = task.score(y, outputs, ["a", "b", "c"])
    assert report["ua"] == 1.0 and report["n"] == 3 and report["ccc_arousal"] == pytest.approx(1.0)
    assert set(task.test_row(report)) >= {"test_ua", "test_ccc", "test_ccc_arousal", "test_mae_arousal"}


def test_train_writes_ccc_per_fold_and_their_mean(small_baved, tmp_path):
    out = tmp_path / "train"
    result = p2pser("train", small_baved, "--test-speakers", TEST_SPEAKER, "--task", "dimensional",
                    "--features", "mfcc", "--model", "svm", "--normalizer", "global", "--epochs", "30", "--max-seconds", "2", "--workers", "1",
                    "--cache-dir", tmp_path / "cache", "--no-progress", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "dimensional" and summary["dimensions"] == ["arousal"]
    fold = summary["per_fold"][0]
    for key in ("ccc", "ccc_arousal", "pearson_arousal", "mae_arousal"):
        assert key in summary and key in fold
    assert "ccc_valence" not in summary and summary["ccc"] == summary["ccc_arousal"] == fold["ccc"]
    assert summary["ccc"] > 0.3, summary["ccc"]  # loudness and pitch carry activation even across speakers
    assert "arousal" in result.stdout and summary["confusion"] is None


@pytest.mark.slow
def test_two_real_peers_learn_arousal_by_gossip(small_baved, tmp_path):
    from test_launch import topology_file

    topology = topology_file(tmp_path, "ring", 2)
    out = tmp_path / "run"
    result = p2pser("launch", topology, small_baved, "--test-speakers", TEST_SPEAKER, "--task", "dimensional",
                    "--features", "mfcc", "--model", "svm", "--normalizer", "global", "--rounds", "12",
                    "--local-steps", "4", "--eval-every", "4", "--final-mixing", "4", "--batch-size", "8", "--max-seconds", "2",
                    "--cache-dir", tmp_path / "cache", "--quiet", "--out", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "launch" and summary["task"] == "dimensional" and summary["peers"] == 2
    for key in ("ccc_mean", "ccc_min", "ccc_max", "ccc_average_model", "ccc_arousal_mean",
                "ccc_arousal_average_model"):
        assert summary[key] is not None and np.isfinite(summary[key]), key
    assert all(np.isfinite(p["ccc"]) for p in summary["per_peer"])
    assert summary["ccc_min"] <= summary["ccc_mean"] and summary["ccc_mean"] > 0.2, summary
    # The regression head is averaged like every other parameter: the peers end on one model.
    assert summary["consensus_distance_last"] < 0.01 * summary["consensus_distance_first"]
    rows = [json.loads(line) for line in (out / "peer-000" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ccc" in r for r in rows) and "test_ccc_arousal" in rows[-1]
    assert (out / "ccc_per_peer.png").stat().st_size > 0


def test_a_dimension_too_sparse_to_score_leaves_no_field():
    task = Regression(dimensions=("arousal", "valence"))
    report = task.score(np.array([[0.5, np.nan]]), np.array([[0.1, 0.2]]))  # one utterance: no CCC at all
    assert np.isnan(report["ccc"]) and task.test_row(report) == {}


@pytest.mark.parametrize("model", ["svm", "mlp"])  # batched in one process, and the automatic worker choice
def test_simulate_chooses_its_learner_processes_for_a_task_without_classes(small_baved, tmp_path, model):
    """`simulate`'s default --workers and --batch-peers build a model to size the run: with the task's outputs
    (one per dimension here), not with the number of classes, which a dimensional-only corpus does not have."""
    from p2pser.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", str(small_baved), "--test-speakers", TEST_SPEAKER, "--task", "dimensional",
                 "--features", "mfcc", "--model", model, "--max-seconds", "2", "--rounds", "1", "--final-mixing", "0",
                 "--local-steps", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "dimensional" and summary["ccc_mean"] is not None
