"""``--boosting histogram``: XGBoost whose every split is chosen on gradient histograms of all peers' data.

Bagging (``p2pser.learn.bagging``) and cyclic boosting grow trees whose every split is chosen on one peer's
data. Here the peers grow ONE ensemble together, as distributed and federated XGBoost do (xgboost's
``hist`` tree method over a rabit allreduce; NVFlare's horizontal histogram-based XGBoost through a
server), but without a server: every peer contributes, for every open node, the sums of gradients and
hessians of its own rows per feature bin, and these contributions are relayed over the topology (along
shortest paths, ``use_topology``) until every peer holds all of them. Each peer then sums them in peer-id order (so every peer gets bit-identical
sums), chooses each node's split by xgboost's gain formula, and so every peer builds the same trees: those
of pooled histogram boosting on all peers' data (up to each peer's own row subsampling).

The recipe is ``trees.XGB_RECIPE``: softmax over K classes (``multi:softprob``), one tree per class and
boosting iteration, the K class trees of an iteration grown together level by level (depth-wise) to
``max_depth``, ``eta``, ``lambda``, ``min_child_weight``, ``subsample`` (each peer draws its own rows with
its own generator) and ``colsample_bynode`` (a generator SHARED by all peers, seeded by the run's seed,
the iteration, the class and the node, so every peer samples the same features). Sample weights are
class-balanced over the pooled data (``trees.class_balanced_weights`` on all peers' labels: the class
counts travel with the bin edges).

Steps. Step 0: each peer sends per-feature quantile summaries of its training vectors (``QUANTILES``
points per feature, each weighing rows / QUANTILES) and its class counts; once it holds all n peers'
summaries a peer merges them in peer-id order into the common bin edges (weighted quantiles of all points,
at most ``max_bin`` bins per feature) and the pooled class weights. Step s >= 1: each level of the
current iteration's trees: a peer sends the (sum g, sum h) histogram over the sampled features x bins of
every open node of every class tree, of its own (subsampled) rows; once it holds all n contributions of the
step, it sums them, makes each node a split (the best gain > 0 with both children's hessian >=
min_child_weight) or a leaf of weight -eta G / (H + lambda), moves its rows to the children, and goes on
to the next level, or after the last one to the next iteration (updating its margins). A child whose
hessian cannot be split (< 2 min_child_weight) is a leaf at once and costs no histogram. The learner stops
after ``iterations`` (at most ``trees.XGB_TREES``, the pooled recipe's 200).

Rounds. One step per round at most; a step's contributions reach every peer after the topology's diameter
of rounds, so a step takes ``diameter`` rounds (the exponential graph of 8 peers: 2) and the whole
ensemble ``--rounds diameter x (1 + iterations x max_depth) + 1`` at most (fewer when trees stop early):
1,603 rounds for 200 iterations of depth-4 trees on the 8-peer exponential graph. ``--local-steps`` does
not apply. A run whose ``--rounds`` end sooner predicts with the iterations completed by then.

What crosses the wire (the ``State``): every contribution the peer holds, keyed by ``key = step * STRIDE
+ origin``:

    index  int64 [k, 4]    key, 1, 0, cells attached here (0: "I hold this one", not sent again)
    cells  int32 [m]       the attached contributions' non-empty histogram cells (strictly increasing)
    sums   float32 [m, 2]  their (sum of gradients, sum of hessians); step 0: (quantile, weight) and
                           (class count, 0)

plus one row ``key = step * STRIDE + MARKER`` that says which step the sender is at (it needs nothing
older). The ``bagging`` algorithm's "attach only what the neighbour has not listed" logic carries them, and
``offer`` attaches a contribution only for the neighbours it is the designated relay of (``use_topology``;
without a topology it floods, each contribution crossing a link at most once in each direction). A
histogram is sparse: a peer's rows fill at most rows x sampled features x classes cells of a level, so
only non-empty cells are sent. ``check`` validates every
received state (keys, step and origin ranges, sizes, cells inside the layout, finite sums, hessians not
negative) before it is filed.

What it reveals: a peer's bin-edge summary shows the marginal quantiles of each of its features, and its
histograms show aggregate gradient statistics of its rows per node and bin (a node holding one utterance
shows that utterance's bins), as in federated XGBoost; no utterance is sent.

Not fault tolerant: a step needs every peer's contribution, so a crashed or silent peer stalls tree
building for everybody (the others go on relaying until the round schedule ends the run, and predict with
the iterations completed before).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.files import write_atomically
from p2pser.learn import trees
from p2pser.learn.bagging import TreeExchange
from p2pser.learn.data import PeerData
from p2pser.learn.tasks import Task

log = logging.getLogger(__name__)

State = Mapping[str, np.ndarray]
INDEX, CELLS, SUMS = "index", "cells", "sums"
STRIDE = 4096  # key = step * STRIDE + origin: origins are peer ids below MARKER
MARKER = STRIDE - 1  # the origin of the row that says which step its sender is at
QUANTILES = 64  # bin-edge summary points per feature and peer
KEEP_STEPS = 1  # steps before our own kept to serve a neighbour one step behind (none lags more)
MODEL_FILE = "histboost.npz"
GAIN_EPS = 1e-6  # xgboost's kRtEps: a split must gain more


class HistogramError(ValueError):
    """A received contribution was refused; the text says why."""


def _recipe() -> dict[str, float]:
    r = trees.XGB_RECIPE
    return {"max_depth": int(r["max_depth"]), "eta": float(r["eta"]), "lambda": float(r["lambda"]),
            "min_child_weight": float(r["min_child_weight"]), "subsample": float(r["subsample"]),
            "colsample_bynode": float(r["colsample_bynode"]), "max_bin": int(r["max_bin"])}


class Forest:
    """The ensemble as flat node arrays (python lists while growing): tree t is rooted at ``roots[t]`` and
    predicts for class ``classes[t]``; a node splits on ``feature`` (``x < threshold`` goes left, which is
    ``bin < split_bin`` on the common bins) or is a leaf (``left == -1``) of weight ``value``."""

    FIELDS = ("feature", "split_bin", "threshold", "left", "right", "value")

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.classes: list[int] = []
        self.feature: list[int] = []
        self.split_bin: list[int] = []
        self.threshold: list[float] = []
        self.left: list[int] = []
        self.right: list[int] = []
        self.value: list[float] = []

    def node(self) -> int:
        self.feature.append(0)
        self.split_bin.append(0)
        self.threshold.append(0.0)
        self.left.append(-1)
        self.right.append(-1)
        self.value.append(0.0)
        return len(self.feature) - 1

    def tree(self, k: int) -> int:
        root = self.node()
        self.roots.append(root)
        self.classes.append(k)
        return root

    def arrays(self) -> dict[str, np.ndarray]:
        return {"roots": np.asarray(self.roots, np.int64), "classes": np.asarray(self.classes, np.int64),
                "feature": np.asarray(self.feature, np.int64), "split_bin": np.asarray(self.split_bin, np.int64),
                "threshold": np.asarray(self.threshold, np.float32), "left": np.asarray(self.left, np.int64),
                "right": np.asarray(self.right, np.int64), "value": np.asarray(self.value, np.float64)}

    @classmethod
    def from_arrays(cls, a: Mapping[str, np.ndarray]) -> Forest:
        f = cls()
        f.roots, f.classes = [int(v) for v in a["roots"]], [int(v) for v in a["classes"]]
        for name in cls.FIELDS:
            setattr(f, name, [float(v) if name in ("threshold", "value") else int(v) for v in a[name]])
        return f


def margins(a: Mapping[str, np.ndarray], x: np.ndarray, n_classes: int, depth: int, n_trees: int) -> np.ndarray:
    """Sum of the leaf weights of the first ``n_trees`` trees of forest arrays ``a`` per class, ``[N, K]``."""
    out = np.zeros((len(x), n_classes))
    if n_trees == 0 or not len(x):
        return out
    node = np.repeat(a["roots"][:n_trees, None], len(x), axis=1)  # [T, N]
    rows = np.arange(len(x))[None, :]
    threshold = a["threshold"].astype(np.float32)
    for _ in range(depth):
        inner = a["left"][node] >= 0
        go_left = x[rows, a["feature"][node]] < threshold[node]
        node = np.where(inner, np.where(go_left, a["left"][node], a["right"][node]), node)
    leaf = a["value"][node]  # [T, N]
    for k in range(n_classes):
        out[:, k] = leaf[a["classes"][:n_trees] == k].sum(axis=0)
    return out


def softmax(m: np.ndarray) -> np.ndarray:
    e = np.exp(m - m.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def merge_edges(summaries: Sequence[np.ndarray], n_features: int, max_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """Common bin edges from the peers' summaries (in peer-id order; each ``[n_features * QUANTILES, 2]``
    of (quantile, weight)): per feature the weighted quantiles of all points at 1/max_bin ... (max_bin -
    1)/max_bin, deduplicated. Returns (cuts ``[n_features, max_bin - 1]`` float32 padded with +inf, number
    of cuts per feature)."""
    cuts = np.full((n_features, max_bin - 1), np.inf, np.float32)
    counts = np.zeros(n_features, np.int64)
    points = np.concatenate([s.reshape(n_features, QUANTILES, 2) for s in summaries], axis=1)  # [D, P, 2]
    levels = np.arange(1, max_bin) / max_bin
    for f in range(n_features):
        order = np.argsort(points[f, :, 0], kind="stable")
        values, weights = points[f, order, 0], points[f, order, 1].astype(np.float64)
        cum = np.cumsum(weights)
        if cum[-1] <= 0:
            continue
        at = np.minimum(np.searchsorted(cum, levels * cum[-1], side="left"), len(values) - 1)
        unique = np.unique(values[at].astype(np.float32))
        unique = unique[unique > values[0]]  # a cut at the smallest value splits nothing off
        cuts[f, : len(unique)] = unique
        counts[f] = len(unique)
    return cuts, counts


class HistogramLearner(TreeExchange):
    """Implements ``p2pser.learn.learner.Learner`` for ``--boosting histogram``; see the module docstring."""

    def __init__(self, data: PeerData, features: str, task: Task, *, peer_id: int, seed: int, n_peers: int,
                 iterations: int = trees.XGB_TREES) -> None:
        if not 0 <= peer_id < MARKER or n_peers > MARKER:
            raise ValueError(f"--boosting histogram handles up to {MARKER} peers")
        self.data = data
        self.features = features
        self.task = task
        self.id = peer_id
        self.seed = seed
        self.n_peers = max(n_peers, 1)
        self.iterations = min(iterations, trees.XGB_TREES)
        self.recipe = _recipe()
        self.depth = self.recipe["max_depth"]
        self.bins = self.recipe["max_bin"]
        self.n_classes = len(data.classes)
        self.samples = len(data.y_train)
        self._x = trees.utterance_vectors(data.x_train)
        self.n_features = self._x.shape[1]
        self.sampled = max(1, int(self.recipe["colsample_bynode"] * self.n_features))
        self.template = {INDEX: ((None, 4), np.dtype(np.int64)), CELLS: ((None,), np.dtype(np.int32)),
                         SUMS: ((None, 2), np.dtype(np.float32))}
        self.timings = {"train": 0.0, "eval": 0.0}
        self.held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # key -> (cells, sums), our own included
        self.step = 0  # the step whose contributions we gather (0: bin edges)
        self.started = False  # our contribution to step 0 made
        self.iteration = 0  # boosting iterations completed
        self.level = 0  # the level being grown of iteration ``self.iteration``
        self.cuts: np.ndarray | None = None
        self.n_cuts: np.ndarray | None = None
        self.class_weights: np.ndarray | None = None
        self.forest = Forest()
        self.complete_trees = 0  # trees of completed iterations (prediction uses only these)
        self.margin = np.zeros((self.samples, self.n_classes))
        self.pos = np.zeros((self.n_classes, self.samples), np.int64)  # node of every row in each class tree
        self.open: list[tuple[int, int, float, float]] = []  # (class, node, G, H) grown at this level
        self._binned: np.ndarray | None = None
        self._arrays: tuple[int, dict[str, np.ndarray]] | None = None
        self._eval_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._last_loss = float(np.log(self.n_classes))  # the uniform prediction's, before any tree
        self._relays: dict[int, frozenset[int]] | None = None  # neighbour -> origins we relay to it

    def use_topology(self, neighbours_of: Sequence[Sequence[int]]) -> None:
        """Relay along shortest paths (``neighbours_of[p]``: peer p's neighbours, for every peer): a
        contribution of origin o goes to neighbour j only from j's designated relay, the neighbour of j one
        hop closer to o that follows o first in id order (o itself for its own neighbours). Every
        contribution then crosses n - 1 links, once each, instead of being flooded over every link (3.8x
        fewer bytes on the 8-peer exponential graph); without a topology, we flood."""
        n = len(neighbours_of)
        relays: dict[int, set[int]] = {j: set() for j in neighbours_of[self.id]}
        for origin in range(n):
            dist = np.full(n, -1)
            dist[origin], frontier = 0, [origin]
            while frontier:
                nxt = []
                for p in frontier:
                    for q in neighbours_of[p]:
                        if dist[q] < 0:
                            dist[q] = dist[p] + 1
                            nxt.append(q)
                frontier = nxt
            for j, origins in relays.items():
                closer = [p for p in neighbours_of[j] if dist[j] > 0 and dist[p] == dist[j] - 1]
                # Among equally close neighbours of j, the relay rotates with the origin (spreads the load).
                if closer and min(closer, key=lambda p, o=origin: ((p - o) % n, p)) == self.id:
                    origins.add(origin)
        self._relays = {j: frozenset(o) for j, o in relays.items()}

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def key(origin: int, step: int) -> int:
        return step * STRIDE + origin

    def at_round(self, round_: int, *, training: bool) -> None:
        """The schedule's round (not needed: steps advance when contributions are complete)."""

    @property
    def finished(self) -> bool:
        return self.iteration >= self.iterations

    def _bin(self, x: np.ndarray) -> np.ndarray:
        """Bins ``[N, D]`` uint8 of vectors ``x``: the number of a feature's cuts at or below the value."""
        out = np.empty(x.shape, np.uint8)
        for f in range(self.n_features):
            out[:, f] = np.searchsorted(self.cuts[f, : self.n_cuts[f]], x[:, f], side="right")
        return out

    def _features_of(self, k: int, node: int) -> np.ndarray:
        """The features node ``node`` of class tree ``k`` may split on: drawn by a generator every peer
        seeds alike (run seed, iteration, class, node)."""
        rng = np.random.default_rng([self.seed, 7411, self.iteration, k, node])
        return np.sort(rng.choice(self.n_features, self.sampled, replace=False))

    def _rows(self) -> np.ndarray:
        """This iteration's subsample of our rows (our own generator)."""
        rng = np.random.default_rng([self.seed, 7412, self.id, self.iteration])
        return rng.random(self.samples) < self.recipe["subsample"]

    def _gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """Softmax gradients and hessians ``[N, K]`` of our rows at the current margins (xgboost's)."""
        p = softmax(self.margin)
        w = self.class_weights[self.data.y_train][:, None]
        onehot = np.eye(self.n_classes)[self.data.y_train]
        return (p - onehot) * w, np.maximum(2.0 * p * (1.0 - p) * w, 1e-16)

    def _layout_size(self, step: int) -> int:
        """Cells of ``step``'s histogram layout, when it is known here (our step or step 0), else an
        upper bound."""
        if step == 0:
            return self.n_features * QUANTILES + self.n_classes
        if step == self.step and self.started and self.cuts is not None:
            return max(len(self.open), 1) * self.sampled * self.bins
        return self.n_classes * (1 << (self.depth - 1)) * self.sampled * self.bins

    # -- our contributions ------------------------------------------------------------------------------
    def _summary(self) -> tuple[np.ndarray, np.ndarray]:
        levels = (np.arange(QUANTILES) + 0.5) / QUANTILES
        x = np.nan_to_num(self._x.astype(np.float64), nan=0.0)
        q = np.quantile(x, levels, axis=0).T if self.samples else np.zeros((self.n_features, QUANTILES))
        sums = np.zeros((self.n_features * QUANTILES + self.n_classes, 2), np.float32)
        sums[: self.n_features * QUANTILES, 0] = q.reshape(-1)
        sums[: self.n_features * QUANTILES, 1] = self.samples / QUANTILES
        sums[self.n_features * QUANTILES:, 0] = np.bincount(self.data.y_train, minlength=self.n_classes)
        return np.arange(len(sums), dtype=np.int32), sums

    def _histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Our (sum g, sum h) per cell (open node, sampled feature, bin), non-empty cells only."""
        g, h = self._gradients()
        rows = self._rows()
        size = len(self.open) * self.sampled * self.bins
        cells, gs, hs = [], [], []
        feats = np.stack([self._features_of(k, node) for k, node, _, _ in self.open])  # [J, S]
        for k in range(self.n_classes):
            table = np.full(len(self.forest.feature), -1, np.int64)
            for j, (kk, node, _, _) in enumerate(self.open):
                if kk == k:
                    table[node] = j
            slot = table[self.pos[k]]
            mine = np.flatnonzero(rows & (slot >= 0))
            if not len(mine):
                continue
            s = slot[mine]
            b = self._binned[mine[:, None], feats[s]]  # [n, S]
            cells.append(((s[:, None] * self.sampled + np.arange(self.sampled)) * self.bins + b).reshape(-1))
            gs.append(np.repeat(g[mine, k], self.sampled))
            hs.append(np.repeat(h[mine, k], self.sampled))
        if not cells:  # no row of ours in an open node: one empty cell, so that it is attached when sent
            return np.zeros(1, np.int32), np.zeros((1, 2), np.float32)
        c = np.concatenate(cells)
        count = np.bincount(c, minlength=size)
        full = np.stack([np.bincount(c, np.concatenate(gs), minlength=size),
                         np.bincount(c, np.concatenate(hs), minlength=size)], axis=1)
        nz = np.flatnonzero(count)
        return nz.astype(np.int32), full[nz].astype(np.float32)

    def _contribute(self) -> None:
        self.held[self.key(self.id, self.step)] = self._summary() if self.step == 0 else self._histogram()

    # -- learning ---------------------------------------------------------------------------------------
    def train(self, steps: int, correction: State | None = None) -> float:
        """Make our first contribution, or, when we hold all peers' contributions to our step, finish it
        and make our contribution to the next (one step per call at most). ``steps`` does not apply."""
        t0 = time.perf_counter()
        if not self.started:
            self.started = True
            self._contribute()
        elif not self.finished and all(self.key(o, self.step) in self.held for o in range(self.n_peers)):
            if self.step == 0:
                self._edges()
            else:
                self._grow(self._sum(self.step))
            self.step += 1
            self.held = {k: v for k, v in self.held.items() if k // STRIDE >= self.step - KEEP_STEPS}
            if not self.finished:
                self._contribute()
        self.timings["train"] += time.perf_counter() - t0
        return self._last_loss

    def _sum(self, step: int) -> np.ndarray:
        """All peers' contributions to ``step`` summed in peer-id order (bit-identical at every peer)."""
        size = self._layout_size(step)
        total = np.zeros((size, 2))
        for origin in range(self.n_peers):
            cells, sums = self.held[self.key(origin, step)]
            if len(cells) and int(cells[-1]) >= size:  # a layout that is not this step's: a lie or a bug
                log.warning("peer %d: contribution of peer %d to step %d has cells outside the layout; "
                            "ignored", self.id, origin, step)
                continue
            total[cells] += sums.astype(np.float64)
        return total

    def _edges(self) -> None:
        n = self.n_features * QUANTILES
        summaries = [self.held[self.key(o, 0)][1][:n] for o in range(self.n_peers)]
        self.cuts, self.n_cuts = merge_edges(summaries, self.n_features, self.bins)
        counts = sum(self.held[self.key(o, 0)][1][n:, 0].astype(np.float64) for o in range(self.n_peers))
        present = max(int((counts > 0).sum()), 1)
        self.class_weights = np.where(counts > 0, counts.sum() / (np.maximum(counts, 1) * present), 0.0)
        self._binned = self._bin(self._x)
        self._start_iteration()

    def _start_iteration(self) -> None:
        self.level = 0
        self.pos = np.zeros((self.n_classes, self.samples), np.int64)
        self.open = []
        for k in range(self.n_classes):
            root = self.forest.tree(k)
            self.pos[k] = root
            self.open.append((k, root, 0.0, -1.0))  # H < 0: G and H come from the root's histogram
        p = softmax(self.margin)[np.arange(self.samples), self.data.y_train]
        if self.samples:
            self._last_loss = float(-np.mean(np.log(np.maximum(p, 1e-12))))

    def _grow(self, total: np.ndarray) -> None:
        """Split or close every open node on the summed histograms; the next level, or the next iteration."""
        lam, mcw, eta = self.recipe["lambda"], self.recipe["min_child_weight"], self.recipe["eta"]
        f = self.forest
        hist = total.reshape(len(self.open), self.sampled, self.bins, 2)
        cum = np.cumsum(hist, axis=2)
        gl, hl = cum[:, :, :-1, 0], cum[:, :, :-1, 1]  # left of threshold t = 1 .. bins - 1: bins < t
        g_all, h_all = cum[:, :, -1:, 0], cum[:, :, -1:, 1]
        gr, hr = g_all - gl, h_all - hl
        gain = gl ** 2 / (hl + lam) + gr ** 2 / (hr + lam) - g_all ** 2 / (h_all + lam)
        gain = np.where((hl >= mcw) & (hr >= mcw), gain, -np.inf)
        opened = []
        for j, (k, node, g_node, h_node) in enumerate(self.open):
            if h_node < 0:  # a root: its sums are any feature's histogram total
                g_node, h_node = float(g_all[j, 0, 0]), float(h_all[j, 0, 0])
            best = int(np.argmax(gain[j]))
            slot, t = divmod(best, self.bins - 1)
            if not gain[j].reshape(-1)[best] > GAIN_EPS:
                f.value[node] = -eta * g_node / (h_node + lam)
                continue
            feature = int(self._features_of(k, node)[slot])
            t += 1
            left, right = f.node(), f.node()
            f.feature[node], f.split_bin[node] = feature, t
            f.threshold[node] = float(self.cuts[feature, t - 1])
            f.left[node], f.right[node] = left, right
            rows = self.pos[k] == node
            self.pos[k, rows] = np.where(self._binned[rows, feature] < t, left, right)
            for child, gc, hc in ((left, gl[j, slot, t - 1], hl[j, slot, t - 1]),
                                  (right, gr[j, slot, t - 1], hr[j, slot, t - 1])):
                if self.level + 1 < self.depth and hc >= 2 * mcw:
                    opened.append((k, child, float(gc), float(hc)))
                else:
                    f.value[child] = -eta * float(gc) / (float(hc) + lam)
        self.open = opened
        self.level += 1
        if opened:
            return
        value = np.asarray(f.value)
        for k in range(self.n_classes):
            self.margin[:, k] += value[self.pos[k]]
        self.iteration += 1
        self.complete_trees = len(f.roots)
        if not self.finished:
            self._start_iteration()

    # -- prediction -------------------------------------------------------------------------------------
    def _forest_arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None or self._arrays[0] != self.complete_trees:
            self._arrays = (self.complete_trees, self.forest.arrays())
        return self._arrays[1]

    def predict_proba(self, x: np.ndarray, *, cache: str | None = None) -> np.ndarray:
        """Class probabilities of the completed iterations for features ``[N, C, T]`` (``cache``: a name
        under which margins are kept and extended by the trees added since)."""
        vectors = trees.utterance_vectors(x)
        done, m = self._eval_cache.get(cache, (0, None)) if cache else (0, None)
        if m is None or m.shape[0] != len(vectors):
            done, m = 0, np.zeros((len(vectors), self.n_classes))
        if done < self.complete_trees:
            a = self._forest_arrays()
            part = a | {"roots": a["roots"][done:], "classes": a["classes"][done:]}
            m = m + margins(part, vectors, self.n_classes, self.depth, self.complete_trees - done)
        if cache:
            self._eval_cache[cache] = (self.complete_trees, m)
        return softmax(m)

    def evaluation_extras(self) -> dict[str, float]:
        return {"bag_size": 1, "boosting_iterations": self.iteration, "histogram_step": self.step}

    # -- the wire ---------------------------------------------------------------------------------------
    def holdings(self) -> dict[int, int]:
        """key -> 1 of every contribution held, and our step marker."""
        return {k: 1 for k in self.held} | {self.key(MARKER, self.step): 1}

    def offer(self, known: Mapping[int, int], to: int | None = None) -> dict[str, np.ndarray]:
        """Every contribution we hold listed; attached those ``known`` (what the neighbour listed, or we
        attached for it) lacks, of steps it has not finished (its marker says which), and, with a topology
        (``use_topology``), of the origins we are ``to``'s relay for."""
        their_step = max((k // STRIDE for k in known if k % STRIDE == MARKER), default=0)
        relayed = None if to is None or self._relays is None else self._relays.get(to, frozenset())
        rows, cells, sums = [], [], []
        for key, (c, s) in sorted(self.held.items()):
            send = key not in known and key // STRIDE >= their_step \
                and (relayed is None or key % STRIDE in relayed)
            rows.append((key, 1, 0, len(c) if send else 0))
            if send and len(c):
                cells.append(c)
                sums.append(s)
        rows.append((self.key(MARKER, self.step), 1, 0, 0))
        return {INDEX: np.asarray(rows, np.int64).reshape(-1, 4),
                CELLS: np.concatenate(cells) if cells else np.zeros(0, np.int32),
                SUMS: np.concatenate(sums) if sums else np.zeros((0, 2), np.float32)}

    @staticmethod
    def advertised(state: State) -> dict[int, int]:
        """key -> 1 of what a (checked) received state says its sender holds (its step marker included)."""
        return {int(k): 1 for k in np.asarray(state[INDEX])[:, 0]}

    def check(self, state: State) -> None:
        """Refuse (``HistogramError``) a received state that is malformed: keys that name no peer or step,
        repeated keys, sizes that disagree with the cells, cells outside a step's layout or not increasing,
        negative hessians or weights."""
        index, cells, sums = np.asarray(state[INDEX]), np.asarray(state[CELLS]), np.asarray(state[SUMS])
        if index.shape[0] > 4 * MARKER:
            raise HistogramError(f"{index.shape[0]} contributions listed, at most {4 * MARKER}")
        if len(cells) != len(sums):
            raise HistogramError(f"{len(cells)} cells but {len(sums)} sums")
        keys, versions, _, sizes = index.T if len(index) else (np.zeros(0, np.int64),) * 4
        if len(np.unique(keys)) != len(keys):
            raise HistogramError("a contribution is listed twice")
        origins, steps = keys % STRIDE, keys // STRIDE
        max_step = 1 + trees.XGB_TREES * self.depth
        if (keys < 0).any() or (steps > max_step).any():
            raise HistogramError(f"steps must lie in 0..{max_step}")
        if ((origins >= self.n_peers) & (origins != MARKER)).any():
            bad = origins[(origins >= self.n_peers) & (origins != MARKER)]
            raise HistogramError(f"a contribution names origin {int(bad.max())}, this run has {self.n_peers} peers")
        if (origins == MARKER).sum() != 1:
            raise HistogramError("the sender's step marker is missing or repeated")
        if (versions != 1).any() or (sizes < 0).any() or (sizes[origins == MARKER] != 0).any():
            raise HistogramError("bad versions or sizes")
        if int(sizes.sum()) != len(cells):
            raise HistogramError(f"the index attaches {int(sizes.sum())} cells, the message carries {len(cells)}")
        if len(sums) and (sums[:, 1] < 0).any():
            raise HistogramError("a hessian sum or weight is negative")
        at = 0
        for key, size in zip(keys.tolist(), sizes.tolist()):
            if not size:
                continue
            origin, step = key % STRIDE, key // STRIDE
            c = cells[at:at + size]
            at += size
            bound = self._layout_size(step)
            if c[0] < 0 or c[-1] >= bound or (size > 1 and (np.diff(c) <= 0).any()):
                raise HistogramError(f"contribution of peer {origin} to step {step}: cells not increasing "
                                     f"or outside 0..{bound - 1}")
            if step == 0 and size != self._layout_size(0):
                raise HistogramError(f"the bin-edge summary of peer {origin} has {size} cells, expected "
                                     f"{self._layout_size(0)}")

    def mix(self, own: State, own_weight: float, others: Sequence[Any], rule: Any) -> None:
        """File the contributions the neighbours attached that we lack, of steps we have not finished."""
        for contribution in sorted(others, key=lambda c: c.sender):
            index = np.asarray(contribution.state[INDEX])
            cells, sums = np.asarray(contribution.state[CELLS]), np.asarray(contribution.state[SUMS])
            at = 0
            for key, _, _, size in index.tolist():
                c, s = cells[at:at + size], sums[at:at + size]
                at += size
                origin, step = key % STRIDE, key // STRIDE
                if origin == MARKER or origin == self.id or key in self.held or step < self.step:
                    continue
                if not size:
                    continue
                self.held[key] = (np.array(c, np.int32), np.array(s, np.float32))

    # -- normalisation statistics (--normalizer global): SharedStatistics ----------------------------------
    def _inputs_changed(self) -> None:
        self._x = trees.utterance_vectors(self.data.x_train)
        if self.cuts is not None:
            self._binned = self._bin(self._x)
        self._eval_cache.clear()

    # -- checkpoints and outputs ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step, "started": self.started, "iteration": self.iteration, "level": self.level,
                "complete_trees": self.complete_trees, "forest": self.forest.arrays(), "margin": self.margin,
                "pos": self.pos, "open": [[int(k), int(n), float(g), float(h)] for k, n, g, h in self.open],
                "cuts": self.cuts, "n_cuts": self.n_cuts, "class_weights": self.class_weights,
                "held": {int(k): {"cells": c, "sums": s} for k, (c, s) in self.held.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.step, self.started = int(state["step"]), bool(state["started"])
        self.iteration, self.level = int(state["iteration"]), int(state["level"])
        self.complete_trees = int(state["complete_trees"])
        self.forest = Forest.from_arrays(state["forest"])
        self.margin, self.pos = np.asarray(state["margin"], np.float64), np.asarray(state["pos"], np.int64)
        self.open = [(int(k), int(n), float(g), float(h)) for k, n, g, h in state["open"]]
        self.cuts, self.n_cuts, self.class_weights = state["cuts"], state["n_cuts"], state["class_weights"]
        self.held = {int(k): (np.asarray(v["cells"], np.int32), np.asarray(v["sums"], np.float32))
                     for k, v in state["held"].items()}
        self._binned = self._bin(self._x) if self.cuts is not None else None
        self._arrays = None
        self._eval_cache.clear()

    def identity(self) -> dict[str, Any]:
        return {"model": "xgb", "boosting": "histogram", "features": self.features, "samples": self.samples}

    def save(self, folder: str | Path, *, durable: bool = True) -> None:
        """``histboost.npz``: the completed trees as node arrays and the bin edges (no pickle)."""
        a = self._forest_arrays()
        # Nodes of the iteration being grown come after every node of the completed ones.
        n_nodes = int(a["roots"][self.complete_trees]) if self.complete_trees < len(a["roots"]) else len(a["feature"])
        model = {k: (v[: self.complete_trees] if k in ("roots", "classes") else v[:n_nodes]) for k, v in a.items()}
        model |= {"n_classes": np.int64(self.n_classes), "max_depth": np.int64(self.depth),
                  "iterations": np.int64(self.iteration),
                  "cuts": self.cuts if self.cuts is not None else np.zeros((0, self.bins - 1), np.float32)}
        write_atomically(Path(folder) / MODEL_FILE, lambda fh: np.savez(fh, **model), durable=durable)
