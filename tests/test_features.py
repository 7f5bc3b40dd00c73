"""Feature extraction on real RAVDESS audio: shapes, the content-keyed cache, bad files, Normalizer, CLI."""

from __future__ import annotations

import builtins
import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from p2pser.audio.corpora import Utterance
from p2pser.cli import main
from p2pser.errors import UserError
from p2pser.features import extract
from p2pser.features.cache import Cache, Index, default_cache_dir
from p2pser.features.extract import extract_features
from p2pser.features.kinds import KINDS, Kind
from p2pser.features.normalize import Normalizer
from p2pser.features.spec import FeatureSpec


def manifest_utterances(root: Path, step: int = 1, limit: int | None = None) -> list[Utterance]:
    with open(root / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))[::step][:limit]
    return [Utterance(root / r["file"], r["speaker"], r["emotion"], r["sex"]) for r in rows]


@pytest.fixture(scope="module")
def few(shared_data: Path) -> list[Utterance]:
    """Six RAVDESS files spread over actors and emotions."""
    return manifest_utterances(shared_data / "ravdess", step=131, limit=6)


def copy_utterances(utts: list[Utterance], folder: Path) -> list[Utterance]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for u in utts:
        shutil.copy(u.path, folder / u.path.name)
        out.append(Utterance(folder / u.path.name, u.speaker, u.emotion, u.sex))
    return out


@pytest.mark.parametrize(
    ("kind", "channels"), [("mfcc", 120), ("logmel", 64), ("chroma", 12), ("spectral", 13), ("mfcc+chroma", 132)]
)
def test_shapes_per_kind(few, tmp_path_factory, kind, channels):
    spec = FeatureSpec(kind=kind)
    fs = extract_features(few, spec, cache_dir=tmp_path_factory.mktemp("cache"), workers=1, progress=False)
    assert spec.channels == channels and spec.frames == 401
    assert fs.x.shape == (len(few), channels, 401) and fs.x.dtype == np.float32
    assert np.isfinite(fs.x).all()
    assert fs.labels.dtype == np.int64 and fs.lengths.dtype == np.int64
    assert fs.classes == sorted({u.emotion for u in few})
    assert [fs.classes[i] for i in fs.labels] == [u.emotion for u in few]
    assert list(fs.speakers) == [u.speaker for u in few]
    for row, n in zip(fs.x, fs.lengths):
        assert 25 <= n <= 401  # >= min_seconds of sound after trimming
        assert not row[:, n:].any() and row[:, :n].std(axis=1).max() > 0


def test_a_new_kind_is_one_registry_entry_at_frame_or_utterance_level(few, tmp_path, monkeypatch):
    """What the registry promises a future kind (a frame-level descriptor, openSMILE-style functionals):
    one entry is enough to extract it, cache it under its own key and combine it (or refuse to)."""
    import librosa

    def energy(a):  # frame level: [1, T], on the shared spectrogram
        return librosa.feature.rms(S=a.magnitude, frame_length=a.spec.n_fft)

    def functionals(a):  # utterance level: [C] per utterance, no time axis
        return np.concatenate([a.logmel.mean(axis=1), a.logmel.std(axis=1)])

    monkeypatch.setitem(KINDS, "energy", Kind("energy", lambda s: 1, energy))
    monkeypatch.setitem(KINDS, "functionals", Kind("functionals", lambda s: 2 * s.n_mels, functionals,
                                                    settings=("n_mels",), level="utterance"))
    cache = tmp_path / "cache"
    both = extract_features(few, FeatureSpec(kind="logmel+energy"), cache_dir=cache, workers=1, progress=False)
    logmel = extract_features(few, FeatureSpec(kind="logmel"), cache_dir=cache, workers=1, progress=False)
    assert both.x.shape == (len(few), 65, 401) and logmel.stats["extracted"] == 0  # logmel was cached with it
    assert np.array_equal(both.x[:, :64], logmel.x) and np.array_equal(both.lengths, logmel.lengths)

    spec = FeatureSpec(kind="functionals")
    fs = extract_features(few, spec, cache_dir=cache, workers=1, progress=False)
    assert spec.level == "utterance" and spec.frames == 1 and fs.x.shape == (len(few), 128, 1)
    assert (fs.lengths == 1).all() and np.isfinite(fs.x).all()
    # The mean over frames of the (trimmed, full-length) log-mel spectrogram, from the cached logmel part.
    full = Cache(cache, FeatureSpec(kind="logmel"))
    digest = Index(cache / "index.json").entries[os.path.abspath(few[0].path)][3]
    assert np.allclose(fs.x[0, :64, 0], full.load_part(digest, "logmel").mean(axis=1), atol=1e-4)
    again = extract_features(few, FeatureSpec(kind="functionals", n_mels=32, n_mfcc=13), cache_dir=cache, workers=1,
                             progress=False)
    assert again.x.shape == (len(few), 64, 1) and again.stats["extracted"] == len(few)  # its own cache key
    with pytest.raises(UserError, match="frame-level and utterance-level"):
        FeatureSpec(kind="mfcc+functionals")


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(UserError) as exc:
        FeatureSpec(kind="mfcc+formants")  # pitch is a kind now (issue 14)
    assert all(k in str(exc.value) for k in KINDS)
    with pytest.raises(UserError):
        FeatureSpec(kind="mfcc+mfcc")
    with pytest.raises(UserError):
        FeatureSpec(n_mfcc=80, n_mels=64)


def test_warm_run_opens_no_audio_file(few, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cold = extract_features(few, FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    assert cold.stats["extracted"] == len(few) and cold.stats["from_cache"] == 0

    audio = {os.path.abspath(u.path) for u in few}
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else str(file))
        return real_open(file, *args, **kwargs)

    def no_decode(*args, **kwargs):
        raise AssertionError("audio decoded on a warm run")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(soundfile, "read", no_decode)
    files_before = sorted(cache.rglob("*"))
    warm = extract_features(few, FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    monkeypatch.undo()

    assert opened and not audio & set(opened)  # the cache files were opened, no audio file was
    assert sorted(cache.rglob("*")) == files_before
    assert warm.stats["from_cache"] == len(few) and warm.stats["hashed"] == 0 and warm.stats["extracted"] == 0
    np.testing.assert_array_equal(warm.x, cold.x)
    np.testing.assert_array_equal(warm.lengths, cold.lengths)


def test_changing_length_or_adding_a_part_reuses_the_cache(few, tmp_path):
    cache = tmp_path / "cache"
    full = extract_features(few, FeatureSpec(kind="mfcc"), cache_dir=cache, workers=1, progress=False)
    short = extract_features(few, FeatureSpec(kind="mfcc", max_seconds=1.0), cache_dir=cache, workers=1,
                             progress=False)
    assert short.stats["extracted"] == 0 and short.x.shape == (len(few), 120, 101)
    np.testing.assert_array_equal(short.x, full.x[:, :, :101])
    assert (short.lengths == np.minimum(full.lengths, 101)).all()

    both = extract_features(few, FeatureSpec(kind="mfcc+logmel"), cache_dir=cache, workers=1, progress=False)
    assert both.stats["extracted"] == len(few)  # only logmel was computed, mfcc came from the cache
    np.testing.assert_array_equal(both.x[:, :120], full.x)


def test_cache_invalidated_when_file_content_changes(few, tmp_path):
    first, second = copy_utterances(few[:2], tmp_path / "audio")
    cache = tmp_path / "cache"
    before = extract_features([first], FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    stat = first.path.stat()
    shutil.copyfile(second.path, first.path)  # same path, new content and mtime
    os.utime(first.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = extract_features([first], FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    reference = extract_features([second], FeatureSpec(), cache_dir=tmp_path / "other", workers=1, progress=False)
    assert after.stats["hashed"] == 1 and after.stats["extracted"] == 1
    assert not np.array_equal(after.x, before.x)
    np.testing.assert_array_equal(after.x, reference.x)


def test_damaged_index_only_costs_a_rehash(few, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = extract_features(few[:2], FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    (cache / "index.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="p2pser.features.extract"):
        again = extract_features(few[:2], FeatureSpec(), cache_dir=cache, workers=1, progress=False)
    assert any("unreadable feature cache index" in r.getMessage() for r in caplog.records)
    assert again.stats["hashed"] == 2 and again.stats["extracted"] == 0
    np.testing.assert_array_equal(again.x, first.x)
    assert json.loads((cache / "index.json").read_text())["entries"]  # rewritten


def test_identical_content_is_extracted_once(few, tmp_path):
    a = copy_utterances(few[:1], tmp_path / "a")[0]
    b = copy_utterances(few[:1], tmp_path / "b")[0]
    fs = extract_features([a, b], FeatureSpec(), cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert fs.stats["hashed"] == 2 and fs.stats["extracted"] == 1
    np.testing.assert_array_equal(fs.x[0], fs.x[1])


def test_bad_files_are_skipped_with_reasons(few, tmp_path, caplog):
    folder = tmp_path / "audio"
    good = copy_utterances(few[:3], folder)
    rng = np.random.default_rng(0)
    (folder / "corrupt.wav").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.flac").write_text("these are not audio samples\n" * 20)
    soundfile.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    soundfile.write(folder / "click.wav", 0.5 * rng.standard_normal(300).astype(np.float32), 16000)  # 19 ms
    soundfile.write(folder / "brief.wav", 0.5 * rng.standard_normal(2400).astype(np.float32), 16000)  # 150 ms
    bad = ["corrupt.wav", "empty.wav", "notes.flac", "silent.wav", "click.wav", "brief.wav", "missing.wav"]
    utts = good + [Utterance(folder / name, "ravdess_99", "angry") for name in bad]

    expected = {
        "corrupt.wav": "not readable audio", "empty.wav": "empty file", "notes.flac": "not readable audio",
        "silent.wav": "silent", "click.wav": "too short", "brief.wav": "too short", "missing.wav": "cannot read",
    }
    for run in ("cold", "warm"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="p2pser.features.extract"):
            fs = extract_features(utts, FeatureSpec(), cache_dir=tmp_path / "cache", workers=1, progress=False)
        assert [u.path for u in fs.utterances] == [u.path for u in good], run
        assert fs.x.shape[0] == 3 and fs.stats["skipped"] == len(bad)
        reasons = {Path(path).name: reason for path, reason in fs.skipped}
        for name, words in expected.items():
            assert words in reasons[name], (run, name, reasons[name])
        lines = [r.getMessage() for r in caplog.records]
        for name in bad:
            assert sum(name in line for line in lines) == 1, (run, name)
        assert any(f"skipped {len(bad)} of {len(utts)} files" in line for line in lines)


def test_all_files_unusable_is_a_user_error(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 audio files"):
        extract_features([Utterance(tmp_path / "a.wav", "s1", "sad")], FeatureSpec(), cache_dir=tmp_path / "c",
                         workers=1, progress=False)


def test_resampling_and_stereo_mixdown_match_the_mono_original(few, tmp_path):
    import librosa

    y, sr = soundfile.read(few[0].path, dtype="float32")
    y44 = librosa.resample(y, orig_sr=sr, target_sr=44100)
    soundfile.write(tmp_path / "stereo44k.wav", np.stack([y44, y44], axis=1), 44100, subtype="FLOAT")
    twin = Utterance(tmp_path / "stereo44k.wav", few[0].speaker, few[0].emotion)
    fs = extract_features([few[0], twin], FeatureSpec(kind="logmel"), cache_dir=tmp_path / "c", workers=1,
                          progress=False)
    a, b = fs.x
    n = min(fs.lengths)
    assert abs(int(fs.lengths[0]) - int(fs.lengths[1])) <= 2
    # Trimming may shift the start by a frame; compare at the best alignment.
    err = min(np.abs(a[:, s : n - 2] - b[:, : n - 2 - s]).mean() for s in range(3))
    err = min(err, *(np.abs(b[:, s : n - 2] - a[:, : n - 2 - s]).mean() for s in range(3)))
    assert err < 1.0  # dB, against typical values of -20..-80


def test_level_normalisation_removes_recording_gain(few, tmp_path):
    y, sr = soundfile.read(few[1].path, dtype="float32")
    soundfile.write(tmp_path / "loud.wav", y, sr, subtype="FLOAT")
    soundfile.write(tmp_path / "quiet.wav", y * 0.01, sr, subtype="FLOAT")  # -40 dB
    utts = [Utterance(tmp_path / n, "s", "sad") for n in ("loud.wav", "quiet.wav")]
    for normalize, gap in (("rms", 0.0), ("peak", 0.0), ("none", 40.0)):
        fs = extract_features(utts, FeatureSpec(kind="logmel", normalize=normalize), cache_dir=tmp_path / "c",
                              workers=1, progress=False)
        n = fs.lengths[0]
        assert fs.lengths[0] == fs.lengths[1]
        diff = np.median(fs.x[0, :, :n] - fs.x[1, :, :n])
        assert abs(diff - gap) < 0.5, (normalize, diff)


def test_classes_fix_label_order_and_drop_others(few, tmp_path, caplog):
    classes = sorted({u.emotion for u in few}, reverse=True)[:2]
    with caplog.at_level(logging.WARNING):
        fs = extract_features(few, FeatureSpec(), classes=classes, cache_dir=tmp_path, workers=1, progress=False)
    kept = [u for u in few if u.emotion in classes]
    assert fs.classes == classes and [u.path for u in fs.utterances] == [u.path for u in kept]
    assert [classes[i] for i in fs.labels] == [u.emotion for u in kept]
    assert fs.stats["dropped_by_class"] == len(few) - len(kept)
    assert any(f"dropped {len(few) - len(kept)} utterances" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_worker_processes_give_the_same_features(shared_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(extract, "_MIN_FILES_PER_WORKER", 30)  # a real 2-process pool for a small job
    utts = manifest_utterances(shared_data / "ravdess", step=23, limit=60)
    with caplog.at_level(logging.INFO, logger="p2pser.features.extract"):
        pool = extract_features(utts, FeatureSpec(), cache_dir=tmp_path / "a", workers=2, progress=False)
    assert any("60 files in 2 worker processes" in r.getMessage() for r in caplog.records)
    local = extract_features(utts, FeatureSpec(), cache_dir=tmp_path / "b", workers=1, progress=False)
    assert pool.stats["extracted"] == local.stats["extracted"] == len(utts)
    np.testing.assert_array_equal(pool.x, local.x)


def test_unwritable_cache_dir_is_a_user_error(few, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--cache-dir"):
        extract_features(few, FeatureSpec(), cache_dir=tmp_path / "file" / "cache", workers=1, progress=False)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("P2PSER_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("P2PSER_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "p2pser" / "features"


def test_normalizer_uses_valid_frames_only():
    rng = np.random.default_rng(1)
    x = np.zeros((3, 4, 50), dtype=np.float32)
    lengths = np.array([50, 20, 35])
    for i, n in enumerate(lengths):
        x[i, :, :n] = rng.normal([[5.0], [-3.0], [0.0], [7.0]], [[2.0], [0.5], [1.0], [1e-9]], size=(4, n))
    x[:, 3, :] = np.where(np.arange(50) < lengths[:, None], 7.0, 0.0)  # a constant channel
    norm = Normalizer.fit(x, lengths)
    valid = np.concatenate([x[i, :, :n] for i, n in enumerate(lengths)], axis=1)
    np.testing.assert_allclose(norm.mean, valid.mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std[:3], valid.std(axis=1)[:3], rtol=1e-5)
    assert norm.std[3] == 1.0

    out = norm.apply(x, lengths)
    assert out.dtype == np.float32 and out.shape == x.shape
    z = np.concatenate([out[i, :, :n] for i, n in enumerate(lengths)], axis=1)
    np.testing.assert_allclose(z[:3].mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(z[:3].std(axis=1), 1, atol=1e-4)
    assert not out[1, :, 20:].any() and not out[2, :, 35:].any()

    again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(again.apply(x), norm.apply(x))
    with pytest.raises(UserError):
        Normalizer.from_dict({"mean": [0.0, 1.0], "std": [1.0]})
    with pytest.raises(UserError):
        Normalizer.from_dict({"mean": [0.0]})


def ravdess_folder(shared_data: Path, dest: Path, step: int = 96) -> Path:
    """A small RAVDESS-layout copy (original names), as a user's download would look."""
    for u in manifest_utterances(shared_data / "ravdess", step=step):
        target = dest / u.path.parent.name / u.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(u.path, target)
    return dest


def test_cli_features_prints_counts_and_fills_cache(shared_data, tmp_path, capsys):
    data = ravdess_folder(shared_data, tmp_path / "ravdess")
    (data / "Actor_01" / "03-01-05-01-01-01-01.flac").write_bytes(b"")  # a broken download
    argv = ["features", str(data), "--kind", "logmel", "--max-seconds", "3", "--workers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "x [15, 64, 301]" in text and "15 extracted, 0 from cache" in text
    assert "03-01-05-01-01-01-01.flac: empty file" in text
    assert main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [15, 64, 301] and summary["from_cache"] == 16 and summary["skipped"] == 1


def test_cli_bad_kind_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "p2pser", "features", str(tmp_path), "--kind", "formants"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown feature kind 'formants'" in proc.stderr
