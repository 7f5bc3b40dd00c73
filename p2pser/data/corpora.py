"""Corpus readers: turn a folder of emotional speech into a list of labelled utterances.

Readers parse each corpus from its own file-naming convention (RAVDESS, EmoDB, CREMA-D, TESS, SAVEE), as
they would a user's original download, and accept ``.wav`` or ``.flac``. A generic CSV/TSV manifest lets
any other corpus in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Canonical emotion names used across corpora (lower case, adjectives as in RAVDESS).
EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "boredom")


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute path to the audio file
    speaker: str  # corpus-prefixed speaker id, e.g. "ravdess_12", "emodb_03"
    emotion: str  # canonical lower-case emotion name
    sex: str | None = None  # "M", "F" or None when unknown
    arousal: float | None = None
    valence: float | None = None
    dominance: float | None = None


@dataclass
class Corpus:
    name: str  # "ravdess", "emodb", "crema-d", "tess", "savee" or "manifest"
    root: Path
    utterances: list[Utterance] = field(default_factory=list)

    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def emotions(self) -> list[str]:
        return sorted({u.emotion for u in self.utterances})
