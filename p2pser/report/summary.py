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

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> dict[int, list[dict]]:
    """Rows per peer; a torn last line (a peer killed mid-write) is skipped, never fatal."""
    out: dict[int, list[dict]] = {}
    for folder in sorted(run_dir.glob("peer-*")):
        peer = int(folder.name.split("-")[1])
        rows = []
        path = folder / "metrics.jsonl"
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
    for path in sorted(run_dir.glob("peer-*/status.json")):
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
    for folder in sorted(run_dir.glob("peer-*")):
        model, norm = folder / "model.npz", folder / "normalizer.json"
        if model.exists() and norm.exists():
            with np.load(model, allow_pickle=False) as z:
                params = {k: z[k] for k in z.files}
            out.append((int(folder.name.split("-")[1]), params, json.loads(norm.read_text())))
    return out


def run_attackers(run_dir: Path) -> frozenset[int]:
    """The attacking peers of a run whose folder holds its ``config.toml`` (launch, multi-host runs)."""
    from p2pser.config import load_config
    from p2pser.exchange.attacks import attacking_peers

    path = run_dir / "config.toml"
    return attacking_peers(load_config(path)) if path.exists() else frozenset()


def honest_figures(finals: Mapping[int, float | None], attackers: Iterable[int]) -> dict[str, Any]:
    """Final test UA over the honest peers only: what an attack costs the peers that do not attack."""
    attackers = sorted(set(attackers))
    honest = [v for p, v in finals.items() if p not in attackers and v is not None]
    return {
        "attackers": attackers,
        "honest_peers": sum(1 for p in finals if p not in attackers),
        "honest_test_ua_mean": float(np.mean(honest)) if honest else None,
        "honest_test_ua_min": float(np.min(honest)) if honest else None,
    }


def bytes_sent(rows: list[dict]) -> int:
    """Bytes a peer sent over all its lives: each restart (or continued run) counts from zero again."""
    total = last = 0
    for row in rows:
        if row["bytes_sent"] < last:
            total += last
        last = row["bytes_sent"]
    return int(total + last)


def summarize(run_dir: str | Path, base: dict[str, Any], *, wall_s: float,
              ua_average_model: float | None = None, attackers: Iterable[int] | None = None,
              restarts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Write ``summary.json`` and the plots; return the summary.

    ``attackers`` (an experiment's Byzantine peers; None: read them from the run folder's ``config.toml``
    if there is one) adds the honest-peer figures of ``honest_figures``; without attackers the summary has
    no such fields. ``restarts`` (peer -> times a supervisor restarted it) adds ``restarts``, the total, and
    each peer's count to its per-peer results.
    """
    run_dir = Path(run_dir)
    attackers = run_attackers(run_dir) if attackers is None else frozenset(attackers)
    metrics = read_metrics(run_dir)
    status = read_status(run_dir)
    finals = {p: final_value(rows, "test_ua") for p, rows in metrics.items()}
    uas = [v for v in finals.values() if v is not None]
    consensus = {r: float(np.mean(v)) for r, v in per_round(metrics, "consensus_distance").items()}
    sent = {p: bytes_sent(rows) for p, rows in metrics.items()}
    summary = dict(base) | {
        "peers": len(metrics),
        "rounds": max((int(rows[-1]["round"]) + 1 for rows in metrics.values() if rows), default=0),
        "ua_mean": float(np.mean(uas)) if uas else None,
        "ua_min": float(np.min(uas)) if uas else None,
        "ua_max": float(np.max(uas)) if uas else None,
        "ua_average_model": ua_average_model,
        "consensus_distance_first": next(iter(consensus.values()), None),
        "consensus_distance_last": next(reversed(consensus.values()), None) if consensus else None,
        "bytes_sent_total": int(sum(sent.values())),
        "bytes_sent_max_peer": int(max(sent.values(), default=0)),
        "wall_s": round(wall_s, 2),
        "per_peer": [
            {"peer": p, "ua": finals[p], "bytes_sent": sent[p], "rounds": len(metrics[p]),
             "state": status.get(p, {}).get("state"), "error": status.get(p, {}).get("error")}
            | ({} if restarts is None else {"restarts": restarts.get(p, 0)})
            for p in sorted(metrics)
        ],
        "consensus_distance_per_round": consensus,
        "ua_mean_per_round": {r: float(np.mean(v)) for r, v in per_round(metrics, "test_ua").items()},
    }
    if restarts is not None:
        summary["restarts"] = int(sum(restarts.values()))
    if attackers:
        summary |= honest_figures(finals, attackers)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_run(run_dir, metrics, consensus)
    return summary


def plot_run(run_dir: Path, metrics: dict[int, list[dict]], consensus: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for peer, rows in sorted(metrics.items()):
        pts = [(r["round"], r["test_ua"]) for r in rows if r.get("test_ua") is not None]
        if pts:
            ax.plot(*zip(*pts), lw=0.8, alpha=0.7)
    ax.set(xlabel="round", ylabel="test UA", title="Test UA of each peer's model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "ua_per_peer.png", dpi=110)
    plt.close(fig)

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


def average_model_ua(run_dir: Path, model_name: str, seed: int,
                     test: tuple[np.ndarray, np.ndarray, np.ndarray], classes: list[str]) -> float | None:
    """UA of the plain average of all peers' final models: how good the consensus model is.

    Each peer normalises inputs with its own statistics, so the average model is scored under peers'
    normalisers and the UAs are averaged: the figure a randomly chosen peer would see with that model.
    """
    import torch

    from p2pser.data.features import Normalizer
    from p2pser.learn.models import build_model
    from p2pser.learn.trainer import evaluate

    x_test, y_test, lengths = test
    saved = load_models(Path(run_dir))
    if not saved or len(y_test) == 0:
        return None
    names = saved[0][1].keys()
    mean = {k: np.mean([params[k] for _, params, _ in saved], axis=0) for k in names}
    model = build_model(model_name, x_test.shape[1], x_test.shape[2], len(classes), seed=seed)
    state = model.state_dict()
    for k, v in mean.items():
        state[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    model.load_state_dict(state)
    # At most 16 normalisers, spread over the peers: enough for the mean, cheap with hundreds of peers.
    norms = [norm for _, _, norm in saved[:: max(1, len(saved) // 16)]]
    uas = [evaluate(model, Normalizer.from_dict(norm).apply(x_test, lengths), y_test, classes)["ua"] for norm in norms]
    return float(np.mean(uas))
