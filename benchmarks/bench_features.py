"""Feature extraction speed on all of RAVDESS: cold (empty cache) and warm (everything cached).

Cold runs extract into a fresh temporary cache, once per worker count; speed is seconds of audio per
CPU-second (this process plus its worker processes, so it does not depend on how busy the other cores
are) and utterances per wall-second. Warm runs read the cache that the cold run filled and open no audio
file; speed is utterances per wall-second (median of ``--repeats``). Writes benchmarks/results/features.json.

    python benchmarks/bench_features.py [--data ../shared/data/ravdess] [--kind mfcc] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from p2pser.audio.corpora import load_corpus
from p2pser.features.extract import extract_features
from p2pser.features.spec import FeatureSpec
from p2pser.runtime import ensure_numba_cache

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "features.json"
DATA = HERE.parent.parent / "shared" / "data" / "ravdess"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="corpus folder (default: shared RAVDESS)")
    parser.add_argument("--kind", default=FeatureSpec().kind, help="feature kind (default spec otherwise)")
    parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    ensure_numba_cache()
    spec = FeatureSpec(kind=args.kind)
    corpus = load_corpus(args.data)
    load_before = os.getloadavg()
    cold, warm = [], []
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        with tempfile.TemporaryDirectory(prefix="p2pser-bench-cache-") as cache:
            fs = extract_features(corpus.utterances, spec, cache_dir=cache, workers=workers, progress=False)
            s = fs.stats
            cold.append({
                "workers": workers, **s,
                "audio_seconds_per_cpu_second": round(s["audio_seconds_extracted"] / s["cpu_seconds"], 1),
                "utterances_per_wall_second": round(s["files"] / s["wall_seconds"], 1),
            })
            print(f"cold, {workers} workers: {s['files']} files, {s['audio_seconds_extracted']:.0f} s of audio in "
                  f"{s['wall_seconds']:.1f} s wall / {s['cpu_seconds']:.1f} CPU-s = "
                  f"{cold[-1]['audio_seconds_per_cpu_second']} audio-s per CPU-s")
            if not warm:
                for _ in range(args.repeats):
                    again = extract_features(corpus.utterances, spec, cache_dir=cache, progress=False)
                    assert again.stats["from_cache"] == again.stats["files"], again.stats
                    warm.append(again.stats)
    wall = statistics.median(w["wall_seconds"] for w in warm)
    result = {
        "corpus": str(args.data),
        "files": len(corpus.utterances),
        "spec": spec.to_dict(),
        "shape": list(fs.x.shape),
        "cold": cold,
        "warm": {"runs": warm, "median_wall_seconds": wall,
                 "utterances_per_second": round(len(corpus.utterances) / wall, 1)},
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version()},
    }
    print(f"warm: {result['warm']['utterances_per_second']} utterances/s (median of {args.repeats}, {wall:.2f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
