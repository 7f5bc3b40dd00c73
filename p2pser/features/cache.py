"""The on-disk feature cache, keyed by file content.

Layout (``--cache-dir``, else ``$P2PSER_CACHE_DIR``, else ``~/.cache/p2pser/features``)::

    index.json                        absolute path -> [size, mtime_ns, ctime_ns, content hash]: a warm run
                                      stats the audio files but opens none of them
    ab/<hash>.<part>.<key>.npy        one feature part (mfcc, logmel, ...) of one file content; <key> hashes
                                      every parameter that changes the values
    ab/<hash>.audio.<key>.skip.json   why that content is unusable (corrupt, silent, ...), so a warm run does
                                      not retry it

A perturbed copy (``--augment``) has the perturbation in both keys: its features sit beside the original's.

Keys hash file *content*, so moved or duplicated files reuse their features and an edited file (new size
or mtime, hence re-hashed) gets new ones. Every file is written to a temporary name and renamed, so an
interrupted run or two runs sharing the cache never leave a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.errors import UserError
from p2pser.features.kinds import KINDS
from p2pser.features.spec import FeatureSpec

log = logging.getLogger(__name__)

# Bump when the extraction code changes its output, so old cache entries are not reused.
_CACHE_VERSION = 2  # 2: DC offset removed before the silence check, trimming and level normalisation
_INDEX_VERSION = 2


def default_cache_dir() -> Path:
    if os.environ.get("P2PSER_CACHE_DIR"):
        return Path(os.environ["P2PSER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "p2pser" / "features"


def writable_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (else the default), created; a UserError naming it when it cannot be written."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write the feature cache at {root} ({exc.strerror or exc}); "
            "pass --cache-dir or set P2PSER_CACHE_DIR to a writable folder"
        ) from exc
    return root


def _params_key(params: dict[str, Any]) -> str:
    blob = json.dumps({**params, "cache_version": _CACHE_VERSION, "librosa": version("librosa")}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _part_settings(spec: FeatureSpec, part: str) -> dict[str, Any]:
    """What changes a part's values beyond the waveform: its settings, and the version of the library that
    computes it when that is not librosa (openSMILE)."""
    kind = KINDS[part]
    settings = {name: getattr(spec, name) for name in kind.settings}
    return settings | ({kind.package: version(kind.package)} if kind.package else {})


def _atomic_write(path: Path, write) -> None:
    # Not p2pser.files.write_atomically: its one temporary name per target would let two runs writing the
    # same entry at once (two workers or two runs sharing a cache) interleave in it; a name per writer cannot.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Cache:
    """Feature files of one spec, addressed by file-content hash."""

    def __init__(self, root: Path, spec: FeatureSpec, *, augment: str | None = None) -> None:
        self.root = root
        self.spec = spec
        self.augment = augment  # a perturbed copy's token (p2pser.features.augment), None for the original
        audio = {
            "sample_rate": spec.sample_rate, "trim_db": spec.trim_db, "normalize": spec.normalize,
            "n_fft": spec.n_fft, "hop_length": spec.hop_length, "win_length": spec.win_length,
        } | ({"augment": augment} if augment else {})
        self.audio_key = _params_key(audio)
        self.part_keys = {p: _params_key({**audio, "part": p, **_part_settings(spec, p)}) for p in spec.parts}

    def part_path(self, digest: str, part: str) -> Path:
        return self.root / digest[:2] / f"{digest}.{part}.{self.part_keys[part]}.npy"

    def skip_path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.audio.{self.audio_key}.skip.json"

    def missing_parts(self, digest: str) -> list[str]:
        return [p for p in self.spec.parts if not self.part_path(digest, p).exists()]

    def is_complete(self, digest: str) -> bool:
        return self.skip_path(digest).exists() or not self.missing_parts(digest)

    def read_skip(self, digest: str) -> str | None:
        path = self.skip_path(digest)
        if not path.exists():
            return None
        try:
            return str(json.loads(path.read_text())["reason"])
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"feature cache entry {path} is damaged ({exc}); delete it and rerun") from exc

    def save_skip(self, digest: str, reason: str) -> None:
        _atomic_write(self.skip_path(digest), lambda fh: fh.write(json.dumps({"reason": reason}).encode()))

    def save_part(self, digest: str, part: str, values: np.ndarray) -> None:
        _atomic_write(self.part_path(digest, part), lambda fh: np.save(fh, values, allow_pickle=False))

    def load_part(self, digest: str, part: str) -> np.ndarray:
        path = self.part_path(digest, part)
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"feature cache file {path} is damaged ({exc}); delete it and rerun") from exc
        if values.ndim != 2 or values.shape[0] != self.spec.part_channels(part):
            raise UserError(f"feature cache file {path} has shape {values.shape}; delete it and rerun")
        return values


class Index:
    """Absolute path -> (size, mtime_ns, ctime_ns, content hash): unchanged files need not be read to be hashed.

    ctime catches a same-size rewrite on a file system with coarse mtimes, and cannot be set back by tools.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._read()
        self.updates: dict[str, list] = {}

    def _read(self) -> dict[str, list]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable feature cache index %s (%s); files will be re-hashed", self.path, exc)
            return {}
        entries = doc.get("entries") if isinstance(doc, dict) and doc.get("version") == _INDEX_VERSION else None
        return entries if isinstance(entries, dict) else {}

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        entry = self.entries.get(path)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
            return str(entry[3])
        return None

    def record(self, path: str, st: os.stat_result, digest: str) -> None:
        self.updates[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest]

    def save(self) -> None:
        # Merge with what another run may have written meanwhile; a lost race only costs a re-hash later.
        entries = {**self._read(), **self.updates}
        blob = json.dumps({"version": _INDEX_VERSION, "entries": entries}).encode()
        _atomic_write(self.path, lambda fh: fh.write(blob))
        self.entries = entries
