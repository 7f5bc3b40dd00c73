"""The built-in synthetic corpus: determinism, layout, balance, folds, acoustic cues and ``p2pser data synth``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from p2pser.audio.corpora import load_corpus
from p2pser.audio.synth import SYNTH_EMOTIONS, make_voices, synthesize_corpus
from p2pser.cli import main
from p2pser.errors import UserError


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_audio(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize_corpus(tmp_path / name, speakers=2, per_emotion=1, seed=seed)
    a, b, c = (contents(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 6 + 2  # wavs + manifest.csv + folds.json
    assert a == b
    wavs = [k for k in a if k.endswith(".wav")]
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in wavs)


def test_rewrites_its_own_folder_and_refuses_others(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    synthesize_corpus(out, speakers=3, per_emotion=1, seed=0)
    first = contents(out)
    synthesize_corpus(out, speakers=2, per_emotion=1, seed=0)
    second = contents(out)
    assert not (out / "synth_03").exists()  # a rerun with fewer speakers leaves no stale files behind
    assert {k: v for k, v in first.items() if k.startswith(("synth_01/", "synth_02/"))} == {
        k: v for k, v in second.items() if k.endswith(".wav")}  # fmt: skip
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("do not delete")
    with pytest.raises(UserError, match="not empty and is not a synthetic corpus"):
        synthesize_corpus(tmp_path / "mine", speakers=2, per_emotion=1)
    assert (tmp_path / "mine" / "thesis.txt").exists()


def test_speakers_do_not_depend_on_how_many_are_made() -> None:
    assert make_voices(5, seed=3)[:3] == make_voices(3, seed=3)
    assert make_voices(3, seed=3) != make_voices(3, seed=4)


def test_fixture_corpus_is_balanced_and_loadable(synth_corpus: Path) -> None:
    corpus = load_corpus(synth_corpus)
    assert corpus.name == "manifest"
    assert corpus.speakers() == [f"synth_{k:02d}" for k in range(1, 7)]
    assert corpus.emotions() == sorted(SYNTH_EMOTIONS)
    assert set(Counter((u.speaker, u.emotion) for u in corpus.utterances).values()) == {8}
    assert Counter(u.sex for u in corpus.utterances) == {"F": 144, "M": 144}
    durations = []
    for u in corpus.utterances:
        assert u.path.parent.name == u.speaker and u.path.suffix == ".wav"
        info = soundfile.info(str(u.path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        durations.append(info.duration)
    assert 0.8 < min(durations) and max(durations) < 6.0
    assert 1.5 < np.mean(durations) < 3.0


def test_folds_are_speaker_independent_and_mixed_sex(synth_corpus: Path) -> None:
    folds = json.loads((synth_corpus / "folds.json").read_text())
    assert folds["classes"] == list(SYNTH_EMOTIONS)
    tests = [f["test_speakers"] for f in folds["folds"]]
    assert len(tests) == 3
    assert sorted(s for t in tests for s in t) == [f"synth_{k:02d}" for k in range(1, 7)]
    sex = {u.speaker: u.sex for u in load_corpus(synth_corpus).utterances}
    assert all({sex[s] for s in t} == {"F", "M"} for t in tests)


def median_f0(audio: np.ndarray, sr: int) -> float:
    """Median F0 (Hz) of the loud frames, by autocorrelation peak picking (60-600 Hz); plain numpy because
    librosa's pitch trackers spend seconds compiling on first use."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::256].astype(np.float64)
    energy = (frames**2).mean(axis=1)
    frames = frames[energy > energy.max() * 0.01] * np.hanning(1024)
    spectrum = np.fft.rfft(frames, n=2048, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, : sr // 60 + 1]
    lo = sr // 600
    return float(np.median(sr / (lo + np.argmax(acf[:, lo:], axis=1))))


def test_emotions_carry_the_expected_acoustic_cues(synth_corpus: Path) -> None:
    """Anger is louder, higher and faster than sadness; fear is higher than neutral (Scherer 2003)."""
    stats: dict[str, dict[str, list[float]]] = {e: {"db": [], "f0": [], "s": []} for e in SYNTH_EMOTIONS}
    for u in load_corpus(synth_corpus).utterances:
        audio, sr = soundfile.read(u.path, dtype="float32")
        stats[u.emotion]["db"].append(10 * np.log10(np.mean(audio.astype(np.float64) ** 2)))
        stats[u.emotion]["f0"].append(12 * np.log2(median_f0(audio, sr) / 100))  # semitones re 100 Hz
        stats[u.emotion]["s"].append(len(audio) / sr)
    mean = {e: {k: float(np.mean(v)) for k, v in s.items()} for e, s in stats.items()}
    assert mean["angry"]["db"] > mean["sad"]["db"] + 6
    assert mean["angry"]["f0"] > mean["sad"]["f0"] + 3
    assert mean["fearful"]["f0"] > mean["neutral"]["f0"] + 2
    assert mean["happy"]["f0"] > mean["neutral"]["f0"] + 1.5
    assert mean["disgust"]["f0"] < mean["neutral"]["f0"]
    assert mean["sad"]["s"] > mean["angry"]["s"] * 1.2


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "corpus"
    args = ["data", "synth", str(out), "--speakers", "2", "--per-emotion", "1", "--seed", "5", "--sample-rate", "8000"]
    assert main(args) == 0
    assert "wrote 12 files, 2 speakers" in capsys.readouterr().out
    assert soundfile.info(str(next(out.rglob("*.wav")))).samplerate == 8000
    assert load_corpus(out).speakers() == ["synth_01", "synth_02"]
    for extra, message in ((["--speakers", "1"], "at least 2 speakers"),
                           (["--sample-rate", "4000"], "between 8000 and 48000")):  # fmt: skip
        assert main(["data", "synth", str(tmp_path / "other"), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p2pser: error: ") and message in lines[0]
