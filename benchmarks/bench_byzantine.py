"""Issue 6 Byzantine target: 2 of 20 peers attacking, plain averaging against robust mixing, on real speech.

RAVDESS fold 1, 20 peers (one actor each) on ``topologies/exponential-20.toml`` (degree 8), dpsgd, the default
model (cnn1d-shallow on mfcc) and schedule (30 rounds of 8 local steps), seed 0, simulated (``p2pser
simulate``: the same peer code as ``p2pser launch``). Arms:

- no attack x {average, clipped, trimmed}: what robust mixing costs when nobody lies (target: at most 1 point);
- peers 3 and 11 send sign-flipped models x {average, clipped, trimmed};
- ``--parts extra``: scaled (x10) and random (std 10) models x {average, clipped, trimmed}.

Peers 3 and 11 are neighbours, and peers 7, 15 and 19 have both as neighbours: the worst a 2-attacker
placement does on this graph. ``--trim 2`` so that a peer with both attackers among its neighbours can
drop both; clipping uses the adaptive radius (``--clip-radius 0``). Every arm reports the honest peers'
mean and minimum final test UA (the attackers train honestly and lie only on the wire, so their own UA is
left out). Results: benchmarks/results/byzantine.json; run folders under ``--work``.

    python benchmarks/bench_byzantine.py [--parts main,extra] [--work /tmp/bzwork]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulate import DATA, RESULTS, TOPOLOGIES, brief, run_timed

from p2pser.report.summary import honest_figures

ATTACKERS = (3, 11)
COMMON = ["--fold", "1", "--topology", str(TOPOLOGIES / "exponential-20.toml"), "--algorithm", "dpsgd",
          "--seed", "0", "--trim", "2", "--clip-radius", "0"]
MAIN = [(f"{attack}/{mixing}", mixing, attack) for attack in ("none", "sign-flip")
        for mixing in ("average", "clipped", "trimmed")]
EXTRA = [(f"{attack}/{mixing}", mixing, attack) for attack in ("scale", "random")
         for mixing in ("average", "clipped", "trimmed")]


def run_arm(work: Path, cache: Path, label: str, mixing: str, attack: str) -> dict:
    out = work / label.replace("/", "-")
    args = ["simulate", str(DATA / "ravdess"), *COMMON, "--mixing", mixing, "--cache-dir", str(cache),
            "--out", str(out)]
    if attack != "none":
        args += ["--attack", attack, "--attackers", ",".join(map(str, ATTACKERS))]
    timed = run_timed(args, work / f"{out.name}.log")
    summary = json.loads((out / "summary.json").read_text())
    finals = {p["peer"]: p["ua"] for p in summary["per_peer"]}
    # Honest figures over the same 18 peers in every arm, so attacked and clean arms compare like with like.
    return timed | brief(summary) | honest_figures(finals, ATTACKERS) | {
        "attackers": list(ATTACKERS) if attack != "none" else [], "mixing": mixing, "attack": attack}


def table(arms: dict) -> str:
    rows = ["| attack | mixing | honest test UA mean (min), % | all peers' UA mean, % | wall s |",
            "|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(("none", "sign-flip", "scale", "random", "average", "clipped", "trimmed"))}
    for label, a in sorted(arms.items(), key=lambda kv: [order[part] for part in kv[0].split("/")]):
        attack, mixing = label.split("/")
        rows.append(f"| {attack} | {mixing} | {100 * a['honest_test_ua_mean']:.1f} ({100 * a['honest_test_ua_min']:.1f})"
                    f" | {100 * a['ua_mean']:.1f} | {a['wall_s']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="main", help="main (6 arms) and/or extra (6 arms), comma list")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bzwork"), help="run folders")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default WORK/cache)")
    parser.add_argument("--only", default=None, help="comma list of arm labels to (re)run, e.g. none/average")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or args.work / "cache"
    out = RESULTS / "byzantine.json"
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results.update(machine=f"{os.cpu_count()} CPUs (shared with other engineers), no GPU",
                   options=" ".join(COMMON) + f" (attackers {ATTACKERS}; honest = the other 18 in every arm)", date=time.strftime("%Y-%m-%d %H:%M"))
    arms = results.setdefault("arms", {})
    todo = [arm for part in args.parts.split(",") for arm in {"main": MAIN, "extra": EXTRA}[part]]
    if args.only:
        todo = [arm for arm in todo if arm[0] in args.only.split(",")]
    for label, mixing, attack in todo:
        print(f"== {label}", flush=True)
        arms[label] = run_arm(args.work, cache, label, mixing, attack)
        print(json.dumps({k: arms[label][k] for k in ("honest_test_ua_mean", "honest_test_ua_min", "wall_s")}),
              flush=True)
        out.write_text(json.dumps(results, indent=1))
    clean, attacked = "none/average", "sign-flip/average"
    if clean in arms:
        results["robust_cost_points"] = {
            m: round(100 * (arms[clean]["honest_test_ua_mean"] - arms[f"none/{m}"]["honest_test_ua_mean"]), 2)
            for m in ("clipped", "trimmed") if f"none/{m}" in arms}
    if attacked in arms:
        results["sign_flip_gain_over_average_points"] = {
            m: round(100 * (arms[f"sign-flip/{m}"]["honest_test_ua_mean"] - arms[attacked]["honest_test_ua_mean"]), 2)
            for m in ("clipped", "trimmed") if f"sign-flip/{m}" in arms}
    results["table"] = table(arms)
    out.write_text(json.dumps(results, indent=1))
    print(results["table"])
    print(f"results: {out}")


if __name__ == "__main__":
    main()
