"""Acoustic features for SER, extracted in parallel processes into the content-keyed cache.

Per file: read and clean the waveform (``p2pser.audio.decode``), then compute each feature part
(``p2pser.features.kinds``) into the cache (``p2pser.features.cache``). A file that cannot give features
is skipped with a one-line reason and the run goes on; only a corpus with no usable file is an error. The
cache keeps the full-length features; ``extract_features`` pads or crops them to ``spec.frames`` when it
assembles the array, so changing ``max_seconds`` needs no re-extraction.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from p2pser.audio.corpora import Utterance
from p2pser.audio.decode import Unusable, load_audio, normalize_level, read_file
from p2pser.errors import UserError
from p2pser.features import kinds
from p2pser.features.augment import perturb
from p2pser.features.cache import Cache, Index, writable_cache_dir
from p2pser.features.spec import FeatureSet, FeatureSpec, encode_labels
from p2pser.runtime import ensure_numba_cache

log = logging.getLogger(__name__)

# A worker process costs 3-5 CPU-seconds to start (importing librosa, scipy.signal and numba's cached
# kernels) and then extracts ~150 files per CPU-second: below a few hundred files per worker the start-up
# outweighs the parallel speed-up on a machine whose cores are shared, so smaller jobs run in this process.
_MIN_FILES_PER_WORKER = 400


def extract_features(
    utterances: Iterable[Utterance],
    spec: FeatureSpec,
    *,
    classes: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    augment: str | None = None,
) -> FeatureSet:
    """Features of ``utterances`` as a FeatureSet, computing only what the cache lacks.

    ``classes`` fixes the label order; utterances with other emotions are dropped (counted, logged).
    Unusable files are skipped with one warning each. Up to ``workers`` processes (default: all CPUs)
    extract large jobs; they are spawned, so a calling script needs an ``if __name__ == "__main__":``
    guard (without one the workers fail and extraction falls back to this process, with a warning).
    ``augment``: one perturbation token (``p2pser.features.augment.perturbations``): the features of that
    perturbed copy of each utterance instead of the original's (cached under their own key).
    """
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    utterances = list(utterances)
    if not utterances:
        raise UserError("no utterances to extract features from")
    classes, kept, dropped = _select_classes(utterances, classes)
    cache = Cache(writable_cache_dir(cache_dir), spec, augment=augment)
    index = Index(cache.root / "index.json")

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


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the extraction workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---- extraction (runs in worker processes) -------------------------------------------------------------


class _Outcome(NamedTuple):
    digest: str | None  # content hash, None when the file could not be read at all
    reason: str | None  # why the file is unusable when it was not even readable
    seconds: float  # decoded audio seconds when this call computed features, else 0
    note: str | None = None  # damage the user should hear about although the file was used


def _run(
    todo: list[tuple[str, os.stat_result]], cache: Cache, workers: int, progress: bool
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
    todo: list[tuple[str, os.stat_result]], cache: Cache, n: int
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


def _extract_batch(paths: list[str], cache: Cache) -> list[_Outcome]:
    return [_extract_file(path, cache) for path in paths]


def _extract_file(path: str, cache: Cache) -> _Outcome:
    """Hash one file and put its features (or the reason it has none) into the cache."""
    try:
        data = read_file(path)
    except OSError as exc:
        return _Outcome(None, f"cannot read: {exc.strerror or exc}", 0.0)
    except Unusable as exc:  # not hashed, so not cached: the check costs no more than the stat before it
        return _Outcome(None, str(exc), 0.0)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    missing = cache.missing_parts(digest)
    if cache.skip_path(digest).exists() or not missing:
        return _Outcome(digest, None, 0.0)
    spec = cache.spec
    try:
        y, seconds, damage = load_audio(
            data, sample_rate=spec.sample_rate, trim_db=spec.trim_db, trim_block=spec.hop_length,
            min_samples=spec.n_fft, normalize=spec.normalize,
        )
    except Unusable as exc:
        cache.save_skip(digest, str(exc))
        return _Outcome(digest, None, 0.0)
    if cache.augment:
        y = normalize_level(perturb(y, spec.sample_rate, cache.augment, bytes.fromhex(digest)), spec.normalize)
    for part, values in kinds.compute(y, spec, missing).items():
        cache.save_part(digest, part, values)
    return _Outcome(digest, None, seconds, f"{damage}; using the {seconds:.2f} s before" if damage else None)


# ---- assembly ------------------------------------------------------------------------------------------


def _assemble(
    kept: list[Utterance],
    spec: FeatureSpec,
    classes: list[str],
    cache: Cache,
    digests: dict[str, str],
    reasons: dict[str, str],
) -> FeatureSet:
    """Pad/crop cached full-length features into one [N, C, T] array, skipping unusable files."""
    frames = spec.frames
    x = np.zeros((len(kept), spec.channels, frames), dtype=np.float32)
    lengths: list[int] = []
    used: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
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
        labels=encode_labels([u.emotion for u in used], classes),
        speakers=np.asarray([u.speaker for u in used], dtype=str),
        classes=classes,
        utterances=used,
        spec=spec,
        skipped=skipped,
    )
