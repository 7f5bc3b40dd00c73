"""Training losses of the tasks (``p2pser.learn.tasks``): class scores and regression outputs of one model.

A model's outputs are the class scores first and then one value per dimension (``Task.n_outputs``); the
loss of a task adds the classification loss (cross-entropy, or the multi-class hinge of the linear SVM) on
the rows that carry a category and the regression loss on the values that are labelled (NaN = unknown).

The regression loss is ``1 - CCC`` per dimension over the minibatch (the measure the task is scored by:
it trains mean and scale, not only correlation, and is the usual choice of the AVEC and MSP-Podcast
challenges) or the mean squared error; ``TrainConfig.regression_loss`` picks one, and
``benchmarks/bench_dimensional.py`` chooses between them on validation speakers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from p2pser.config import REGRESSION_LOSSES  # "ccc", "mse"


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - CCC`` averaged over the dimensions (columns) with at least two labelled values in the batch."""
    losses = []
    for j in range(target.shape[1]):
        known = torch.isfinite(target[:, j])
        if int(known.sum()) < 2:
            continue
        t, p = target[known, j], pred[known, j]
        mt, mp = t.mean(), p.mean()
        cov = ((t - mt) * (p - mp)).mean()
        denom = t.var(unbiased=False) + p.var(unbiased=False) + (mt - mp) ** 2
        losses.append(1 - 2 * cov / (denom + 1e-8))
    return torch.stack(losses).mean() if losses else pred.sum() * 0.0


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labelled values."""
    known = torch.isfinite(target)
    if not bool(known.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred[known], target[known])


def classification_loss(scores: torch.Tensor, y: torch.Tensor, *, weight: torch.Tensor | None, hinge: bool,
                        label_smoothing: float) -> torch.Tensor:
    """Cross-entropy (or hinge) of class scores on the rows whose label is a class (``y >= 0``)."""
    keep = y >= 0
    if not bool(keep.all()):
        if not bool(keep.any()):
            return scores.sum() * 0.0
        scores, y = scores[keep], y[keep]
    if hinge:
        return F.multi_margin_loss(scores, y, weight=weight)
    return F.cross_entropy(scores, y, weight=weight, label_smoothing=label_smoothing)


class TaskLoss:
    """The loss of one task for a model with ``n_classes`` class scores before its regression outputs."""

    def __init__(self, task_name: str, n_classes: int, *, weight: torch.Tensor | None, hinge: bool,
                 label_smoothing: float, regression_loss: str) -> None:
        if regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression loss {regression_loss!r} is not one of {REGRESSION_LOSSES}")
        self.task_name, self.n_classes = task_name, n_classes
        self.weight, self.hinge, self.label_smoothing = weight, hinge, label_smoothing
        self.regression = ccc_loss if regression_loss == "ccc" else mse_loss

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task_name == "categorical":
            return classification_loss(outputs, y, weight=self.weight, hinge=self.hinge,
                                       label_smoothing=self.label_smoothing)
        if self.task_name == "dimensional":
            return self.regression(outputs, y)
        k = self.n_classes
        categories = classification_loss(outputs[:, :k], y[:, 0].long(), weight=self.weight, hinge=self.hinge,
                                         label_smoothing=self.label_smoothing)
        return categories + self.regression(outputs[:, k:], y[:, 1:])
