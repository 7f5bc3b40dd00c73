"""Comparison of the runs of a sweep: one table and one figure across them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from p2pser.learn.tasks import Task, task_of_summary
from p2pser.report.summary import per_round, read_metrics


def write_comparison(out_dir: Path, summaries: list[dict], baseline: dict | None,
                     task: Task | None = None) -> Path:
    """``comparison.md`` and ``comparison.json``, and ``comparison.png``: the task's metric against rounds
    and against bytes, and the consensus distance, across the runs of a sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = task or task_of_summary(summaries[0])
    m = task.label()
    lines = [
        (
            f"| run | peers | rounds | {m} mean | {m} min | {m} of average model | consensus first -> last | "
            "bytes busiest peer | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if task.primary == "ua" else f"{v:.3f}"

    for s in summaries:
        lines.append(
            f"| {s['label']} | {s['peers']} | {s['rounds']} | {pct(s[task.summary_key('mean')])} | "
            f"{pct(s[task.summary_key('min')])} | {pct(s[task.summary_key('average_model')])} | {s['consensus_distance_first'] or 0:.3g} -> "
            f"{s['consensus_distance_last'] or 0:.3g} | {s['bytes_sent_max_peer']:,} | {s['wall_s']} |"
        )
    if baseline is not None:
        lines.append(f"| centralized (pooled data, {baseline.get('budget') or str(baseline['epochs']) + ' epochs'}) | 1 | - | {pct(baseline[task.primary])} | "
                     f"- | - | - | 0 | {baseline['wall_s']} |")
    table = out_dir / "comparison.md"
    table.write_text("\n".join(lines) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps({"runs": summaries, "baseline": baseline}, indent=1))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in summaries:
        run_dir = out_dir / s["label"] if len(summaries) > 1 else out_dir
        metrics = read_metrics(run_dir)
        ua = {r: float(np.mean(v)) for r, v in per_round(metrics, task.test_key()).items()}
        busiest = {r: float(np.max(v)) for r, v in per_round(metrics, "bytes_sent").items()}
        axes[0].plot(list(ua), list(ua.values()), label=s["label"])
        axes[1].plot([busiest[r] / 1e6 for r in ua if r in busiest], [ua[r] for r in ua if r in busiest],
                     label=s["label"])
        cd = {int(k): v for k, v in s["consensus_distance_per_round"].items()}
        axes[2].plot(list(cd), list(cd.values()), label=s["label"])
    if baseline is not None:
        for ax in axes[:2]:
            ax.axhline(baseline[task.primary], color="k", ls="--", lw=1, label="centralized")
    axes[0].set(xlabel="round", ylabel=f"mean test {m}", title=f"{m} against rounds")
    axes[1].set(xlabel="MB sent by the busiest peer", ylabel=f"mean test {m}", title=f"{m} against communication")
    axes[2].set(xlabel="round", ylabel="consensus distance", title="Consensus distance", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", dpi=110)
    plt.close(fig)
    return table
