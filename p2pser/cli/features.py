"""``p2pser features``: extract a corpus's features into the on-disk cache and say what came out."""

from __future__ import annotations

import argparse
import json

from p2pser.audio.corpora import load_corpus
from p2pser.audio.decode import NORMALIZATIONS
from p2pser.config import RunConfig
from p2pser.features.cache import default_cache_dir
from p2pser.features.extract import extract_features
from p2pser.features.kinds import KINDS
from p2pser.features.spec import FeatureSet, FeatureSpec

_DEFAULT = FeatureSpec()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features", help="extract features of a corpus into the cache; print counts, shape, skipped files, speed"
    )
    p.add_argument("data_dir", metavar="DIR", help="corpus folder (or manifest) as for `p2pser data info`")
    # The runs' default kind, so that `p2pser features DIR` warms the cache the default runs read.
    add_spec_arguments(p, kind=RunConfig.features)
    p.add_argument("--workers", type=int, default=None, help="extraction processes (default: all CPUs)")
    p.add_argument("--cache-dir", default=None,
                   help=f"feature cache folder (default $P2PSER_CACHE_DIR or {default_cache_dir()})")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def add_spec_arguments(p: argparse.ArgumentParser, kind: str = _DEFAULT.kind) -> None:
    """The FeatureSpec flags, for every command that extracts features; ``kind`` is the command's default
    feature kind (`train` learns on the run defaults' features, not on the spec's)."""
    p.add_argument("--kind", default=kind,
                   help=f"{', '.join(KINDS)} or a '+' combination such as mfcc+chroma (default {kind})")
    p.add_argument("--max-seconds", type=float, default=_DEFAULT.max_seconds,
                   help=f"fixed length: longer utterances are cropped, shorter padded (default {_DEFAULT.max_seconds})")
    p.add_argument("--min-seconds", type=float, default=_DEFAULT.min_seconds,
                   help=f"skip utterances with less sound than this after trimming (default {_DEFAULT.min_seconds})")
    p.add_argument("--sample-rate", type=int, default=_DEFAULT.sample_rate, help="resample to this rate (Hz)")
    p.add_argument("--n-mfcc", type=int, default=_DEFAULT.n_mfcc, help="MFCCs (each with deltas, delta-deltas)")
    p.add_argument("--n-mels", type=int, default=_DEFAULT.n_mels, help="mel bands")
    p.add_argument("--win-ms", type=float, default=_DEFAULT.win_ms, help="analysis window (ms)")
    p.add_argument("--hop-ms", type=float, default=_DEFAULT.hop_ms, help="frame hop (ms)")
    p.add_argument("--trim-db", type=float, default=_DEFAULT.trim_db,
                   help=f"trim edges this many dB below the peak; 0 keeps them (default {_DEFAULT.trim_db})")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default=_DEFAULT.normalize,
                   help=f"per-recording level normalisation (default {_DEFAULT.normalize})")


def spec_from_args(args: argparse.Namespace) -> FeatureSpec:
    return FeatureSpec(
        kind=args.kind, sample_rate=args.sample_rate, n_mfcc=args.n_mfcc, n_mels=args.n_mels, win_ms=args.win_ms,
        hop_ms=args.hop_ms, max_seconds=args.max_seconds, min_seconds=args.min_seconds,
        trim_db=args.trim_db or None, normalize=args.normalize,
    )


def _run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    corpus = load_corpus(args.data_dir)
    features = extract_features(
        corpus.utterances, spec, cache_dir=args.cache_dir, workers=args.workers, progress=not args.no_progress
    )
    summary = summarize(features, corpus.name)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def summarize(features: FeatureSet, corpus_name: str) -> dict:
    stats = features.stats
    counts = {c: int((features.labels == i).sum()) for i, c in enumerate(features.classes)}
    cpu = stats["cpu_seconds"]
    return {
        "corpus": corpus_name,
        "spec": features.spec.to_dict(),
        "shape": list(features.x.shape),
        "speakers": len(set(features.speakers.tolist())),
        "classes": counts,
        "frames": {"min": int(features.lengths.min()), "mean": round(float(features.lengths.mean()), 1),
                   "max": int(features.lengths.max()), "cropped": int((features.lengths == features.spec.frames).sum())},
        **stats,
        "skipped_files": [{"file": path, "reason": reason} for path, reason in features.skipped],
        "audio_seconds_per_cpu_second": round(stats["audio_seconds_extracted"] / cpu, 1) if stats["extracted"] else None,
        "utterances_per_second": round(stats["files"] / max(stats["wall_seconds"], 1e-9), 1),
    }


def format_summary(s: dict) -> str:
    n, c, t = s["shape"]
    spec = s["spec"]
    frames = s["frames"]
    lines = [
        f"{s['corpus']}: {s['files']} files, {s['used']} used, {s['skipped']} skipped, {s['speakers']} speakers",
        f"features {spec['kind']}: x [{n}, {c}, {t}] float32 ({spec['max_seconds']} s at {spec['hop_ms']} ms hop)",
        f"valid frames: min {frames['min']}, mean {frames['mean']}, max {frames['max']} ({frames['cropped']} cropped)",
        "classes: " + ", ".join(f"{name} {count}" for name, count in s["classes"].items()),
    ]
    lines += [f"  skipped {item['file']}: {item['reason']}" for item in s["skipped_files"]]
    speed = f"{s['utterances_per_second']} utterances/s"
    if s["audio_seconds_per_cpu_second"] is not None:
        speed += (f"; {s['audio_seconds_extracted']:.0f} s of audio extracted, "
                  f"{s['audio_seconds_per_cpu_second']} audio-s per CPU-s")
    lines.append(
        f"cache: {s['extracted']} extracted, {s['from_cache']} from cache; "
        f"{s['wall_seconds']:.2f} s wall, {s['cpu_seconds']:.2f} CPU-s; {speed}"
    )
    return "\n".join(lines)
