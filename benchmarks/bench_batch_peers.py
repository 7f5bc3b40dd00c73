"""Peers stepped together (``p2pser simulate --batch-peers``) against one by one: what changes and how much
faster (issue 12).

    python benchmarks/bench_batch_peers.py [--cases svm-fedavg,svm-dpsgd,mlp-dpsgd,cnn-fedavg]

Each case is simulated twice in one learner process (``--workers 1``), ``--batch-peers off`` then ``on``, on
RAVDESS fold 1 with 20 peers (one per training actor), MFCC frames, 8 local steps of 16 a round and test
UA every round (the Flower comparison's set-up, ``bench_flower.py``; 30 rounds, the mlp 15, the CNN 3).
Compared: every float field of every peer's metrics rows (largest absolute difference per field; test UA also as the number of rows that
differ), every peer's final parameters (``model.npz``), the summary's UAs; and the simulation loop's wall
time (``loop_s``: no start-up, set-up or report), whose ratio is the speed-up of stepping peers together
(the mlp also unbatched in two learner processes).
Writes ``benchmarks/results/batch_peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_common import DATA, REPO, provenance, write_results

RAVDESS = DATA / "ravdess"
TOPOLOGIES = REPO / "topologies"
COMMON = ["--fold", "1", "--features", "mfcc", "--local-steps", "8", "--batch-size", "16", "--eval-every", "1",
          "--workers", "1"]
CASES = {
    "svm-fedavg": ["--model", "svm", "--lr", "0.1", "--rounds", "30", "--algorithm", "fedavg",
                   "--topology", str(TOPOLOGIES / "star-20.toml")],
    "svm-dpsgd": ["--model", "svm", "--lr", "0.1", "--rounds", "30", "--algorithm", "dpsgd",
                  "--topology", str(TOPOLOGIES / "exponential-20.toml"), "--final-mixing", "0"],
    "mlp-dpsgd": ["--model", "mlp", "--rounds", "15", "--algorithm", "dpsgd",
                  "--topology", str(TOPOLOGIES / "exponential-20.toml"), "--final-mixing", "0"],
    # Shortened (3 rounds): enough to see whether a convolutional model gains from it.
    "cnn-fedavg": ["--model", "cnn1d-shallow", "--rounds", "3", "--algorithm", "fedavg",
                   "--topology", str(TOPOLOGIES / "star-20.toml")],
}
# The mlp is over the 20,000 parameters under which --workers 0 kept one process before --batch-peers: also
# timed unbatched in two learner processes, what the default gave it before.
TWO_WORKERS = {"mlp-dpsgd"}
CLOCK = {"elapsed_s", "elapsed"}  # none is wall time (the virtual clock is compared too), kept for safety


def _rows(run: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for path in sorted(run.glob("peer-*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[(row["peer"], row["round"])] = row
    return out


def _compare(off: Path, on: Path) -> dict:
    a, b = _rows(off), _rows(on)
    assert a.keys() == b.keys(), "different rows"
    largest: dict[str, float] = {}
    other_differences = 0
    ua_rows_differing = 0
    for key, row in a.items():
        for field, value in row.items():
            if isinstance(value, float) and isinstance(b[key].get(field), float):
                largest[field] = max(largest.get(field, 0.0), abs(value - b[key][field]))
            elif field not in CLOCK and value != b[key].get(field):
                other_differences += 1
        ua_rows_differing += row.get("test_ua") != b[key].get("test_ua")
    params = 0.0
    for path in sorted(off.glob("peer-*/model.npz")):
        with np.load(path) as x, np.load(on / path.parent.name / "model.npz") as y:
            params = max(params, max(float(np.abs(x[k] - y[k]).max()) for k in x.files))
    return {"rows": len(a), "max_abs_difference": {k: float(f"{v:.3g}") for k, v in sorted(largest.items())},
            "non_float_fields_differing": other_differences, "test_ua_rows_differing": ua_rows_differing,
            "final_parameters_max_abs_difference": float(f"{params:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--name", default="batch_peers")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results: dict = {"load_before": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory(prefix="p2pser-batch-") as tmp:
        for case in args.cases.split(","):
            runs = {}
            for mode in ("off", "on", *(["off-2-workers"] if case in TWO_WORKERS else [])):
                out = Path(tmp) / f"{case}-{mode}"
                load = [round(x, 2) for x in os.getloadavg()]
                extra = ["--batch-peers", "off", "--workers", "2"] if mode == "off-2-workers" else ["--batch-peers", mode]
                cmd = [sys.executable, "-m", "p2pser", "simulate", str(RAVDESS), *COMMON, *CASES[case], *extra,
                       "--out", str(out)]
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                s = json.loads((out / "summary.json").read_text())
                runs[mode] = {"load_at_start": load, "loop_s": s["loop_s"], "wall_s": s["wall_s"],
                              "batched_peers": s.get("batched_peers"), "ua_mean": s.get("ua_mean"),
                              "ua_average_model": s.get("ua_average_model")}
            result = {"command_args": CASES[case], "runs": runs,
                      "loop_speedup": round(runs["off"]["loop_s"] / runs["on"]["loop_s"], 2),
                      **({"loop_speedup_over_two_workers": round(runs["off-2-workers"]["loop_s"] / runs["on"]["loop_s"], 2)}
                         if "off-2-workers" in runs else {}),
                      **_compare(Path(tmp) / f"{case}-off", Path(tmp) / f"{case}-on")}
            results["cases"][case] = result
            print(case, json.dumps({k: v for k, v in result.items() if k != "command_args"}), flush=True)
            write_results(args.name, provenance(sys.argv) | results)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write_results(args.name, provenance(sys.argv) | results)


if __name__ == "__main__":
    main()
