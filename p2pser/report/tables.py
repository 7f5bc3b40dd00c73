"""Human-readable results of a run, printed beside the machine-readable summary.json."""

from __future__ import annotations

from typing import Any

from p2pser.learn.tasks import Task, task_of_summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: dict[str, Any], out_dir: str, task: Task | None = None) -> None:
    task = task or task_of_summary(summary)
    figures = [key for m in task.headline for key in (task.summary_key("mean", m), task.summary_key("min", m),
                                                       task.summary_key("average_model", m),
                                                       f"baseline_centralized_{m}")]
    keys = ["mode", "task", "algorithm", "topology", "peers", "rounds", *figures, "gap_to_centralized",
            "consensus_distance_first", "consensus_distance_last", "bytes_sent_max_peer", "wall_s", "restarts"]
    width = max(len(k) for k in keys)
    for k in keys:
        if k in summary:
            print(f"  {k.ljust(width)}  {_fmt(summary[k])}")
    if summary.get("crashed_peers"):
        print(f"  crashed peers: {summary['crashed_peers']}")
    print(f"results: {out_dir}/summary.json, plots: {out_dir}/*.png")
