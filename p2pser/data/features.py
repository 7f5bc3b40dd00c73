"""Acoustic features for SER, extracted in parallel processes into a content-keyed on-disk cache.

Per file: decode (any libsndfile format, whatever the file's suffix says), mix down to mono, remove any DC
offset, resample to the spec's rate, reject empty, silent, too-short or too-long audio, trim leading/trailing
silence, normalise the level, and compute frame features ``[C, T_full]``. A file that cannot give features
is skipped with a one-line reason and the run goes on; only a corpus with no usable file is an error. The
cache keeps the full-length features; ``extract_features`` pads or crops them to ``spec.frames`` when it
assembles the array, so changing ``max_seconds`` needs no re-extraction.

Cache layout (``--cache-dir``, else ``$P2PSER_CACHE_DIR``, else ``~/.cache/p2pser/features``)::

    index.json                        absolute path -> [size, mtime_ns, ctime_ns, content hash]: a warm run
                                      stats the audio files but opens none of them
    ab/<hash>.<part>.<key>.npy        one feature part (mfcc, logmel, ...) of one file content; <key> hashes
                                      every parameter that changes the values
    ab/<hash>.audio.<key>.skip.json   why that content is unusable (corrupt, silent, ...), so a warm run does
                                      not retry it

Keys hash file *content*, so moved or duplicated files reuse their features and an edited file (new size
or mtime, hence re-hashed) gets new ones. Every file is written to a temporary name and renamed, so an
interrupted run or two runs sharing the cache never leave a half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import resource
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from p2pser.data.corpora import Utterance
from p2pser.errors import UserError
from p2pser.runtime import ensure_numba_cache

log = logging.getLogger(__name__)

KINDS = ("mfcc", "logmel", "chroma", "spectral")
NORMALIZATIONS = ("rms", "peak", "none")

# Bump when the extraction code changes its output, so old cache entries are not reused.
_CACHE_VERSION = 2  # 2: DC offset removed before the silence check, trimming and level normalisation
_INDEX_VERSION = 2
_RMS_TARGET_DBFS = -20.0
# Below -80 dBFS peak there is no speech to hear (RAVDESS's quietest takes still peak near -34 dBFS).
_SILENT_PEAK = 1e-4
# Corpus files are utterances of seconds (IEMOCAP's longest is ~35 s): a file of many minutes is a session
# that needs cutting, and decoding it whole could exhaust a peer's memory. Together the limits keep one
# worker under a GB (file bytes + mono samples); beyond them a file is skipped with its reason.
_MAX_SECONDS = 300.0
_MAX_FILE_BYTES = 512 * 2**20
_MIN_RATE = 4000  # Hz: below this no speech band survives (and it is the lowest FeatureSpec rate)
# Frames per read: a decoding error loses about a block of what decoded before it, and libsndfile's cost
# per call makes smaller blocks dear (1024 frames take 5x the CPU of one whole-file read of a FLAC).
_DECODE_BLOCK = 4096
_SPECTRAL_STATS = 6  # centroid, bandwidth, rolloff, flatness, zero-crossing rate, RMS level
_CONTRAST_FMIN = 200.0
# A worker process costs 3-5 CPU-seconds to start (importing librosa, scipy.signal and numba's cached
# kernels) and then extracts ~150 files per CPU-second: below a few hundred files per worker the start-up
# outweighs the parallel speed-up on a machine whose cores are shared, so smaller jobs run in this process.
_MIN_FILES_PER_WORKER = 400


@dataclass(frozen=True)
class FeatureSpec:
    """What to extract. ``kind`` is one of KINDS or a '+'-combination such as ``mfcc+chroma``."""

    kind: str = "mfcc"
    sample_rate: int = 16000
    n_mfcc: int = 40
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    max_seconds: float = 4.0  # fixed length T: longer utterances are cropped (from the start), shorter padded
    min_seconds: float = 0.25  # shorter sound (after trimming) is skipped as too short
    trim_db: float | None = 40.0  # trim edges quieter than this many dB below the peak; None keeps them
    normalize: str = "rms"  # per-waveform level: "rms" (to -20 dBFS), "peak" (to full scale) or "none"

    def __post_init__(self) -> None:
        parts = self.parts
        unknown = [p for p in parts if p not in KINDS]
        if unknown or not parts:
            raise UserError(
                f"unknown feature kind {self.kind!r}; known kinds: {', '.join(KINDS)} "
                "(combine with '+', e.g. mfcc+chroma)"
            )
        if len(set(parts)) != len(parts):
            raise UserError(f"feature kind {self.kind!r} names a part twice")
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"unknown level normalisation {self.normalize!r}; use one of {NORMALIZATIONS}")
        if not 4000 <= self.sample_rate <= 192000:
            raise UserError(f"feature sample_rate {self.sample_rate} must be between 4000 and 192000 Hz")
        if not 1 <= self.n_mfcc <= self.n_mels:
            raise UserError(f"n_mfcc ({self.n_mfcc}) must be between 1 and n_mels ({self.n_mels})")
        if self.hop_length < 1 or self.win_length < 16 or self.hop_length > self.win_length:
            raise UserError(
                f"window {self.win_ms} ms / hop {self.hop_ms} ms: need a window of at least 16 samples "
                "and a hop no longer than the window"
            )
        if not 0 <= self.min_seconds < self.max_seconds:
            raise UserError(
                f"need 0 <= min_seconds ({self.min_seconds}) < max_seconds ({self.max_seconds})"
            )
        if self.trim_db is not None and self.trim_db <= 0:
            raise UserError(f"trim_db must be positive (or None to keep silence), got {self.trim_db}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "feature spec") -> FeatureSpec:
        """Rebuild from ``asdict(spec)`` (e.g. a checkpoint's JSON); unknown keys are a UserError."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(values) - known)
        if extra:
            raise UserError(f"{source}: unknown feature settings {extra}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.kind.split("+") if p.strip())

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()

    @property
    def frames(self) -> int:
        """T: frames of a ``max_seconds`` signal (centred STFT frames, as librosa computes them)."""
        return 1 + round(self.max_seconds * self.sample_rate) // self.hop_length

    @property
    def min_frames(self) -> int:
        return 1 + round(self.min_seconds * self.sample_rate) // self.hop_length

    @property
    def channels(self) -> int:
        """C: feature dimension, the sum over parts."""
        return sum(self.part_channels(p) for p in self.parts)

    def part_channels(self, part: str) -> int:
        return {
            "mfcc": 3 * self.n_mfcc,
            "logmel": self.n_mels,
            "chroma": 12,
            "spectral": _contrast_bands(self.sample_rate) + 1 + _SPECTRAL_STATS,
        }[part]


def _contrast_bands(sample_rate: int) -> int:
    """Octave bands for spectral contrast that fit below Nyquist (librosa's rule), at most 6."""
    bands = 6
    while bands > 1 and _CONTRAST_FMIN * 2 ** (bands - 1) >= sample_rate / 2:
        bands -= 1
    return bands


@dataclass
class FeatureSet:
    """Fixed-length features of the usable utterances, row i describing ``utterances[i]``."""

    x: np.ndarray  # float32 [N, C, T]; frames >= lengths[i] are zero padding
    lengths: np.ndarray  # int64 [N] valid frames
    labels: np.ndarray  # int64 [N] indices into classes
    speakers: np.ndarray  # str [N]
    classes: list[str]
    utterances: list[Utterance]
    spec: FeatureSpec
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stats: dict[str, float] = field(default_factory=dict)  # counts and timing of this extraction

    def __len__(self) -> int:
        return len(self.utterances)


class Normalizer:
    """Per-channel mean/std standardisation. Fit it on training data only (a peer: its own data only)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, lengths: np.ndarray | None = None) -> Normalizer:
        """Statistics over all frames of ``x`` [N, C, T], or only the valid ones when ``lengths`` is given."""
        if x.ndim != 3 or x.shape[0] == 0:
            raise ValueError(f"Normalizer.fit needs a non-empty [N, C, T] array, got shape {x.shape}")
        mask = np.ones((x.shape[0], x.shape[2]), dtype=bool) if lengths is None else _valid_mask(x, lengths)
        weights = mask[:, None, :].astype(np.float64)
        count = max(float(mask.sum()), 1.0)
        mean = (x * weights).sum(axis=(0, 2)) / count
        var = (((x - mean[None, :, None]) ** 2) * weights).sum(axis=(0, 2)) / count
        std = np.sqrt(var)
        return cls(mean, np.where(std < 1e-6, 1.0, std))  # a constant channel stays centred, not blown up

    def apply(self, x: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Standardised float32 copy of ``x`` [..., C, T]; with ``lengths`` padding frames become exactly 0."""
        out = ((x - self.mean[:, None]) / self.std[:, None]).astype(np.float32)
        if lengths is not None:
            out *= _valid_mask(out, lengths)[:, None, :]
        return out

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalizer:
        try:
            mean = np.asarray(values["mean"], dtype=np.float64)
            std = np.asarray(values["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"normalizer statistics need numeric lists 'mean' and 'std' ({exc})") from exc
        if mean.ndim != 1 or mean.shape != std.shape or not (np.isfinite(mean).all() and (std > 0).all()):
            raise UserError("normalizer statistics 'mean' and 'std' must be equal-length lists, std > 0")
        return cls(mean, std)


def _valid_mask(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[N, T] True where frame t < lengths[n]."""
    return np.arange(x.shape[-1])[None, :] < np.asarray(lengths)[:, None]


def default_cache_dir() -> Path:
    if os.environ.get("P2PSER_CACHE_DIR"):
        return Path(os.environ["P2PSER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "p2pser" / "features"


def extract_features(
    utterances: Iterable[Utterance],
    spec: FeatureSpec,
    *,
    classes: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Features of ``utterances`` as a FeatureSet, computing only what the cache lacks.

    ``classes`` fixes the label order; utterances with other emotions are dropped (counted, logged).
    Unusable files are skipped with one warning each. Up to ``workers`` processes (default: all CPUs)
    extract large jobs; they are spawned, so a calling script needs an ``if __name__ == "__main__":``
    guard (without one the workers fail and extraction falls back to this process, with a warning).
    """
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    utterances = list(utterances)
    if not utterances:
        raise UserError("no utterances to extract features from")
    classes, kept, dropped = _select_classes(utterances, classes)
    cache = _Cache(_writable_cache_dir(cache_dir), spec)
    index = _Index(cache.root / "index.json")

    digests: dict[str, str] = {}
    reasons: dict[str, str] = {}
    todo: list[tuple[str, os.stat_result]] = []
    for path in dict.fromkeys(os.path.abspath(u.path) for u in kept):
        try:
            st = os.stat(path)
        except OSError as exc:
            reasons[path] = f"cannot read: {exc.strerror or exc}"
            continue
        digest = index.lookup(path, st)
        if digest is not None and cache.is_complete(digest):
            digests[path] = digest
        else:
            todo.append((path, st))

    warm = len(digests)
    audio_seconds, extracted = 0.0, 0
    for path, st, outcome in _run(todo, cache, workers or os.cpu_count() or 1, progress):
        if outcome.digest is None:
            reasons[path] = outcome.reason or "unreadable"
            continue
        if outcome.note:
            log.warning("%s: %s", path, outcome.note)
        digests[path] = outcome.digest
        index.record(path, st, outcome.digest)
        audio_seconds += outcome.seconds
        extracted += outcome.seconds > 0
    if todo:
        index.save()

    features = _assemble(kept, spec, classes, cache, digests, reasons)
    for path, reason in features.skipped:
        log.warning("skipped %s: %s", path, reason)
    if features.skipped:
        log.warning("skipped %d of %d files (reasons above)", len(features.skipped), len(kept))
    if not features.utterances:
        raise UserError(f"none of the {len(kept)} audio files could be used (see the warnings above)")
    features.stats = {
        "files": len(kept),
        "used": len(features.utterances),
        "skipped": len(features.skipped),
        "dropped_by_class": dropped,
        "from_cache": warm,
        "hashed": len(todo),
        "extracted": extracted,
        "audio_seconds_extracted": round(audio_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall0, 3),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 3),
    }
    return features


def _select_classes(
    utterances: list[Utterance], classes: Sequence[str] | None
) -> tuple[list[str], list[Utterance], int]:
    if classes is None:
        return sorted({u.emotion for u in utterances}), utterances, 0
    classes = list(classes)
    if len(set(classes)) != len(classes) or not classes:
        raise UserError(f"classes {classes} must be a non-empty list without repeats")
    wanted = set(classes)
    kept = [u for u in utterances if u.emotion in wanted]
    dropped = Counter(u.emotion for u in utterances if u.emotion not in wanted)
    if not kept:
        raise UserError(f"no utterance has an emotion among the classes {classes}; the data has {sorted(dropped)}")
    if dropped:
        log.warning(
            "dropped %d utterances whose emotion is not among the classes %s: %s",
            sum(dropped.values()), classes, dict(sorted(dropped.items())),
        )
    absent = sorted(wanted - {u.emotion for u in kept})
    if absent:
        log.warning("no utterances for classes %s", absent)
    return classes, kept, sum(dropped.values())


def _writable_cache_dir(cache_dir: str | Path | None) -> Path:
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


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the extraction workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---- cache ---------------------------------------------------------------------------------------------


def _params_key(params: dict[str, Any]) -> str:
    blob = json.dumps({**params, "cache_version": _CACHE_VERSION, "librosa": version("librosa")}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Cache:
    """Feature files of one spec, addressed by file-content hash."""

    def __init__(self, root: Path, spec: FeatureSpec) -> None:
        self.root = root
        self.spec = spec
        audio = {
            "sample_rate": spec.sample_rate, "trim_db": spec.trim_db, "normalize": spec.normalize,
            "n_fft": spec.n_fft, "hop_length": spec.hop_length, "win_length": spec.win_length,
        }
        self.audio_key = _params_key(audio)
        part_params = {"mfcc": {"n_mels": spec.n_mels, "n_mfcc": spec.n_mfcc}, "logmel": {"n_mels": spec.n_mels}}
        self.part_keys = {p: _params_key({**audio, "part": p, **part_params.get(p, {})}) for p in spec.parts}

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


class _Index:
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


# ---- extraction (runs in worker processes) -------------------------------------------------------------


class _Outcome(NamedTuple):
    digest: str | None  # content hash, None when the file could not be read at all
    reason: str | None  # why the file is unusable when it was not even readable
    seconds: float  # decoded audio seconds when this call computed features, else 0
    note: str | None = None  # damage the user should hear about although the file was used


class _Unusable(Exception):
    """The file's content cannot give features; the message is the reason shown to the user."""


def _run(
    todo: list[tuple[str, os.stat_result]], cache: _Cache, workers: int, progress: bool
) -> Iterator[tuple[str, os.stat_result, _Outcome]]:
    n = min(workers, max(1, len(todo) // _MIN_FILES_PER_WORKER))
    with tqdm(total=len(todo), disable=not progress or not todo, unit="file", desc="features", leave=False) as bar:
        done: set[str] = set()
        log.info("extracting %d files in %s", len(todo), f"{n} worker processes" if n > 1 else "this process")
        if n > 1:
            try:
                for path, st, outcome in _in_pool(todo, cache, n):
                    done.add(path)
                    yield path, st, outcome
                    bar.update()
            except BrokenProcessPool as exc:
                # A worker was killed (out of memory) or could not start (e.g. a calling script without an
                # ``if __name__ == "__main__":`` guard): slower, but still an answer.
                log.warning("feature worker processes failed (%s); extracting the rest in this process", exc)
        ensure_numba_cache()
        # Multi-threaded BLAS on these small matrices is ~20x slower on a busy machine than one thread.
        with threadpool_limits(1):
            for path, st in todo:
                if path not in done:
                    yield path, st, _extract_file(path, cache)
                    bar.update()


def _in_pool(
    todo: list[tuple[str, os.stat_result]], cache: _Cache, n: int
) -> Iterator[tuple[str, os.stat_result, _Outcome]]:
    # spawn: a forked copy of a parent that runs torch or ZeroMQ threads can deadlock.
    context = multiprocessing.get_context("spawn")
    size = max(1, min(32, len(todo) // (4 * n)))
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    with ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(_extract_batch, [p for p, _ in c], cache): c for c in chunks}
        for future in as_completed(futures):
            for (path, st), outcome in zip(futures[future], future.result()):
                yield path, st, outcome


def _init_worker() -> None:
    """One thread per worker process: the workers already use every core between them."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    ensure_numba_cache()
    threadpool_limits(1)  # BLAS was loaded with numpy, before the variables above were set


def _extract_batch(paths: list[str], cache: _Cache) -> list[_Outcome]:
    return [_extract_file(path, cache) for path in paths]


def _extract_file(path: str, cache: _Cache) -> _Outcome:
    """Hash one file and put its features (or the reason it has none) into the cache."""
    try:
        data = _read_file(path)
    except OSError as exc:
        return _Outcome(None, f"cannot read: {exc.strerror or exc}", 0.0)
    except _Unusable as exc:  # not hashed, so not cached: the check costs no more than the stat before it
        return _Outcome(None, str(exc), 0.0)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    missing = cache.missing_parts(digest)
    if cache.skip_path(digest).exists() or not missing:
        return _Outcome(digest, None, 0.0)
    try:
        y, seconds, damage = _load_audio(data, cache.spec)
    except _Unusable as exc:
        cache.save_skip(digest, str(exc))
        return _Outcome(digest, None, 0.0)
    for part, values in _compute_parts(y, cache.spec, missing).items():
        cache.save_part(digest, part, values)
    return _Outcome(digest, None, seconds, f"{damage}; using the {seconds:.2f} s before" if damage else None)


def _read_file(path: str) -> bytes:
    """The bytes of a regular file of at most _MAX_FILE_BYTES; _Unusable (or OSError) otherwise."""
    # O_NONBLOCK: opening a FIFO named like an audio file would otherwise wait forever for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise _Unusable(f"not a regular file ({kind})")
        if st.st_size > _MAX_FILE_BYTES:
            size, limit = st.st_size / 2**20, _MAX_FILE_BYTES // 2**20
            raise _Unusable(f"too large for one utterance ({size:.0f} MB, limit {limit} MB); cut it into "
                            "utterances")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _load_audio(data: bytes, spec: FeatureSpec) -> tuple[np.ndarray, float, str | None]:
    """Decoded, mono, resampled, trimmed and level-normalised waveform, the decoded duration, and the
    damage found when only a leading part of the file decodes (else None)."""
    import librosa

    y, rate, channels, damage = _decode(data)
    # The reasons below name the damage too: "too short" alone would puzzle the owner of a 3 s file.
    suffix = f"; {damage}" if damage else ""
    if not np.isfinite(y).all():
        raise _Unusable("audio contains NaN or infinite samples" + suffix)
    seconds = len(y) / rate
    # A constant offset (a cheap microphone, a badly converted file) carries no sound, yet it would count as
    # level in the silence check, trimming and normalisation.
    offset = float(y.mean(dtype=np.float64))
    y = y - np.float32(offset)
    if rate != spec.sample_rate:
        y = librosa.resample(y, orig_sr=rate, target_sr=spec.sample_rate)
    peak = float(np.abs(y).max())
    if peak < _SILENT_PEAK:
        level = 20 * math.log10(peak) if peak > 0 else -math.inf
        how = [f"after removing a DC offset of {offset:+.3f}"] if abs(offset) >= _SILENT_PEAK else []
        how += [f"after mixing {channels} channels to mono"] if channels > 1 else []
        raise _Unusable(f"silent (peak {level:.0f} dBFS{' ' if how else ''}{' and '.join(how)})" + suffix)
    if spec.trim_db is not None:
        y = _trim(y, spec.trim_db, spec.hop_length)
    if len(y) < spec.n_fft:
        raise _Unusable(f"too short: {1000 * len(y) / spec.sample_rate:.0f} ms of sound" + suffix)
    if spec.normalize == "rms":
        y = y * (10 ** (_RMS_TARGET_DBFS / 20) / max(float(np.sqrt(np.mean(y**2))), 1e-12))
    elif spec.normalize == "peak":
        y = y / float(np.abs(y).max())
    return y.astype(np.float32), seconds, damage


def _decode(data: bytes) -> tuple[np.ndarray, int, int, str | None]:
    """Mono float32 samples at the file's own rate, that rate, the channel count, and the damage if decoding
    failed part-way (else None).

    Reads block by block rather than trusting the header's length: a header claiming billions of frames
    would otherwise allocate them up front, and a decoder error would lose what had decoded before it.
    A file that fails part-way (truncated download, broken FLAC frame) is used up to the failure: the
    frames before it passed the codec's checks (FLAC frames carry a CRC), the features are cropped from
    the start anyway, and a truncated WAV gives the same result because libsndfile silently reads what is
    there. Less than ``min_seconds`` of it is then skipped as too short, naming the damage.
    """
    import soundfile

    if not data:
        raise _Unusable("empty file (0 bytes)")
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except Exception as exc:  # libsndfile reports bad content with several exception types
        raise _Unusable(f"not readable audio ({_decoder_message(exc)})") from exc
    with sound:
        rate, channels = sound.samplerate, sound.channels
        if rate < _MIN_RATE:
            raise _Unusable(f"sample rate {rate} Hz is too low for speech (need at least {_MIN_RATE} Hz)")
        limit = int(_MAX_SECONDS * rate)
        blocks: list[np.ndarray] = []
        decoded, damage = 0, None
        while True:
            try:
                block = sound.read(_DECODE_BLOCK, dtype="float32", always_2d=True)
            except Exception as exc:
                if not decoded:
                    raise _Unusable(f"not readable audio ({_decoder_message(exc)})") from exc
                claimed = sound.frames / rate
                announced = f" of the {claimed:.2f} s its header announces" if sound.frames > decoded else ""
                damage = f"decoding stopped after {decoded / rate:.2f} s{announced} ({_decoder_message(exc)})"
                break
            if not len(block):
                break
            decoded += len(block)
            if decoded > limit:
                raise _Unusable(f"too long: more than {_MAX_SECONDS:.0f} s of audio; cut it into utterances")
            # Mixing down block by block keeps memory at one channel's worth.
            blocks.append(block.mean(axis=1) if channels > 1 else block[:, 0])
    if not decoded:
        raise _Unusable("no audio samples")
    return np.concatenate(blocks), rate, channels, damage


def _decoder_message(exc: Exception) -> str:
    """libsndfile's own words, without its "Error : " prefix or the in-memory file's object address."""
    text = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text.removeprefix("Error : ").rstrip(".")


def _trim(y: np.ndarray, top_db: float, block: int) -> np.ndarray:
    """Cut leading/trailing blocks quieter than ``top_db`` below the loudest block.

    Same rule as librosa.effects.trim on non-overlapping hop-sized blocks, at a tenth of its cost (it
    dominated extraction time).
    """
    n = len(y) // block
    if n == 0:
        return y
    power = np.mean(y[: n * block].reshape(n, block) ** 2, axis=1)
    loud = np.flatnonzero(power > power.max() * 10 ** (-top_db / 10))
    return y[loud[0] * block : min(len(y), (loud[-1] + 1) * block)]


@functools.lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)


def _compute_parts(y: np.ndarray, spec: FeatureSpec, parts: Iterable[str]) -> dict[str, np.ndarray]:
    """Features [C_part, T_full] of each requested part, all from one STFT so their frames align."""
    import librosa

    sr, n_fft, hop = spec.sample_rate, spec.n_fft, spec.hop_length
    power = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, win_length=spec.win_length)) ** 2
    out: dict[str, np.ndarray] = {}
    parts = list(parts)
    if "mfcc" in parts or "logmel" in parts:
        # A plain matmul with a reused filter bank: librosa's melspectrogram rebuilds the bank and uses a
        # slow einsum path, together ten times the cost of this line.
        mel = _mel_basis(sr, n_fft, spec.n_mels) @ power
        logmel = librosa.power_to_db(mel, ref=1.0, top_db=80.0)
        if "logmel" in parts:
            out["logmel"] = logmel
        if "mfcc" in parts:
            mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=spec.n_mfcc)
            deltas = [librosa.feature.delta(mfcc, order=k, mode="nearest") for k in (1, 2)]
            out["mfcc"] = np.concatenate([mfcc, *deltas])
    if "chroma" in parts:
        # Speech has no tuning to estimate; estimating it is slow and only adds noise.
        out["chroma"] = librosa.feature.chroma_stft(S=power, sr=sr, n_fft=n_fft, tuning=0.0)
    if "spectral" in parts:
        mag = np.sqrt(power)
        bands = _contrast_bands(sr)
        rms = librosa.feature.rms(S=mag, frame_length=n_fft)
        out["spectral"] = np.concatenate([
            librosa.feature.spectral_contrast(S=mag, sr=sr, n_fft=n_fft, n_bands=bands, fmin=_CONTRAST_FMIN),
            librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=n_fft) / 1000.0,  # kHz keeps values O(1)
            librosa.feature.spectral_bandwidth(S=mag, sr=sr, n_fft=n_fft) / 1000.0,
            librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=n_fft) / 1000.0,
            librosa.feature.spectral_flatness(S=mag),
            librosa.feature.zero_crossing_rate(y, frame_length=n_fft, hop_length=hop),
            librosa.amplitude_to_db(rms, ref=1.0),
        ])
    frames = power.shape[1]
    return {p: np.ascontiguousarray(out[p][:, :frames], dtype=np.float32) for p in parts}


# ---- assembly ------------------------------------------------------------------------------------------


def _assemble(
    kept: list[Utterance],
    spec: FeatureSpec,
    classes: list[str],
    cache: _Cache,
    digests: dict[str, str],
    reasons: dict[str, str],
) -> FeatureSet:
    """Pad/crop cached full-length features into one [N, C, T] array, skipping unusable files."""
    frames = spec.frames
    x = np.zeros((len(kept), spec.channels, frames), dtype=np.float32)
    lengths: list[int] = []
    used: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
    label_of = {c: i for i, c in enumerate(classes)}
    for utt in kept:
        path = os.path.abspath(utt.path)
        digest = digests.get(path)
        reason = reasons.get(path) or (cache.read_skip(digest) if digest else "not extracted")
        if reason:
            skipped.append((str(utt.path), reason))
            continue
        values = [cache.load_part(digest, part) for part in spec.parts]
        full = values[0].shape[1]
        if full < spec.min_frames:
            seconds = (full - 1) * spec.hop_length / spec.sample_rate
            skipped.append((str(utt.path), f"too short: {seconds:.2f} s of sound (min_seconds {spec.min_seconds})"))
            continue
        n = min(full, frames)
        x[len(used), :, :n] = np.concatenate([v[:, :n] for v in values])
        used.append(utt)
        lengths.append(n)
    x.resize((len(used), spec.channels, frames), refcheck=False)  # drop skipped rows without a copy
    return FeatureSet(
        x=x,
        lengths=np.asarray(lengths, dtype=np.int64),
        labels=np.asarray([label_of[u.emotion] for u in used], dtype=np.int64),
        speakers=np.asarray([u.speaker for u in used], dtype=str),
        classes=classes,
        utterances=used,
        spec=spec,
        skipped=skipped,
    )
