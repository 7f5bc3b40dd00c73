"""Turn a run folder's per-peer files into ``summary.json`` and plots.

Both ``p2pser launch`` (many processes) and ``p2pser simulate`` (one process) write the same per-peer files
(``peer-KKK/metrics.jsonl``, ``model.npz``, ``normalizer.json``, ``status.json``), so one report serves both
and their summaries can be compared field by field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.learn.tasks import CLASSIFICATION, Task
from p2pser.report.run_folder import (
    CONFIG,
    METRICS,
    MODEL,
    NORMALIZER,
    PEER_GLOB,
    STATUS,
    SUMMARY,
    peer_id_of,
)

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> dict[int, list[dict]]:
    """Rows per peer; a torn last line (a peer killed mid-write) is skipped, never fatal."""
    out: dict[int, list[dict]] = {}
    for folder in sorted(run_dir.glob(PEER_GLOB)):
        peer = peer_id_of(folder)
        rows = []
        path = folder / METRICS
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipped a torn metrics line", path)
        out[peer] = rows
    return out


def read_status(run_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted(run_dir.glob(f"{PEER_GLOB}/{STATUS}")):
        try:
            status = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out[int(status["peer"])] = status
    return out


def per_round(metrics: dict[int, list[dict]], key: str) -> dict[int, list[float]]:
    """For each round, the values of ``key`` over the peers that reported it."""
    rounds: dict[int, list[float]] = {}
    for rows in metrics.values():
        for row in rows:
            if row.get(key) is not None:
                rounds.setdefault(int(row["round"]), []).append(float(row[key]))
    return dict(sorted(rounds.items()))


def final_value(rows: list[dict], key: str) -> float | None:
    for row in reversed(rows):
        if row.get(key) is not None:
            return float(row[key])
    return None


def load_models(run_dir: Path) -> list[tuple[int, dict[str, np.ndarray], dict]]:
    """(peer, parameters, normalizer dict) for every peer that saved a model."""
    out = []
    for folder in sorted(run_dir.glob(PEER_GLOB)):
        model, norm = folder / MODEL, folder / NORMALIZER
        if model.exists() and norm.exists():
            with np.load(model, allow_pickle=False) as z:
                params = {k: z[k] for k in z.files}
            out.append((peer_id_of(folder), params, json.loads(norm.read_text())))
    return out


def run_attackers(run_dir: Path) -> frozenset[int]:
    """The attacking peers of a run whose folder holds its ``config.toml`` (launch, multi-host runs)."""
    from p2pser.config import load_config
    from p2pser.exchange.attacks import attacking_peers

    path = run_dir / CONFIG
    return attacking_peers(load_config(path)) if path.exists() else frozenset()


def honest_figures(finals: Mapping[int, float | None], attackers: Iterable[int],
                   task: Task = CLASSIFICATION) -> dict[str, Any]:
    """The final test metric over the honest peers only: what an attack costs the peers that do not attack
    (``honest_test_ua_mean`` ... for classification)."""
    attackers = sorted(set(attackers))
    honest = [v for p, v in finals.items() if p not in attackers and v is not None]
    return {
        "attackers": attackers,
        "honest_peers": sum(1 for p in finals if p not in attackers),
        f"honest_{task.test_key()}_mean": float(np.mean(honest)) if honest else None,
        f"honest_{task.test_key()}_min": float(np.min(honest)) if honest else None,
    }


def privacy_figures(metrics: Mapping[int, list[dict]]) -> dict[str, Any]:
    """The worst peer's epsilon (``dp_epsilon``; the last each peer reported) and each peer's, for runs with
    differential privacy (their rows carry ``dp_epsilon``); empty otherwise."""
    spent = {p: final_value(rows, "dp_epsilon") for p, rows in metrics.items()}
    spent = {p: v for p, v in spent.items() if v is not None}
    if not spent:
        return {}
    return {"dp_epsilon": max(spent.values()), "dp_epsilon_per_peer": dict(sorted(spent.items()))}


def bytes_sent(rows: list[dict]) -> int:
    """Bytes a peer sent over all its lives: each restart (or continued run) counts from zero again."""
    total = last = 0
    for row in rows:
        if row["bytes_sent"] < last:
            total += last
        last = row["bytes_sent"]
    return int(total + last)


def summarize(run_dir: str | Path, base: dict[str, Any], *, wall_s: float,
              average_model: float | Mapping[str, float] | None = None, attackers: Iterable[int] | None = None,
              task: Task = CLASSIFICATION, average_model_per_round: Mapping[int, float] | None = None,
              restarts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Write ``summary.json`` and the plots; return the summary.

    Figures are the task's headline metrics (``ua_mean``, ``ua_min``, ``ua_max``, ``ua_average_model`` for
    classification; ``ccc_...`` for dimensions, with ``ccc_<dimension>_mean`` and
    ``ccc_<dimension>_average_model`` per labelled dimension; both sets for the multi-task).
    ``average_model`` is the average of the peers' final models scored: the primary metric, or a dict of
    metrics (``average_model_scores``).

    ``attackers`` (an experiment's Byzantine peers; None: read them from the run folder's ``config.toml``
    if there is one) adds the honest-peer figures of ``honest_figures``; without attackers the summary has
    no such fields. ``restarts`` (peer -> times a supervisor restarted it) adds ``restarts``, the total, and
    each peer's count to its per-peer results.
    """
    run_dir = Path(run_dir)
    attackers = run_attackers(run_dir) if attackers is None else frozenset(attackers)
    metrics = read_metrics(run_dir)
    status = read_status(run_dir)
    averages = average_model if isinstance(average_model, Mapping) else {task.primary: average_model}
    finals_of = {m: {p: final_value(rows, task.test_key(m)) for p, rows in metrics.items()}
                 for m in (*task.headline, *(f"ccc_{d}" for d in task.dimension_names))}
    finals = finals_of[task.primary]
    consensus = {r: float(np.mean(v)) for r, v in per_round(metrics, "consensus_distance").items()}
    sent = {p: bytes_sent(rows) for p, rows in metrics.items()}
    figures: dict[str, Any] = {}
    for metric in task.headline:
        values = [v for v in finals_of[metric].values() if v is not None]
        figures |= {
            task.summary_key("mean", metric): float(np.mean(values)) if values else None,
            task.summary_key("min", metric): float(np.min(values)) if values else None,
            task.summary_key("max", metric): float(np.max(values)) if values else None,
            task.summary_key("average_model", metric): averages.get(metric),
        }
    for d in task.dimension_names:  # per dimension: the peers' mean and the average model
        values = [v for v in finals_of[f"ccc_{d}"].values() if v is not None]
        figures |= {f"ccc_{d}_mean": float(np.mean(values)) if values else None,
                    f"ccc_{d}_average_model": averages.get(f"ccc_{d}")}
    summary = dict(base) | {
        "task": task.name,
        "peers": len(metrics),
        "rounds": max((int(rows[-1]["round"]) + 1 for rows in metrics.values() if rows), default=0),
        **figures,
        "consensus_distance_first": next(iter(consensus.values()), None),
        "consensus_distance_last": next(reversed(consensus.values()), None) if consensus else None,
        "bytes_sent_total": int(sum(sent.values())),
        "bytes_sent_max_peer": int(max(sent.values(), default=0)),
        "wall_s": round(wall_s, 2),
        "per_peer": [
            {"peer": p, **{m: finals_of[m][p] for m in task.headline}, "bytes_sent": sent[p],
             "rounds": len(metrics[p]), "state": status.get(p, {}).get("state"),
             "error": status.get(p, {}).get("error")}
            | ({} if restarts is None else {"restarts": restarts.get(p, 0)})
            for p in sorted(metrics)
        ],
        "consensus_distance_per_round": consensus,
        **{task.summary_key("mean_per_round", m): {r: float(np.mean(v))
                                                   for r, v in per_round(metrics, task.test_key(m)).items()}
           for m in task.headline},
    }
    if average_model_per_round:
        summary[task.summary_key("average_model_per_round")] = dict(average_model_per_round)
    if restarts is not None:
        summary["restarts"] = int(sum(restarts.values()))
    if attackers:
        summary |= honest_figures(finals, attackers, task)
    summary |= privacy_figures(metrics)
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    plot_run(run_dir, summary, metrics, consensus, task)
    return summary


def plot_run(run_dir: Path, summary: dict[str, Any], metrics: dict[int, list[dict]],
             consensus: dict[int, float], task: Task = CLASSIFICATION) -> None:
    """``<metric>_per_peer.png`` for each headline metric of the task (``ua_per_peer.png``,
    ``ccc_per_peer.png``: each peer thin; the peers' mean and minimum, the average model per round where
    the run measured it, and the pooled-data baseline where there is one) and ``consensus_distance.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in task.headline:
        _plot_metric(plt, run_dir, summary, metrics, task, metric)

    fig, ax = plt.subplots(figsize=(7, 4))
    if consensus:
        ax.plot(list(consensus), list(consensus.values()), marker=".")
        if min(consensus.values()) > 0:
            ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="mean L2 distance to neighbours", title="Consensus distance")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "consensus_distance.png", dpi=110)
    plt.close(fig)


def _plot_metric(plt, run_dir: Path, summary: dict[str, Any], metrics: dict[int, list[dict]], task: Task,
                 metric: str) -> None:
    key = task.test_key(metric)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for peer, rows in sorted(metrics.items()):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=0.6, alpha=0.35, color="tab:blue")
    by_round = per_round(metrics, key)
    if by_round:
        ax.plot(list(by_round), [np.mean(v) for v in by_round.values()], lw=2, color="tab:blue",
                label="mean of the peers")
        ax.plot(list(by_round), [np.min(v) for v in by_round.values()], lw=1.2, ls=":", color="tab:blue",
                label="worst peer")
    average = summary.get(task.summary_key("average_model_per_round")) if metric == task.primary else None
    if average:
        ax.plot([int(r) for r in average], list(average.values()), lw=2, color="tab:green",
                label="average of the peers' models")
    baseline = summary.get(f"baseline_centralized_{metric}")
    if baseline is not None:
        shown = f"{100 * baseline:.1f}%" if metric == "ua" else f"{baseline:.3f}"
        ax.axhline(baseline, color="k", ls="--", lw=1.2, label=f"pooled training ({shown})")
    label = task.label(metric)
    ax.set(xlabel="round", ylabel=f"test {label}", title=f"Test {label} of each peer's model")
    ax.grid(alpha=0.3)
    if by_round or baseline is not None:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(run_dir / f"{metric}_per_peer.png", dpi=110)
    plt.close(fig)


def report_run(run_dir: Path, base: dict[str, Any], cfg, test: tuple[np.ndarray, np.ndarray, np.ndarray],
               classes: list[str], *, wall_s: float, attackers: Iterable[int] | None = None,
               task: Task = CLASSIFICATION, average_model_per_round: Mapping[int, float] | None = None,
               restarts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """The report of a finished run folder, whichever way it ran (simulate, launch, launch-hosts, Slurm):
    score the average of the peers' final models on ``test``, then ``summarize``."""
    from p2pser.report.average_model import average_model_scores

    average = average_model_scores(run_dir, cfg.model, cfg.seed, test, classes, task)
    # Without DP there is no guarantee: epsilon is null (unbounded), not 0.
    base = base | {"dp_mode": cfg.dp, "dp_delta": cfg.dp_delta if cfg.dp != "none" else None, "dp_epsilon": None}
    return summarize(run_dir, base, wall_s=wall_s, average_model=average, attackers=attackers, task=task,
                     average_model_per_round=average_model_per_round, restarts=restarts)


def add_baseline(run_dir: str | Path, summary: dict[str, Any], baseline: Mapping[str, Any],
                 task: Task = CLASSIFICATION) -> dict[str, Any]:
    """Put the pooled-data baseline of the same run beside the peers: ``baseline_centralized_ua`` and
    ``gap_to_centralized`` (baseline minus the peers' mean of the primary metric, in the task's units) in
    ``summary.json`` (``baseline_centralized_ccc`` too for a task with dimensions), and the baseline as a
    reference line in ``ua_per_peer.png`` (``ccc_per_peer.png``)."""
    run_dir = Path(run_dir)
    value = float(baseline[task.primary])
    mean = summary.get(task.summary_key("mean"))
    summary = summary | {f"baseline_centralized_{m}": float(baseline[m]) for m in task.headline if m in baseline}
    summary |= {"gap_to_centralized": None if mean is None else value - mean}
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
    metrics = read_metrics(run_dir)
    consensus = {int(r): v for r, v in summary.get("consensus_distance_per_round", {}).items()}
    plot_run(run_dir, summary, metrics, consensus, task)
    return summary
