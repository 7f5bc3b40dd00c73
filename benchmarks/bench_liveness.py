"""Issue 6 item 2: what a dead neighbour costs with fixed and with adaptive deadlines, simulated and real.

RAVDESS fold 1, topologies/exponential-20.toml, dpsgd, svm on mfcc, 30 rounds of 4 local steps, eval every 5,
round_timeout 20 s (the default). Arms:

- ``sim-fixed`` / ``sim-adaptive``: ``p2pser simulate --churn 7@15-`` (peer 7 dies after its round 15);
- ``launch-clean``: ``p2pser launch`` (20 processes), adaptive, no fault: every row must have heard == degree;
- ``launch-fixed`` / ``launch-adaptive``: ``p2pser launch``, peer 7's process gets SIGKILL after its round 15.

Per arm: for each neighbour of the dead peer, the round in which it gave up on it, that round's deadline and
length, and the time lost (that length less the neighbour's median round before the crash); rows in which a
live neighbour was dropped (before the crash: false suspects; after it: the ripple); the longest wait /
deadline ratio after the warm-up. ``--parts analyse`` re-reads existing run folders. Results: --out JSON.

    python bench_liveness.py --work /tmp/liv/bench --out liveness.json [--parts sim,clean,fixed,adaptive]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ravdess"
TOPO = REPO / "topologies" / "exponential-20.toml"
KILLED, AFTER = 7, 15
COMMON = ["--model", "svm", "--features", "mfcc", "--lr", "0.02", "--seed", "0", "--fold", "1", "--rounds", "30",
          "--local-steps", "4", "--eval-every", "5"]


def rows_of(run: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted(run.glob("peer-*/metrics.jsonl")):
        out[int(f.parent.name.split("-")[1])] = [json.loads(line) for line in f.read_text().splitlines()
                                                 if line.strip()]
    return out


def neighbours_of(k: int) -> list[int]:
    from p2pser.exchange.topology import load_topology

    return load_topology(TOPO).neighbours(k)


def analyse(run: Path, killed: int | None) -> dict:
    from p2pser.exchange.liveness import MIN_WINDOW

    metrics = rows_of(run)
    degree = {k: len(neighbours_of(k)) for k in metrics}
    if killed is None:
        for k, rows in metrics.items():
            assert rows[-1]["round"] == 29, k
    lengths = {k: [b["time"] - a["time"] for a, b in itertools.pairwise(rows)] for k, rows in metrics.items()}
    normal = statistics.median(x for k, ls in lengths.items() for x in ls[1:AFTER])
    crash_round = AFTER if killed is not None else None
    result: dict = {"normal_round_s": round(normal, 3)}
    before = [r for k, rows in metrics.items() for r in rows if crash_round is None or r["round"] <= crash_round]
    result["false_drops_before_crash"] = sum(r["heard"] < degree[r["peer"]] for r in before)
    ratios = [r["wait_s"] / r["deadline_s"] for r in before if r["round"] > MIN_WINDOW]
    result["max_wait_over_deadline_after_warmup"] = round(max(ratios, default=0.0), 4)
    result["max_wait_s_after_warmup"] = max((r["wait_s"] for r in before if r["round"] > MIN_WINDOW), default=0)
    result["min_deadline_s_after_warmup"] = min((r["deadline_s"] for r in before if r["round"] > MIN_WINDOW),
                                                default=None)
    if killed is None:
        return result
    alive = {k: rows for k, rows in metrics.items() if k != killed}
    near = neighbours_of(killed)
    detection = {}
    for k in near:
        rows = metrics[k]
        i = next(i for i, r in enumerate(rows) if r["heard"] < degree[k])
        own_normal = statistics.median(lengths[k][1:AFTER])
        detection[k] = {"round": rows[i]["round"], "deadline_s": rows[i]["deadline_s"],
                        "round_s": round(rows[i]["time"] - rows[i - 1]["time"], 2),
                        "lost_s": round(rows[i]["time"] - rows[i - 1]["time"] - own_normal, 2)}
    result |= {
        "dead_peer_neighbours": near,
        "detection": detection,
        "lost_s_per_neighbour_mean": round(statistics.mean(d["lost_s"] for d in detection.values()), 2),
        "lost_s_per_neighbour_max": round(max(d["lost_s"] for d in detection.values()), 2),
        "rows_with_a_live_neighbour_dropped_after_crash": sum(
            r["heard"] < degree[k] - (killed in neighbours_of(k))
            for k, rows in alive.items() for r in rows if r["round"] > AFTER),
        "finished": all(rows[-1]["round"] == 29 for rows in alive.values()),
    }
    return result


def p2pser(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pser", *args]


def launch(out: Path, cache: Path, liveness: str, kill: bool, log: Path) -> dict:
    cmd = p2pser("launch", str(TOPO), str(DATA), *COMMON, "--liveness", liveness, "--cache-dir", str(cache),
                 "--out", str(out), "--quiet")
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        killed_at = None
        metrics = out / f"peer-{KILLED:03d}" / "metrics.jsonl"
        while proc.poll() is None:
            time.sleep(0.2)
            if kill and killed_at is None and metrics.exists() and len(metrics.read_text().splitlines()) > AFTER:
                pid = json.loads((out / f"peer-{KILLED:03d}" / "status.json").read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic() - t0
        proc.wait()
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(time.monotonic() - t0, 1), "killed_at_s": killed_at and round(killed_at, 1),
            "ua_mean": summary["ua_mean"], "command": " ".join(cmd[2:])}


def simulate(out: Path, cache: Path, liveness: str, log: Path) -> dict:
    cmd = p2pser("simulate", str(DATA), "--topology", str(TOPO), *COMMON, "--liveness", liveness,
                 "--churn", f"{KILLED}@{AFTER}-", "--cache-dir", str(cache), "--out", str(out))
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"virtual_time_s": summary["virtual_time_s"], "ua_mean": summary["ua_mean"], "command": " ".join(cmd[2:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/liv/bench"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/gwork/cache"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/liv/liveness.json"))
    parser.add_argument("--parts", default="sim,clean,fixed,adaptive", help="also: analyse")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    parts = args.parts.split(",")
    if "sim" in parts:
        for mode in ("fixed", "adaptive"):
            run = args.work / f"sim-{mode}"
            info = simulate(run, args.cache, mode, args.work / f"sim-{mode}.log")
            results[f"sim-{mode}"] = info | analyse(run, KILLED)
            args.out.write_text(json.dumps(results, indent=1))
    for part, liveness, kill in (("clean", "adaptive", False), ("fixed", "fixed", True),
                                 ("adaptive", "adaptive", True)):
        if part in parts:
            run = args.work / f"launch-{part}"
            info = launch(run, args.cache, liveness, kill, args.work / f"launch-{part}.log")
            results[f"launch-{part}"] = info | analyse(run, KILLED if kill else None)
            args.out.write_text(json.dumps(results, indent=1))
    if "analyse" in parts:
        for name in ("sim-fixed", "sim-adaptive", "launch-clean", "launch-fixed", "launch-adaptive"):
            if name in results:
                killed = None if name == "launch-clean" else KILLED
                results[name] = {k: v for k, v in results[name].items()
                                 if k in ("wall_s", "killed_at_s", "command", "virtual_time_s", "ua_mean")}
                results[name] |= analyse(args.work / name, killed)
    results["load_average"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
