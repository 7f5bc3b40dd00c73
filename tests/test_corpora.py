"""Corpus readers against the real RAVDESS/EmoDB copies, synthesized CREMA-D/TESS/SAVEE files, manifests,
bad input and the ``p2pser data info`` command."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from p2pser.audio.corpora import EMOTIONS, describe, format_description, load_corpus
from p2pser.cli import main
from p2pser.errors import UserError


def write_audio(path: Path, seconds: float = 0.2, sr: int = 16000) -> Path:
    """A short real audio file (tone plus noise) in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    audio = 0.1 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(0).normal(size=t.size)
    soundfile.write(path, audio, sr, subtype="PCM_16")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pser", *args], capture_output=True, text=True, timeout=120, check=False)


def read_manifest_tsv(path: Path) -> dict[str, tuple[str, str, str]]:
    with path.open(newline="") as fh:
        return {r["file"]: (r["speaker"], r["emotion"], r["sex"]) for r in csv.DictReader(fh, delimiter="\t")}


def labels(corpus) -> dict[str, tuple[str, str, str | None]]:
    return {u.path.relative_to(corpus.root).as_posix(): (u.speaker, u.emotion, u.sex) for u in corpus.utterances}


# --- real corpora: parsed from file names, checked against MANIFEST.tsv ---------------------------------


@pytest.mark.parametrize("name, files, speakers", [("ravdess", 1440, 24), ("emodb", 535, 10)])
def test_real_corpus_names_agree_with_manifest(shared_data: Path, name: str, files: int, speakers: int) -> None:
    corpus = load_corpus(shared_data / name)
    # The folder also holds MANIFEST.tsv: auto-detection must still parse the file names.
    assert corpus.name == name
    assert corpus.skipped == []
    expected = read_manifest_tsv(shared_data / name / "MANIFEST.tsv")
    assert len(expected) == files
    assert labels(corpus) == expected
    assert len(corpus.speakers()) == speakers
    assert set(corpus.emotions()) <= set(EMOTIONS)


def test_forced_manifest_layout_reads_the_tsv(shared_data: Path) -> None:
    corpus = load_corpus(shared_data / "emodb", layout="manifest")
    assert corpus.name == "manifest"
    assert labels(corpus) == labels(load_corpus(shared_data / "emodb"))


def test_describe_emodb(shared_data: Path) -> None:
    desc = describe(load_corpus(shared_data / "emodb"))
    assert desc["corpus"] == "emodb"
    assert desc["files"] == 535
    assert len(desc["speakers"]) == 10 and sum(desc["speakers"].values()) == 535
    assert desc["speaker_sex"] == {"F": 5, "M": 5}
    assert desc["emotions"]["angry"] == 127 and sum(desc["emotions"].values()) == 535
    assert desc["duration_s"] == pytest.approx(1487.09, abs=1.0)  # 24:47.09 per SOURCE.md
    assert desc["sample_rates"] == {"16000": 535}
    text = format_description(desc)
    assert "emodb" in text and "boredom" in text and "24.8 min" in text


# --- other corpora from their naming conventions ----------------------------------------------------------


def test_crema_d(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("1001_DFA_ANG_XX.wav", "1002_IEO_HAP_HI.wav", "1091_TSI_FEA_LO.flac", "1045_WSI_SAD_MD.wav",
                 "1003_ITS_DIS_XX.wav", "1004_TAI_NEU_XX.wav"):  # fmt: skip
        write_audio(tmp_path / "AudioWAV" / name)
    write_audio(tmp_path / "AudioWAV" / "notes.wav")
    write_audio(tmp_path / "AudioWAV" / "._1001_DFA_ANG_XX.wav")  # macOS metadata twin: ignored silently
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus(tmp_path)
    assert corpus.name == "crema-d"
    assert labels(corpus) == {
        "AudioWAV/1001_DFA_ANG_XX.wav": ("crema-d_1001", "angry", "M"),
        "AudioWAV/1002_IEO_HAP_HI.wav": ("crema-d_1002", "happy", "F"),
        "AudioWAV/1003_ITS_DIS_XX.wav": ("crema-d_1003", "disgust", "F"),
        "AudioWAV/1004_TAI_NEU_XX.wav": ("crema-d_1004", "neutral", "F"),
        "AudioWAV/1045_WSI_SAD_MD.wav": ("crema-d_1045", "sad", "M"),
        "AudioWAV/1091_TSI_FEA_LO.flac": ("crema-d_1091", "fearful", "F"),
    }
    assert [p.name for p in corpus.skipped] == ["notes.wav"]
    assert "skipped 1 audio files" in caplog.text


def test_crema_d_sex_table_matches_published_counts() -> None:
    from p2pser.audio.corpora import CREMA_D_FEMALE

    assert len(CREMA_D_FEMALE) == 43 and all(1001 <= a <= 1091 for a in CREMA_D_FEMALE)  # 43 F, 48 M


def test_tess(tmp_path: Path) -> None:
    for rel in ("OAF_angry/OAF_back_angry.wav", "OAF_Pleasant_surprise/OAF_back_ps.wav",
                "YAF_fear/YAF_neat_fear.wav", "YAF_sad/YAF_chair_sad.WAV", "YAF_disgust/YAF_bean_disgust.wav",
                "OAF_neutral/OA_bite_neutral.wav"):  # fmt: skip
        write_audio(tmp_path / rel)
    corpus = load_corpus(tmp_path)
    assert corpus.name == "tess"
    assert labels(corpus) == {
        "OAF_angry/OAF_back_angry.wav": ("tess_OAF", "angry", "F"),
        "OAF_Pleasant_surprise/OAF_back_ps.wav": ("tess_OAF", "surprised", "F"),
        "YAF_fear/YAF_neat_fear.wav": ("tess_YAF", "fearful", "F"),
        "YAF_sad/YAF_chair_sad.WAV": ("tess_YAF", "sad", "F"),
        "YAF_disgust/YAF_bean_disgust.wav": ("tess_YAF", "disgust", "F"),
        # The release misnames this one file; its folder says whose it is.
        "OAF_neutral/OA_bite_neutral.wav": ("tess_OAF", "neutral", "F"),
    }


def test_savee_flat_and_original_layouts(tmp_path: Path) -> None:
    flat = ("DC_a01.wav", "JE_sa03.wav", "JK_su15.wav", "KL_n30.flac", "DC_d02.wav", "JE_f04.wav", "KL_h05.wav")
    for name in flat:
        write_audio(tmp_path / "flat" / name)
    corpus = load_corpus(tmp_path / "flat")
    assert corpus.name == "savee"
    assert labels(corpus) == {
        "DC_a01.wav": ("savee_DC", "angry", "M"), "JE_sa03.wav": ("savee_JE", "sad", "M"),
        "JK_su15.wav": ("savee_JK", "surprised", "M"), "KL_n30.flac": ("savee_KL", "neutral", "M"),
        "DC_d02.wav": ("savee_DC", "disgust", "M"), "JE_f04.wav": ("savee_JE", "fearful", "M"),
        "KL_h05.wav": ("savee_KL", "happy", "M"),
    }  # fmt: skip
    for rel in ("AudioData/DC/a01.wav", "AudioData/KL/su02.wav"):
        write_audio(tmp_path / "orig" / rel)
    assert labels(load_corpus(tmp_path / "orig")) == {
        "AudioData/DC/a01.wav": ("savee_DC", "angry", "M"),
        "AudioData/KL/su02.wav": ("savee_KL", "surprised", "M"),
    }


def test_forced_layout_skips_other_names(tmp_path: Path) -> None:
    write_audio(tmp_path / "03a01Fa.wav")
    write_audio(tmp_path / "DC_a01.wav")
    with pytest.raises(UserError, match="cannot tell which corpus"):
        load_corpus(tmp_path)
    corpus = load_corpus(tmp_path, layout="emodb")
    assert labels(corpus) == {"03a01Fa.wav": ("emodb_03", "happy", "M")}
    assert [p.name for p in corpus.skipped] == ["DC_a01.wav"]


# --- manifests ----------------------------------------------------------------------------------------------


def test_manifest_csv_with_optional_columns(tmp_path: Path) -> None:
    write_audio(tmp_path / "a" / "one.wav")
    write_audio(tmp_path / "two.flac")
    (tmp_path / "labels.csv").write_text(
        "file,speaker,emotion,sex,arousal,valence,dominance,comment\n"
        "a/one.wav,spk1,Anger,female,0.8,-0.5,0.6,loud\n"
        f"{tmp_path / 'two.flac'},spk2,neutral,,,,,\n"
    )
    corpus = load_corpus(tmp_path)  # names match no corpus: the folder's only *.csv is the manifest
    assert corpus.name == "manifest"
    one, two = corpus.utterances
    assert (one.path, one.speaker, one.emotion, one.sex) == (tmp_path / "a" / "one.wav", "spk1", "angry", "F")
    assert (one.arousal, one.valence, one.dominance) == (0.8, -0.5, 0.6)
    assert (two.speaker, two.emotion, two.sex, two.arousal) == ("spk2", "neutral", None, None)


def test_manifest_tsv_file_path_and_required_columns_only(tmp_path: Path) -> None:
    write_audio(tmp_path / "x.wav")
    write_audio(tmp_path / "y.wav")
    manifest = tmp_path / "meta" / "manifest.tsv"
    manifest.parent.mkdir()
    manifest.write_text("emotion\tfile\tspeaker\nsadness\t../x.wav\tp1\nps\t../y.wav\tp2\n")
    corpus = load_corpus(manifest)
    assert [(u.path.name, u.speaker, u.emotion, u.sex) for u in corpus.utterances] == [
        ("x.wav", "p1", "sad", None), ("y.wav", "p2", "surprised", None)]  # fmt: skip


def test_known_names_win_over_a_manifest_unless_forced(tmp_path: Path) -> None:
    write_audio(tmp_path / "03a01Fa.wav")
    (tmp_path / "manifest.csv").write_text("file,speaker,emotion\n03a01Fa.wav,someone,sad\n")
    assert load_corpus(tmp_path).utterances[0].emotion == "happy"
    assert load_corpus(tmp_path, layout="manifest").utterances[0].emotion == "sad"
    assert load_corpus(tmp_path / "manifest.csv").utterances[0].speaker == "someone"


@pytest.mark.parametrize("body, message", [
    ("file,speaker,emotion\nmissing.wav,s1,angry\n", r"line 2: audio file 'missing.wav' not found"),
    ("file,speaker\nok.wav,s1\n", r"lacks column\(s\) emotion"),
    ("file,speaker,emotion\nok.wav,s1,grumpy\n", r"line 2: unknown emotion 'grumpy'"),
    ("file,speaker,emotion,sex\nok.wav,s1,sad,x\n", r"line 2: sex 'x' must be M, F or empty"),
    ("file,speaker,emotion,arousal\nok.wav,s1,sad,high\n", r"line 2: arousal 'high' is not a number"),
    ("file,speaker,emotion\nok.wav,s1,sad\nok.wav,s2,sad\n", r"line 3: file 'ok.wav' already listed on line 2"),
    ("file,speaker,emotion\nok.wav,,sad\n", r"line 2: empty speaker"),
    ("file,speaker,emotion\n", r"no rows"),
    ("", r"is empty"),
])  # fmt: skip
def test_bad_manifest(tmp_path: Path, body: str, message: str) -> None:
    write_audio(tmp_path / "ok.wav")
    (tmp_path / "manifest.csv").write_text(body)
    with pytest.raises(UserError, match=message) as err:
        load_corpus(tmp_path)
    assert "manifest.csv" in str(err.value)


# --- bad input and the CLI ----------------------------------------------------------------------------------


def test_bad_paths_and_layouts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"no \.wav or \.flac files under"):
        load_corpus(tmp_path)
    with pytest.raises(UserError, match="unknown corpus layout 'timit'"):
        load_corpus(tmp_path, layout="timit")
    write_audio(tmp_path / "take1.wav")
    write_audio(tmp_path / "take2.wav")
    with pytest.raises(UserError, match=r"cannot tell which corpus .* add a manifest\.csv"):
        load_corpus(tmp_path)
    with pytest.raises(UserError, match="no manifest"):
        load_corpus(tmp_path, layout="manifest")
    with pytest.raises(UserError, match="is a file"):
        load_corpus(tmp_path / "take1.wav")


def test_unreadable_audio_is_named_by_describe(tmp_path: Path) -> None:
    write_audio(tmp_path / "03a01Fa.wav")
    (tmp_path / "03a01Wa.wav").write_bytes(b"not audio at all")
    with pytest.raises(UserError, match="cannot read audio file .*03a01Wa.wav"):
        describe(load_corpus(tmp_path))


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "no .wav or .flac files"),
    ("unknown", "cannot tell which corpus"),
    ("bad-manifest", "not found"),
])  # fmt: skip
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, setup: str,
                                        message: str) -> None:
    folder = tmp_path / "corpus"
    if setup != "missing":
        folder.mkdir()
    if setup == "unknown":
        write_audio(folder / "hello.wav")
    if setup == "bad-manifest":
        (folder / "manifest.csv").write_text("file,speaker,emotion\ngone.wav,s1,sad\n")
    if setup == "bad-manifest":  # one case through a real process: the installed entry point's exit status
        result = run_cli("data", "info", str(folder))
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = main(["data", "info", str(folder)]), capsys.readouterr().err
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pser: error: ") and message in lines[0]
    assert str(folder) in lines[0]


def test_cli_info_json_and_table(synth_corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "info", str(synth_corpus), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["corpus"] == "manifest" and desc["files"] == 288
    assert desc["emotions"] == {e: 48 for e in ("angry", "disgust", "fearful", "happy", "neutral", "sad")}
    assert main(["data", "info", str(synth_corpus)]) == 0
    table = capsys.readouterr().out
    assert "synth_06" in table and "288" in table
