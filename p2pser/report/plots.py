"""Plotting helpers shared by the reports: confusion matrices and per-step curves, written as PNG.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through
``pyplot``: no global backend switch, no figure registry to leak from long runs, safe in any thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def confusion_plot(
    cm: np.ndarray | Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix (recall per true class) with the counts in each cell."""
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {len(classes)} classes")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 2.5 + 0.6 * len(classes)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def line_plot(
    series: Mapping[str, Sequence[float] | Mapping[float, float]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_y: bool = False,
) -> Path:
    """One line per named series; a series is a list (x = 1, 2, ...) or a mapping x -> y."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, values in series.items():
        if isinstance(values, Mapping):
            xs, ys = list(values.keys()), list(values.values())
        else:
            xs, ys = list(range(1, len(values) + 1)), list(values)
        ax.plot(xs, ys, marker="." if len(ys) < 40 else None, lw=1.0, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=8)
    return _save(fig, path)
