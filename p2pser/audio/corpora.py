"""Corpus readers: turn a folder of emotional speech into a list of labelled utterances.

Readers parse each corpus from its own file-naming convention (RAVDESS, EmoDB, CREMA-D, TESS, SAVEE,
BAVED), as they would a user's original download, and accept ``.wav`` or ``.flac``. A generic CSV/TSV
manifest lets any other corpus in.

An utterance may carry an emotion category, emotion dimensions (arousal, valence, dominance on any numeric
scale) or both. A dimension's scale is declared in a manifest header (``arousal[1,5]``) or by a corpus
reader (BAVED: -1..1), else inferred from the values (``Corpus.range_of``).

Auto-detection trusts file names first: a folder whose audio files follow one known convention is read by
that corpus's parser even when a manifest sits beside them (the shared RAVDESS/EmoDB copies ship a
``MANIFEST.tsv`` meant for checking, and a corpus download is the more authoritative source). A manifest is
used when the names follow no known convention, when ``layout="manifest"`` is given, or when the path is
the manifest file itself.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import soundfile

from p2pser.errors import UserError

log = logging.getLogger(__name__)

# Canonical emotion names used across corpora (lower case, adjectives as in RAVDESS).
EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "boredom")

AUDIO_SUFFIXES = (".wav", ".flac")
LAYOUTS = ("auto", "ravdess", "emodb", "crema-d", "tess", "savee", "baved", "manifest")
MANIFEST_COLUMNS = ("file", "speaker")  # and an emotion, a dimension, or both
DIMENSIONS = ("arousal", "valence", "dominance")
OPTIONAL_COLUMNS = ("emotion", "sex", "age", *DIMENSIONS)
# A dimension column may declare its scale: "arousal[1,5]" or "arousal[1:5]".
_DECLARED_RANGE = re.compile(r"(arousal|valence|dominance)\s*\[\s*([-+0-9.eE]+)\s*[,:]\s*([-+0-9.eE]+)\s*\]")


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute path to the audio file
    speaker: str  # corpus-prefixed speaker id, e.g. "ravdess_12", "emodb_03"
    emotion: str  # canonical lower-case emotion name; "" when the corpus labels no category
    sex: str | None = None  # "M", "F" or None when unknown
    arousal: float | None = None
    valence: float | None = None
    dominance: float | None = None
    age: float | None = None  # years, where the corpus says

    def dimension(self, name: str) -> float | None:
        return getattr(self, name)


@dataclass
class Corpus:
    name: str  # "ravdess", "emodb", "crema-d", "tess", "savee" or "manifest"
    root: Path
    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # audio files whose names did not parse
    declared_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # dimension -> (low, high)

    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def emotions(self) -> list[str]:
        """The emotion categories present (utterances without one are not counted)."""
        return sorted({u.emotion for u in self.utterances if u.emotion})

    def dimensions(self) -> list[str]:
        """The dimensions that at least one utterance carries, in ``DIMENSIONS`` order."""
        return [d for d in DIMENSIONS if any(u.dimension(d) is not None for u in self.utterances)]

    def range_of(self, name: str) -> tuple[float, float]:
        """The scale of dimension ``name``: as declared, else the smallest and largest value present."""
        if name in self.declared_ranges:
            return self.declared_ranges[name]
        values = [v for u in self.utterances if (v := u.dimension(name)) is not None]
        return (min(values), max(values)) if values else (0.0, 0.0)


# Manifest labels in the wild: corpus abbreviations, nouns and adjectives all map to the canonical names.
EMOTION_ALIASES = {
    **{name: name for name in EMOTIONS},
    "neu": "neutral",
    "hap": "happy", "happiness": "happy", "joy": "happy",
    "sadness": "sad",
    "ang": "angry", "anger": "angry",
    "fea": "fearful", "fear": "fearful", "afraid": "fearful",
    "dis": "disgust", "disgusted": "disgust",
    "sur": "surprised", "surprise": "surprised", "ps": "surprised", "pleasant_surprise": "surprised",
    "bored": "boredom",
}  # fmt: skip

# --- per-corpus file-name parsers ------------------------------------------------------------------------
# Each takes the path relative to the corpus root and returns (speaker, emotion, sex) or None; a corpus with
# more per-file facts (dimensions, age) adds them as a fourth element, Utterance fields by name.
Parsed = tuple[str, str, str | None] | tuple[str, str, str | None, dict]

RAVDESS_EMOTIONS = dict(enumerate(("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust",
                                   "surprised"), start=1))  # fmt: skip
RAVDESS_RE = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")


def _parse_ravdess(rel: Path) -> Parsed | None:
    m = RAVDESS_RE.fullmatch(rel.stem)
    if not m:
        return None
    emotion, actor = int(m.group(3)), int(m.group(7))
    if emotion not in RAVDESS_EMOTIONS or not 1 <= actor <= 24:
        return None
    return f"ravdess_{actor:02d}", RAVDESS_EMOTIONS[emotion], "M" if actor % 2 else "F"


# Speaker table from the EmoDB documentation (see ../shared/data/emodb/SOURCE.md).
EMODB_SEX = {"03": "M", "08": "F", "09": "F", "10": "M", "11": "M", "12": "M", "13": "F", "14": "F",
             "15": "M", "16": "F"}  # fmt: skip
EMODB_EMOTIONS = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad",
                  "N": "neutral"}  # fmt: skip
EMODB_RE = re.compile(r"(\d\d)([ab]\d\d)([WLEAFTN])([a-z])")


def _parse_emodb(rel: Path) -> Parsed | None:
    m = EMODB_RE.fullmatch(rel.stem)
    if not m or m.group(1) not in EMODB_SEX:
        return None
    return f"emodb_{m.group(1)}", EMODB_EMOTIONS[m.group(3)], EMODB_SEX[m.group(1)]


# CREMA-D actors 1001-1091; the women per VideoDemographics.csv of the official release
# (github.com/CheyneyComputerScience/CREMA-D): 43 female, 48 male.
CREMA_D_FEMALE = frozenset({
    1002, 1003, 1004, 1006, 1007, 1008, 1009, 1010, 1012, 1013, 1018, 1020, 1021, 1024, 1025, 1028, 1029,
    1030, 1037, 1043, 1046, 1047, 1049, 1052, 1053, 1054, 1055, 1056, 1058, 1060, 1061, 1063, 1072, 1073,
    1074, 1075, 1076, 1078, 1079, 1082, 1084, 1089, 1091,
})  # fmt: skip
CREMA_D_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral",
                    "SAD": "sad"}  # fmt: skip
CREMA_D_RE = re.compile(r"(\d{4})_([A-Z]{3})_(ANG|DIS|FEA|HAP|NEU|SAD)_(LO|MD|HI|XX|X)")


def _parse_crema_d(rel: Path) -> Parsed | None:
    m = CREMA_D_RE.fullmatch(rel.stem)
    if not m or not 1001 <= int(m.group(1)) <= 1091:
        return None
    actor = int(m.group(1))
    return f"crema-d_{actor}", CREMA_D_EMOTIONS[m.group(3)], "F" if actor in CREMA_D_FEMALE else "M"


TESS_EMOTIONS = {"angry": "angry", "disgust": "disgust", "fear": "fearful", "happy": "happy",
                 "neutral": "neutral", "ps": "surprised", "sad": "sad"}  # fmt: skip
TESS_RE = re.compile(r"([A-Z]+)_([a-z]+)_(angry|disgust|fear|happy|neutral|ps|sad)", re.IGNORECASE)


def _parse_tess(rel: Path) -> Parsed | None:
    m = TESS_RE.fullmatch(rel.stem)
    if not m:
        return None
    speaker = m.group(1).upper()
    folder_speaker = rel.parent.name.split("_")[0].upper()
    # The TESS release misnames one file "OA_bite_neutral" inside OAF_neutral/: trust the folder there.
    if speaker not in ("OAF", "YAF") and folder_speaker in ("OAF", "YAF") and folder_speaker.startswith(speaker):
        speaker = folder_speaker
    if speaker not in ("OAF", "YAF"):
        return None
    return f"tess_{speaker}", TESS_EMOTIONS[m.group(3).lower()], "F"


SAVEE_EMOTIONS = {"a": "angry", "d": "disgust", "f": "fearful", "h": "happy", "n": "neutral", "sa": "sad",
                  "su": "surprised"}  # fmt: skip
SAVEE_SPEAKERS = ("DC", "JE", "JK", "KL")
SAVEE_RE = re.compile(r"(?:(DC|JE|JK|KL)_)?(a|d|f|h|n|sa|su)(\d\d)")


def _parse_savee(rel: Path) -> Parsed | None:
    # Two distributions: flat "DC_a01.wav" and the original "AudioData/DC/a01.wav".
    m = SAVEE_RE.fullmatch(rel.stem)
    if not m:
        return None
    speaker = m.group(1) or rel.parent.name
    if speaker not in SAVEE_SPEAKERS:
        return None
    return f"savee_{speaker}", SAVEE_EMOTIONS[m.group(2)], "M"


# BAVED (github.com/40uf411/Basic-Arabic-Vocal-Emotions-Dataset): SPEAKER-SEX-AGE-WORD-LEVEL-RECORD, e.g.
# "0/10-f-20-0-1-0.wav". LEVEL is the expressed activation (0 low, 1 neutral, 2 high): arousal = level - 1
# on the declared scale -1..1. There is no emotion category.
BAVED_RE = re.compile(r"(\d+)-([mf])-(\d+)-([0-6])-([0-2])-(\d+)")
BAVED_RANGES = {"arousal": (-1.0, 1.0)}


def _parse_baved(rel: Path) -> Parsed | None:
    m = BAVED_RE.fullmatch(rel.stem)
    if not m:
        return None
    return (f"baved_{int(m.group(1)):03d}", "", m.group(2).upper(),
            {"arousal": float(int(m.group(5)) - 1), "age": float(m.group(3))})


PARSERS: dict[str, Callable[[Path], Parsed | None]] = {
    "ravdess": _parse_ravdess,
    "emodb": _parse_emodb,
    "crema-d": _parse_crema_d,
    "tess": _parse_tess,
    "savee": _parse_savee,
    "baved": _parse_baved,
}
DECLARED_RANGES = {"baved": BAVED_RANGES}


# --- loading ---------------------------------------------------------------------------------------------


def load_corpus(path: str | Path, layout: str = "auto") -> Corpus:
    """Read a corpus folder (or a manifest file) into a ``Corpus``.

    ``layout`` is "auto" (detect from file names, else a manifest), a corpus name from ``LAYOUTS`` to force
    that file-name parser, or "manifest" to read the folder's manifest even if the names look familiar.
    Raises ``UserError`` for a missing or empty folder, an undetectable layout or a bad manifest.
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown corpus layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"corpus path {root} does not exist; pass a corpus folder or a manifest .csv/.tsv")
    root = root.resolve()
    if root.is_file():
        if root.suffix.lower() in (".csv", ".tsv") and layout in ("auto", "manifest"):
            return read_manifest(root)
        raise UserError(f"{root} is a file; pass the corpus folder, or a manifest .csv/.tsv file")
    if layout == "manifest":
        manifest = find_manifest(root)
        if manifest is None:
            raise UserError(f"no manifest (manifest.csv, manifest.tsv or one *.csv/*.tsv) at the top of {root}")
        return read_manifest(manifest)

    files = _audio_files(root)
    if layout != "auto":
        return _parse_files(layout, root, files)
    if not files:
        manifest = find_manifest(root)
        if manifest is not None:
            return read_manifest(manifest)
        raise UserError(f"no .wav or .flac files under {root}; point at the folder that holds the corpus audio")
    name = _detect(root, files)
    return read_manifest(find_manifest(root)) if name == "manifest" else _parse_files(name, root, files)


def _audio_files(root: Path) -> list[Path]:
    """Audio files under ``root`` as sorted relative paths, ignoring hidden files (e.g. macOS ``._x.wav``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(AUDIO_SUFFIXES):
                found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found)


def _detect(root: Path, files: list[Path]) -> str:
    """The corpus whose naming convention the files follow, or "manifest" when they follow none."""
    counts = Counter()
    for rel in files:
        for name, parse in PARSERS.items():
            if parse(rel) is not None:
                counts[name] += 1
    # A known corpus must be the only convention present and cover most files; stray extras are skipped.
    if len(counts) == 1:
        (name, n), = counts.items()
        if n * 2 >= len(files):
            return name
    if find_manifest(root) is not None:
        return "manifest"
    found = ", ".join(f"{n} named like {name}" for name, n in counts.most_common()) or "none named like a known corpus"
    example = next((str(rel) for rel in files if not any(p(rel) for p in PARSERS.values())), str(files[0]))
    raise UserError(
        f"cannot tell which corpus {root} holds ({len(files)} audio files: {found}; e.g. {example!r}); "
        "put one corpus per folder, or add a manifest.csv with columns file,speaker,emotion"
    )


def _parse_files(name: str, root: Path, files: list[Path]) -> Corpus:
    parse = PARSERS[name]
    corpus = Corpus(name=name, root=root, declared_ranges=dict(DECLARED_RANGES.get(name, {})))
    for rel in files:
        parsed = parse(rel)
        if parsed is None:
            corpus.skipped.append(root / rel)
            continue
        speaker, emotion, sex, *extra = parsed
        corpus.utterances.append(Utterance(path=root / rel, speaker=speaker, emotion=emotion, sex=sex,
                                           **(extra[0] if extra else {})))
    if corpus.skipped:
        log.warning("%s: skipped %d audio files not named like %s, e.g. %s", root, len(corpus.skipped), name,
                    corpus.skipped[0].name)
    if not corpus.utterances:
        raise UserError(f"no audio file under {root} is named like a {name} file; check the folder or --layout")
    return corpus


def find_manifest(folder: Path) -> Path | None:
    """``manifest.csv``/``manifest.tsv`` (any case) at the top of ``folder``, else its only *.csv/*.tsv."""
    tables = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".tsv"))
    named = [p for p in tables if p.stem.lower() == "manifest"]
    if len(named) == 1:
        return named[0]
    if len(named) > 1 or len(tables) > 1:
        raise UserError(
            f"several manifest candidates in {folder} ({', '.join(p.name for p in named or tables)}); "
            "pass the manifest file itself"
        )
    return tables[0] if tables else None


def read_manifest(manifest: Path) -> Corpus:
    """Read a CSV (comma) or TSV (tab) manifest: columns file, speaker, and emotion and/or any of arousal,
    valence, dominance (a header ``arousal[1,5]`` declares the scale); optionally sex and age. Other columns
    are ignored. ``file`` is relative to the manifest's folder or absolute. A row needs an emotion or a
    dimension value; a dimension value that is not a number is an error naming the file and line."""
    root = manifest.parent
    delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read manifest {manifest}: {exc}") from exc
    if not rows:
        raise UserError(f"manifest {manifest} is empty; it needs a header row: file,speaker,emotion")
    header = [c.strip().lower() for c in rows[0]]
    declared: dict[str, tuple[float, float]] = {}
    for i, cell in enumerate(header):
        m = _DECLARED_RANGE.fullmatch(cell)
        if m:
            try:
                low, high = float(m.group(2)), float(m.group(3))
            except ValueError:
                low = high = 0.0
            if not low < high:
                raise UserError(f"manifest {manifest}: column {rows[0][i].strip()!r} declares no scale low < high")
            header[i], declared[m.group(1)] = m.group(1), (low, high)
    labels = [c for c in ("emotion", *DIMENSIONS) if c in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in header] + ([] if labels else ["emotion"])
    if missing:
        raise UserError(
            f"manifest {manifest} lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'none'}); "
            f"the header must name file, speaker and emotion and/or arousal, valence, dominance "
            f"({'tab' if delimiter == chr(9) else 'comma'}-separated)"
        )
    col = {name: header.index(name) for name in (*MANIFEST_COLUMNS, *OPTIONAL_COLUMNS) if name in header}
    corpus = Corpus(name="manifest", root=root, declared_ranges=declared)
    seen: dict[Path, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"manifest {manifest} line {line}"
        if len(row) != len(header):
            raise UserError(f"{where} has {len(row)} fields, the header has {len(header)}; fix the row")
        values = {name: row[i].strip() for name, i in col.items()}
        for name in MANIFEST_COLUMNS:
            if not values[name]:
                raise UserError(f"{where}: empty {name}; every row needs file and speaker")
        dims = {name: _number(values, name, where, declared.get(name)) for name in DIMENSIONS}
        if not values.get("emotion") and all(v is None for v in dims.values()):
            raise UserError(f"{where}: no emotion and no {'/'.join(d for d in DIMENSIONS if d in col)} value; "
                            "every row needs a label")
        path = (root / values["file"]).resolve()
        if not path.is_file():
            raise UserError(f"{where}: audio file {values['file']!r} not found at {path}; fix the path or the row")
        if path in seen:
            raise UserError(f"{where}: file {values['file']!r} already listed on line {seen[path]}; remove one")
        seen[path] = line
        corpus.utterances.append(Utterance(
            path=path,
            speaker=values["speaker"],
            emotion=_canonical_emotion(values["emotion"], where) if values.get("emotion") else "",
            sex=_sex(values.get("sex", ""), where),
            age=_number(values, "age", where, None),
            **dims,
        ))  # fmt: skip
    if not corpus.utterances:
        raise UserError(f"manifest {manifest} has a header but no rows; add one row per audio file")
    return corpus


def _canonical_emotion(label: str, where: str) -> str:
    emotion = EMOTION_ALIASES.get(label.strip().lower().replace(" ", "_"))
    if emotion is None:
        raise UserError(f"{where}: unknown emotion {label!r}; use one of {', '.join(EMOTIONS)}")
    return emotion


def _sex(value: str, where: str) -> str | None:
    sex = {"m": "M", "male": "M", "f": "F", "female": "F", "": None}.get(value.lower(), "?")
    if sex == "?":
        raise UserError(f"{where}: sex {value!r} must be M, F or empty")
    return sex


def _number(values: dict[str, str], name: str, where: str, scale: tuple[float, float] | None) -> float | None:
    text = values.get(name, "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise UserError(f"{where}: {name} {text!r} is not a number; use a number or leave it empty")
    if scale is not None and not scale[0] <= value <= scale[1]:
        raise UserError(f"{where}: {name} {value:g} lies outside its declared scale {scale[0]:g}..{scale[1]:g}")
    return value


# --- description -----------------------------------------------------------------------------------------


def describe(corpus: Corpus) -> dict:
    """Counts and audio facts of a corpus: files, speakers, emotions, sexes, durations, sample rates.

    Durations and rates come from each file's header (``soundfile.info``), so this is fast but touches
    every file; an unreadable file raises ``UserError`` naming it.
    """
    durations, rates, channels = [], Counter(), Counter()
    for u in corpus.utterances:
        try:
            info = soundfile.info(str(u.path))
        except (RuntimeError, OSError) as exc:
            raise UserError(f"cannot read audio file {u.path}: {exc}; replace or remove it") from exc
        durations.append(info.frames / info.samplerate)
        rates[info.samplerate] += 1
        channels[info.channels] += 1
    sex_of = {u.speaker: u.sex for u in corpus.utterances}
    return {
        "corpus": corpus.name,
        "root": str(corpus.root),
        "files": len(corpus.utterances),
        "skipped_files": len(corpus.skipped),
        "speakers": dict(sorted(Counter(u.speaker for u in corpus.utterances).items())),
        "speaker_sex": dict(sorted(Counter(s or "unknown" for s in sex_of.values()).items())),
        "emotions": dict(sorted(Counter(u.emotion for u in corpus.utterances if u.emotion).items())),
        "without_emotion": sum(1 for u in corpus.utterances if not u.emotion),
        "dimensions": describe_dimensions(corpus),
        "ages": _ages(corpus),
        "duration_s": round(sum(durations), 3),
        "duration_range_s": [round(min(durations), 3), round(max(durations), 3)] if durations else None,
        "sample_rates": {str(k): v for k, v in sorted(rates.items())},
        "channels": {str(k): v for k, v in sorted(channels.items())},
    }


def describe_dimensions(corpus: Corpus) -> dict[str, dict]:
    """Per labelled dimension: its scale (declared or inferred), how many utterances carry it, mean and
    standard deviation, and the per-speaker spread: how far speakers' means lie apart (std of the speaker
    means) and how much each speaker varies (mean of the within-speaker stds). A dimension that moves mostly
    between speakers rather than within them is one a speaker-independent model will find hard."""
    out = {}
    for name in corpus.dimensions():
        by_speaker: dict[str, list[float]] = {}
        for u in corpus.utterances:
            if (v := u.dimension(name)) is not None:
                by_speaker.setdefault(u.speaker, []).append(v)
        values = [v for vs in by_speaker.values() for v in vs]
        means = [sum(vs) / len(vs) for vs in by_speaker.values()]
        low, high = corpus.range_of(name)
        out[name] = {
            "range": [low, high], "declared": name in corpus.declared_ranges, "labelled": len(values),
            "mean": round(_mean(values), 4), "std": round(_std(values), 4),
            "speaker_means_std": round(_std(means), 4),
            "within_speaker_std": round(_mean([_std(vs) for vs in by_speaker.values()]), 4),
        }
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _std(values: list[float]) -> float:
    m = _mean(values)
    return math.sqrt(_mean([(v - m) ** 2 for v in values])) if values else 0.0


def _ages(corpus: Corpus) -> list[float] | None:
    """Youngest and oldest speaker, where the corpus gives ages."""
    ages = [u.age for u in corpus.utterances if u.age is not None]
    return [min(ages), max(ages)] if ages else None


def format_description(desc: dict) -> str:
    """The ``describe`` dict as a short human-readable report (what ``p2pser data info`` prints)."""
    minutes = desc["duration_s"] / 60
    lo, hi = desc["duration_range_s"] or (0.0, 0.0)
    sexes = ", ".join(f"{n} {s}" for s, n in desc["speaker_sex"].items())
    lines = [
        f"corpus        {desc['corpus']}  ({desc['root']})",
        f"files         {desc['files']}" + (f"  ({desc['skipped_files']} skipped: unrecognised names)"
                                            if desc["skipped_files"] else ""),
        f"speakers      {len(desc['speakers'])}  ({sexes})",
        f"duration      {minutes:.1f} min  (files {lo:.2f}-{hi:.2f} s)",
        f"sample rates  {', '.join(f'{r} Hz x{n}' for r, n in desc['sample_rates'].items())}",
        f"channels      {', '.join(f'{c} x{n}' for c, n in desc['channels'].items())}",
        *([f"ages          {desc['ages'][0]:g}-{desc['ages'][1]:g} years"] if desc.get("ages") else []),
        "",
        f"{'emotion':<12}{'files':>7}",
        *(f"{e:<12}{n:>7}" for e, n in desc["emotions"].items()),
        *([f"{'(none)':<12}{desc['without_emotion']:>7}"] if desc.get("without_emotion") else []),
        "",
        *_format_dimensions(desc.get("dimensions") or {}),
        f"{'speaker':<16}{'files':>7}",
        *(f"{s:<16}{n:>7}" for s, n in desc["speakers"].items()),
    ]  # fmt: skip
    return "\n".join(lines)


def _format_dimensions(dims: dict[str, dict]) -> list[str]:
    if not dims:
        return []
    head = (f"{'dimension':<11}{'scale':>16}{'files':>7}{'mean':>8}{'std':>7}{'speaker means std':>19}"
            f"{'within-speaker std':>20}")
    lines = [head]
    for name, d in dims.items():
        scale = f"{d['range'][0]:g}..{d['range'][1]:g}" + (" (decl.)" if d["declared"] else "")
        lines.append(f"{name:<11}{scale:>16}{d['labelled']:>7}{d['mean']:>8.3f}{d['std']:>7.3f}"
                     f"{d['speaker_means_std']:>19.3f}{d['within_speaker_std']:>20.3f}")
    return [*lines, ""]
