"""Issue 15: what differential privacy costs and what it buys, on real speech.

RAVDESS fold 1, 20 peers (one actor each) on topologies/exponential-20.toml, the default model and recipe,
simulated (``p2pser simulate`` gives the launch's numbers exactly; BENCHMARKS.md, issue 11), each arm with
``--record-updates first-layer`` and then attacked by ``p2pser audit RUN --shadow EMODB`` (shadow peers on
EmoDB, which is disjoint from RAVDESS and labels sex). Per arm: task UA (mean of peers, average model), the
worst peer's epsilon, the attack's UAR with its 95% bootstrap interval, and the wall time of the simulation
and its CPU time (the overhead of each DP mode against no DP, same machine, same script; CPU time is the
fairer measure on a shared machine).

Arms (``--arms``, comma list, in order; each rewrites its own entry in benchmarks/results/privacy.json):
``none``, ``none-global`` (no DP, ``--normalizer global``: a check of the attack), ``speaker-10``, ``speaker-4``, ``speaker-1``, ``utterance-10``, ``utterance-4``, ``utterance-1``.
Delta is fixed at the default 1e-5 (below 1/20 peers and 1/51 utterances of a peer).

    python benchmarks/bench_privacy.py --arms none,speaker-10,utterance-10,speaker-4,utterance-4,speaker-1,utterance-1
    python benchmarks/bench_privacy.py --model svm --name privacy-svm     # the linear model: minutes, not hours
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench_common import DATA, REPO, RESULTS, provenance, write_results
from bench_simulate import run_timed

RAVDESS, EMODB = DATA / "ravdess", DATA / "emodb"
TOPOLOGY = REPO / "topologies" / "exponential-20.toml"
ARMS = {
    "none": [],
    # A check of the attack itself: without the per-speaker normaliser, which removes most of what makes
    # one voice differ from another from every input, sex should be easier to read from the updates.
    "none-global": ["--normalizer", "global"],
    **{f"{mode}-{eps}": ["--dp", mode, "--dp-epsilon", str(eps)] for mode in ("speaker", "utterance")
       for eps in (10, 4, 1)},
}
SUMMARY_FIELDS = ("ua_mean", "ua_min", "ua_average_model", "dp_mode", "dp_epsilon", "dp_delta", "rounds", "peers")
AUDIT_FIELDS = ("attack_uar", "ci_low", "ci_high", "chance", "attack_uar_vote", "peers_attacked", "predictions",
                "shadow_peers", "shadow_speakers", "shadow_cv_uar", "attack_uar_per_round")


def cpu_seconds(log: Path) -> float | None:
    """User + system CPU seconds of a command run under /usr/bin/time -v (its log): unlike wall time, hardly
    moved by other jobs on a shared machine."""
    text = log.read_text(errors="replace") if log.exists() else ""
    parts = [float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return round(sum(parts), 1) if len(parts) == 2 else None


def arm(work: Path, name: str, shadow_folds: int, model: str) -> dict:
    out = work / name
    sim = run_timed(["simulate", str(RAVDESS), "--fold", "1", "--topology", str(TOPOLOGY), "--model", model, *ARMS[name],
                     "--record-updates", "first-layer", "--cache-dir", str(work / "cache"), "--out", str(out)],
                    work / f"{name}.log")
    summary = json.loads((out / "summary.json").read_text())
    audit = run_timed(["audit", str(out), "--shadow", str(EMODB), "--shadow-folds", str(shadow_folds)],
                      work / f"{name}-audit.log")
    result = json.loads((out / "audit.json").read_text())
    return {"simulate": sim | {"cpu_s": cpu_seconds(work / f"{name}.log")}, "audit_command": audit["command"], "audit_wall_s": audit["wall_s"],
            **{k: summary.get(k) for k in SUMMARY_FIELDS}, **{k: result.get(k) for k in AUDIT_FIELDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/privacy-work"))
    parser.add_argument("--shadow-folds", type=int, default=2,
                        help="EmoDB folds the attacker simulates (2 cover all 10 speakers as shadow peers)")
    parser.add_argument("--name", default="privacy", help="results file name")
    parser.add_argument("--model", default="cnn1d-shallow",
                        help="the model of every arm (default: the default model, as the issue asks)")
    args = parser.parse_args()
    (args.work / args.model).mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()).get("arms", {}) if path.exists() else {}
    for name in args.arms.split(","):
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
        results[name] = arm(args.work / args.model, name, args.shadow_folds, args.model)
        base = results.get("none")
        for other, entry in results.items():
            entry["simulate"].setdefault("cpu_s", cpu_seconds(args.work / args.model / f"{other}.log"))
            if base is not None:
                entry["wall_overhead_vs_none"] = round(entry["simulate"]["wall_s"] / base["simulate"]["wall_s"] - 1, 3)
                if entry["simulate"]["cpu_s"] and base["simulate"]["cpu_s"]:
                    entry["cpu_overhead_vs_none"] = round(entry["simulate"]["cpu_s"] / base["simulate"]["cpu_s"] - 1, 3)
                entry["ua_drop_vs_none"] = None if entry["ua_mean"] is None else base["ua_mean"] - entry["ua_mean"]
        write_results(args.name, {"arms": results, "delta": 1e-5, "model": args.model} | provenance(sys.argv))
        print(f"{name}: UA {results[name]['ua_mean']}, epsilon {results[name]['dp_epsilon']}, "
              f"attack UAR {results[name]['attack_uar']} [{results[name]['ci_low']}, {results[name]['ci_high']}]",
              flush=True)


if __name__ == "__main__":
    main()
