"""Human-readable results of a run, printed beside the machine-readable summary.json."""

from __future__ import annotations

from typing import Any

from p2pser.learn.tasks import CLASSIFICATION, Task


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: dict[str, Any], out_dir: str, task: Task = CLASSIFICATION) -> None:
    keys = ["mode", "algorithm", "topology", "peers", "rounds", task.summary_key("mean"), task.summary_key("min"),
            task.summary_key("average_model"), f"baseline_centralized_{task.primary}", "gap_to_centralized",
            "consensus_distance_first", "consensus_distance_last", "bytes_sent_max_peer", "wall_s", "restarts"]
    width = max(len(k) for k in keys)
    for k in keys:
        if k in summary:
            print(f"  {k.ljust(width)}  {_fmt(summary[k])}")
    if summary.get("crashed_peers"):
        print(f"  crashed peers: {summary['crashed_peers']}")
    print(f"results: {out_dir}/summary.json, plots: {out_dir}/*.png")
