"""``p2pser train`` end to end on the synthetic corpus: real audio files, features, training, run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pser.cli import main
from p2pser.experiments.centralized import parse_folds
from p2pser.learn.models import build_model
from p2pser.report.run_folder import prepare_out_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pser", "train", *args], capture_output=True, text=True, check=False,
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def cache(feature_cache: Path) -> Path:
    # The session's warm cache (content-keyed: sharing it changes no result, and saves every test here
    # extracting the synthetic corpus again).
    return feature_cache


@pytest.mark.slow
def test_train_end_to_end(synth_corpus: Path, cache: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = _train([str(synth_corpus), "--fold", "1,3", "--model", "cnn1d-shallow", "--features", "mfcc",
                   "--max-seconds", "1.5", "--epochs", "5", "--threads", "1", "--workers", "1",
                   "--cache-dir", str(cache), "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "centralized" and summary["model"] == "cnn1d-shallow"
    assert summary["features"] == "mfcc"
    all_folds = json.loads((synth_corpus / "folds.json").read_text())["folds"]
    folds = [all_folds[0], all_folds[2]]
    assert [f["fold"] for f in summary["per_fold"]] == [1, 3]
    for row, fold in zip(summary["per_fold"], folds, strict=True):
        assert row["test_speakers"] == sorted(fold["test_speakers"])
        assert 0.0 <= row["ua"] <= 1.0 and 0.0 <= row["wa"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
    assert summary["ua"] == pytest.approx(sum(r["ua"] for r in summary["per_fold"]) / len(folds))
    n_classes = len(summary["classes"])
    # Emotions of synthetic voices are learnable: well above chance after a few epochs.
    assert summary["ua"] > 1.5 / n_classes
    assert sum(map(sum, summary["confusion"])) == sum(r["n_test"] for r in summary["per_fold"])
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model loads with the safe loader into a freshly built model of the same kind
    state = torch.load(out / "fold-1" / "model.pt", weights_only=True)
    spec = summary["feature_spec"]
    frames = 1 + round(spec["max_seconds"] * spec["sample_rate"]) // round(spec["sample_rate"] * spec["hop_ms"] / 1000)
    build_model("cnn1d-shallow", 3 * spec["n_mfcc"], frames, n_classes).load_state_dict(state)
    metrics = json.loads((out / "fold-1" / "metrics.json").read_text())
    assert len(metrics["history"]) == 5 and "confusion" in metrics
    assert "UA" in proc.stdout and "mean" in proc.stdout


def test_same_seed_same_result_and_validation_picks_an_epoch(synth_corpus: Path, cache: Path, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        code = main([
            "train", str(synth_corpus), "--fold", "2", "--model", "svm", "--features", "mfcc",
            "--max-seconds", "1.5", "--epochs", "4", "--val-fraction", "0.2", "--seed", "3", "--threads", "1",
            "--workers", "1", "--cache-dir", str(cache), "--no-progress", "--out", str(tmp_path / name),
        ])
        assert code == 0
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert runs[0]["per_fold"][0]["ua"] == runs[1]["per_fold"][0]["ua"]
    assert runs[0]["confusion"] == runs[1]["confusion"]
    metrics = json.loads((tmp_path / "a" / "fold-2" / "metrics.json").read_text())
    assert metrics["n_val"] > 0 and all("val_ua" in row for row in metrics["history"])
    assert 1 <= metrics["epoch"] <= 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--features", "wav2vec"], "unknown feature kind 'wav2vec'"),
        (["--test-speakers", "nobody_1"], "nobody_1"),
        (["--fold", "9"], "fold [9] does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(synth_corpus, cache, tmp_path, capsys, args, message):
    code = main(["train", str(synth_corpus), "--epochs", "1", "--features", "mfcc", "--max-seconds", "1.5",
                 "--workers", "1", "--cache-dir", str(cache), "--no-progress", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("p2pser: error:") and err.count("\n") == 1


def test_missing_folder_and_unwritable_out(tmp_path, capsys, synth_corpus):
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", str(synth_corpus), "--out", str(blocker / "run")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(Exception, match="already holds a run"):
        prepare_out_dir(tmp_path)


def test_parse_folds():
    assert parse_folds("all", 3) == [1, 2, 3]
    assert parse_folds("3,1", 3) == [3, 1]
    assert parse_folds(2, 3) == [2]
    with pytest.raises(Exception, match="does not exist"):
        parse_folds("0", 3)
