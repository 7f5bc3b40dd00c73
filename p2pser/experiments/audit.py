"""``p2pser audit RUN``: what a curious neighbour learns about a peer's speaker from the updates it sends.

The attribute-inference attack of federated SER (Feng et al., "Attribute inference attack of speech emotion
recognition in federated learning settings", 2021-22), on the updates a run recorded
(``--record-updates first-layer``, ``p2pser.exchange.recording``):

1. **Shadow peers.** The attacker knows the protocol (the run's settings, its initial model, its DP mode and
   epsilon) but not the target's speech. It runs the same configuration, seed and schedule on a *disjoint*
   corpus whose speakers' sex it knows (EmoDB for a RAVDESS run), one simulated run per fold of that corpus so
   that every shadow speaker is a shadow peer, and records its shadow peers' first-layer updates.
2. **Attack model.** Each update is reduced to per-input statistics of the first layer's update (its
   column's mean and RMS over the outputs; a convolution averaged over its kernel taps), or kept whole when
   it is small (the ``svm``), scaled to unit norm so that the learning-rate schedule does not dominate,
   optionally centred on the mean update of its round (what all peers share that round). Candidates: an L2
   logistic regression and a non-linear one (PCA fitted on the shadow updates, then an RBF SVM), each with
   its regularisation; the one with the best cross-validated UAR on shadow updates, folds grouped by shadow
   speaker (judged on voices it did not see), is refitted and used. The target never takes part in the
   choice. (Feng et al. train their attack model on shadow clients' first-layer updates, where they found
   most leakage; the stored abstracts do not give its architecture, so this one is ours.)
3. **Attack.** One prediction per target peer and recorded round. ``attack_uar`` is the unweighted average
   recall over all of them (chance 0.5 for two classes), ``attack_uar_per_round`` the same per round,
   ``ci_low``/``ci_high`` a 95% bootstrap interval resampling target *peers* (a peer's rounds are not
   independent). ``attack_uar_vote`` is the UAR of one majority vote per peer, ``attack_uar_pooled`` of one
   decision per peer from its rounds' scores averaged (an attacker who pools every round it saw).

One attribute per audit (``--attribute``): sex, or age (older than the run's median speaker) where
both the run's and the shadow corpus label it (BAVED: shadow on a disjoint part of its speakers).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.config import RunConfig, config_to_dict
from p2pser.errors import UserError
from p2pser.exchange.recording import UPDATES, UPDATES_META
from p2pser.report.run_folder import PEER_GLOB, write_json_atomic

log = logging.getLogger(__name__)

AUDIT = "audit.json"
AUDIT_PLOT = "audit.png"
SHADOW_DIR = "audit-shadow"
ATTRIBUTES = ("sex", "age")
SHARED_DATA_ENV = "P2PSER_SHARED_DATA"
# Regularisation strengths tried for the attack models (inverse L2 weight of the logistic regression; the
# RBF SVM's C), the principal components the non-linear one keeps, and the largest update used whole.
C_GRID = (0.01, 0.1, 1.0, 10.0)
SVM_C_GRID = (1.0, 10.0)
PCA_COMPONENTS = 32
WHOLE_MAX = 20_000
# The subspace attack: how many leading input-space directions of an update it compares (measured on RAVDESS
# with EmoDB shadows, mlp on ComParE: shadow CV UAR 0.60 with 2, 0.75 with 4 or 8), and its neighbours.
SUBSPACE_DIMS = (2, 4, 8)
NEIGHBOURS = (1, 3, 5, 9)


@dataclass
class Traces:
    """Recorded updates of many peers: one row per (peer, round), each reduced by ``describe_update`` as it
    is read (the ``mlp``'s first layer on ComParE is 6.5 MB a round: a run's hundreds would not fit)."""

    per_input: np.ndarray  # [rows, 2 * inputs] float32: per input, mean and RMS of its update over the outputs
    whole: np.ndarray | None  # [rows, outputs * inputs] float32: the whole update, when small (WHOLE_MAX)
    subspace: np.ndarray  # [rows, inputs, max(SUBSPACE_DIMS)] float32: its leading right singular vectors
    outputs: int  # the layer's outputs (rows of its weight)
    peer: np.ndarray  # [rows] peer id (shadow: 1000 x fold + peer)
    round: np.ndarray  # [rows]
    speaker: np.ndarray  # [rows] the peer's speaker (grouping for cross-validation)
    attributes: list[dict[str, Any]]  # per row: the peer's attributes

    @property
    def inputs(self) -> int:
        return self.per_input.shape[1] // 2

    def labels(self, attribute: str, threshold: float | None = None) -> np.ndarray:
        """0/1 per row (-1 unknown): sex F=1; age above ``threshold`` = 1."""
        out = np.full(len(self.peer), -1, dtype=np.int64)
        for i, attrs in enumerate(self.attributes):
            value = attrs.get(attribute)
            if value is None:
                continue
            out[i] = int(value == "F") if attribute == "sex" else int(float(value) > threshold)
        return out

    def median_age(self) -> float | None:
        """The median age over this side's speakers (each speaker once, however many rounds it recorded)."""
        ages = {s: float(a["age"]) for s, a in zip(self.speaker, self.attributes, strict=True)
                if a.get("age") is not None}
        return float(np.median(list(ages.values()))) if ages else None

    @staticmethod
    def join(parts: list[Traces]) -> Traces:
        whole = None if any(p.whole is None for p in parts) else np.concatenate([p.whole for p in parts])
        return Traces(np.concatenate([p.per_input for p in parts]), whole,
                      np.concatenate([p.subspace for p in parts]), parts[0].outputs,
                      np.concatenate([p.peer for p in parts]), np.concatenate([p.round for p in parts]),
                      np.concatenate([p.speaker for p in parts]), [a for p in parts for a in p.attributes])


def layer_matrix(update: np.ndarray) -> np.ndarray:
    """One update of the first layer as ``[outputs, inputs]``: a convolution's weight averaged over its kernel
    taps (the axes after the second)."""
    u = np.asarray(update, dtype=np.float32)
    if u.ndim >= 3:
        u = u.mean(axis=tuple(range(2, u.ndim)))
    return u.reshape(u.shape[0], -1)


def describe_update(update: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """What the attack keeps of one update ``U`` (outputs x inputs): per input, the mean and the RMS of its
    column over the outputs; the whole matrix when it has at most ``WHOLE_MAX`` entries (the ``svm``; the
    ``mlp``'s 256 x 6373 is far too large for a few hundred training rows); and its leading right singular
    vectors, the input-space directions it moves along.

    Why the last: a first layer's gradient is a sum over utterances of (backpropagated error) x (input), so
    ``U`` is about ``D M``, with ``M`` the speaker's per-emotion mean inputs and ``D`` the hidden units' mixing,
    which changes with every run and round. ``U``'s row space is ``M``'s whatever ``D`` is; and per-emotion
    means of even speaker-standardised ComParE features still tell a speaker's sex (BENCHMARKS.md, issue 15:
    the ``inputs`` arm)."""
    u = layer_matrix(update)
    per_input = np.concatenate([u.mean(axis=0), np.sqrt((u ** 2).mean(axis=0))])
    k = max(SUBSPACE_DIMS)
    # Right singular vectors from the small Gram matrix (outputs x outputs): 256 x 256 instead of an SVD of
    # 256 x 6373. Missing directions (a layer with fewer outputs, a zero update) stay zero.
    u64 = u.astype(np.float64)
    values, vectors = np.linalg.eigh(u64 @ u64.T)
    order = np.argsort(values)[::-1][:k]
    sigma = np.sqrt(np.clip(values[order], 0.0, None))
    basis = np.zeros((u.shape[1], k), dtype=np.float32)
    good = sigma > 1e-12 * max(sigma.max(initial=0.0), 1e-300)
    basis[:, : good.sum()] = ((u64.T @ vectors[:, order[good]]) / sigma[good]).astype(np.float32)
    return per_input, (u.ravel() if u.size <= WHOLE_MAX else None), basis


def read_traces(run_dir: Path, *, what: str) -> tuple[Traces, dict[str, Any]]:
    """Every peer's recorded updates in ``run_dir`` and the run's metadata (settings, layer, data folder)."""
    if not run_dir.is_dir():
        raise UserError(f"{what} {run_dir} does not exist or is not a folder")
    folders = sorted(run_dir.glob(PEER_GLOB))
    if not folders:
        raise UserError(f"{what} {run_dir} is not a run folder: it has no peer-KKK folders")
    recorded = [f for f in folders if (f / UPDATES).exists() and (f / UPDATES_META).exists()]
    if not recorded:
        raise UserError(f"{what} {run_dir} recorded no updates, so there is nothing to attack: run it with "
                        "--record-updates first-layer")
    rows: dict[str, list] = {"per_input": [], "whole": [], "subspace": [], "peer": [], "round": [], "speaker": [],
                             "attributes": [], "shape": []}
    meta: dict[str, Any] = {}
    for folder in recorded:
        try:
            info = json.loads((folder / UPDATES_META).read_text())
            with np.load(folder / UPDATES, allow_pickle=False) as z:
                rounds, updates = z["rounds"], z["updates"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{folder / UPDATES} cannot be read ({exc}): the run did not finish writing it") from None
        meta = meta or info
        speaker = ",".join(info["speakers"])
        for r, u in zip(rounds, updates, strict=True):
            per_input, whole, basis = describe_update(u)
            rows["per_input"].append(per_input)
            rows["whole"].append(whole)
            rows["subspace"].append(basis)
            rows["shape"].append(layer_matrix(u[:1]).shape[1:] + (u.shape[0],))
            rows["peer"].append(int(info["peer"]))
            rows["round"].append(int(r))
            rows["speaker"].append(speaker)
            rows["attributes"].append(info["attributes"])
        del updates
    if not rows["per_input"]:
        raise UserError(f"{what} {run_dir} recorded no training round: nothing to attack")
    if len(set(rows["shape"])) > 1:
        raise UserError(f"{what} {run_dir}: its peers recorded layers of different shapes: not one run")
    whole = None if rows["whole"][0] is None else np.stack(rows["whole"])
    traces = Traces(np.stack(rows["per_input"]), whole, np.stack(rows["subspace"]), rows["shape"][0][-1],
                    np.asarray(rows["peer"]),
                    np.asarray(rows["round"]), np.asarray(rows["speaker"]), rows["attributes"])
    return traces, meta


def shadow_config(target: RunConfig, fold: int) -> RunConfig:
    """The target's recipe, DP and seed (so the same initial model) on one fold of the shadow corpus:
    evaluation only at the end, no final averaging (it records nothing), one peer per shadow speaker."""
    return target.replace(fold=fold, folds=None, test_speakers=None, partition="speaker",
                          record_updates="first-layer", final_mixing=0, eval_every=target.rounds, attack="none",
                          attackers=None, time_budget=0.0, consensus_threshold=0.0)


def _finished_with(folder: Path, cfg: RunConfig) -> bool:
    """Whether ``folder`` holds a finished shadow run made with exactly ``cfg`` (re-auditing, e.g. for another
    attribute, then costs no simulation)."""
    metas = sorted(folder.glob(f"{PEER_GLOB}/{UPDATES_META}"))
    if not (folder / "summary.json").exists() or not metas:
        return False
    try:
        return json.loads(metas[0].read_text()).get("config") == config_to_dict(cfg)
    except (OSError, json.JSONDecodeError):
        return False


def shadow_traces(meta: dict[str, Any], shadow_dir: Path, out: Path, *, folds: int | None,
                  progress: bool) -> tuple[Traces, list[str]]:
    """Simulate shadow peers on ``shadow_dir`` with the target's settings, one run per fold (a finished run
    with the same settings is reused); their traces (peer ids made unique across folds) and the run folders."""
    from p2pser.carriers.faults import FaultPlan
    from p2pser.exchange.topology import make_topology
    from p2pser.experiments.simulate import simulate_run
    from p2pser.partition.experiment import load_experiment, make_plan

    target = RunConfig(**meta["config"])
    experiment = load_experiment(shadow_dir, task=target.task)
    n_folds = len(experiment.folds) if folds is None else min(folds, len(experiment.folds))
    parts, runs = [], []
    for k in range(1, n_folds + 1):
        cfg = shadow_config(target, k)
        folder = out / f"fold-{k}"
        if _finished_with(folder, cfg):
            if progress:
                print(f"audit: shadow run {k}/{n_folds}: reusing {folder}", flush=True)
        else:
            plan = make_plan(shadow_dir, cfg, None)
            kind = "complete" if plan.n_peers <= 8 else "exponential"
            topology = make_topology(kind, plan.n_peers, seed=cfg.seed)
            if progress:
                print(f"audit: shadow run {k}/{n_folds}: {plan.n_peers} peers on {shadow_dir} ({cfg.rounds} rounds)",
                      flush=True)
            simulate_run(plan, topology, kind, cfg, FaultPlan(), folder)
        traces, _ = read_traces(folder, what="shadow run")
        traces.peer = traces.peer + 1000 * k
        parts.append(traces)
        runs.append(str(folder))
    if len({p.per_input.shape[1] for p in parts}) > 1:
        raise UserError(f"shadow corpus {shadow_dir}: its folds give layers of different shapes")
    return Traces.join(parts), runs


def uar(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted average recall over the classes present in ``y``."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


# ---- the attack model: candidate views of an update and classifiers, chosen on shadow speakers only ----


def view(traces: Traces, rows: np.ndarray, name: str, centre: bool) -> np.ndarray:
    """Feature vectors of ``rows``: the ``whole`` update or its ``per-input`` statistics, each scaled to unit
    L2 norm so that the learning-rate schedule does not dominate; ``centre`` subtracts the mean over the
    rows of the same run and round, i.e. what every peer's update shares that round (the task's common
    gradient), leaving what makes this peer differ (a hub or a well-connected neighbour sees many peers'
    updates of a round; the shadow attacker its own shadow peers')."""
    if name.startswith("subspace-"):
        return traces.subspace[rows, :, : int(name.split("-")[1])]
    x = (traces.whole if name == "whole" else traces.per_input)[rows].astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    if centre:
        key = (traces.peer[rows] // 1000) * 100_000 + traces.round[rows]
        for k in np.unique(key):
            sel = key == k
            x[sel] -= x[sel].mean(axis=0)
    return x.astype(np.float32)


def classifier(kind: str, c: float, seed: int, rows: int):
    """``logistic``: an L2 logistic regression on standardised features; ``pca-svm``: the standardised
    features projected on their first principal components (fitted on the shadow updates) and an RBF SVM,
    a non-linear attack."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced",
                                                                  random_state=seed))
    return make_pipeline(StandardScaler(), PCA(n_components=min(PCA_COMPONENTS, rows - 1), random_state=seed),
                         SVC(C=c, kernel="rbf", gamma="scale", class_weight="balanced", random_state=seed))


def candidates(shadow: Traces, target: Traces) -> list[tuple[str, bool, str, float]]:
    """(view, centre, classifier, C) tried: the whole update where both sides' layers have one shape and it is
    small, else per-input statistics; centred or not; the linear and the non-linear classifier."""
    views = ["per-input"]
    if shadow.whole is not None and target.whole is not None and shadow.outputs == target.outputs:
        views.insert(0, "whole")
    return [(v, centre, kind, c) for v in views for centre in (False, True)
            for kind, grid in (("logistic", C_GRID), ("pca-svm", SVM_C_GRID)) for c in grid]


def subspace_similarity(a: np.ndarray, b: np.ndarray, dims: tuple[int, ...] | None = None):
    """``[len(a), len(b)]``: ``||A_i^T B_j||_F^2`` for orthonormal input-space bases ``[rows, inputs, K]``, the
    sum of squared cosines of the principal angles between two updates' subspaces (K when they agree, 0 when
    orthogonal). One matrix product: the rows' K directions against the other side's. With ``dims``, a dict
    of it for the leading ``d`` directions of each ``d``, from the same product."""
    n, inputs, k = a.shape
    m = b.shape[0]
    g = (a.transpose(0, 2, 1).reshape(n * k, inputs) @ b.transpose(0, 2, 1).reshape(m * k, inputs).T) ** 2
    g = g.reshape(n, k, m, k)
    if dims is None:
        return g.sum(axis=(1, 3))
    return {d: g[:, :d, :, :d].sum(axis=(1, 3)) for d in dims}


class SubspaceNeighbours:
    """The attribute of the ``neighbours`` shadow updates whose input-space subspaces are closest
    (``subspace_similarity``): no weights to fit, so the few shadow speakers of a small corpus are enough."""

    def __init__(self, neighbours: int) -> None:
        self.neighbours = neighbours

    def fit(self, x: np.ndarray, y: np.ndarray) -> SubspaceNeighbours:
        self.x, self.y = x, y
        return self

    def decision_function(self, x: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        sim = subspace_similarity(x, self.x) if similarity is None else similarity
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, : self.neighbours]
        return self.y[nearest].mean(axis=1) - 0.5

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.decision_function(x) > 0).astype(np.int64)


def fit_attack(shadow: Traces, rows: np.ndarray, y: np.ndarray, target: Traces, seed: int):
    """The candidate with the best cross-validated UAR on the shadow updates, folds grouped by shadow speaker
    (so it is judged on voices it did not see), refitted on all of them; the target is never looked at.
    Candidates: ``candidates`` (linear and non-linear classifiers on update statistics) and
    ``SubspaceNeighbours`` for each subspace size and number of neighbours."""
    from sklearn.model_selection import GroupKFold

    groups = shadow.speaker[rows]
    n_groups = len(np.unique(groups))
    tried: list[dict[str, Any]] = []
    options = candidates(shadow, target)
    best, best_score = options[0], -1.0

    def note(option, score: float) -> None:
        nonlocal best, best_score
        v, centre, kind, c = option
        tried.append({"view": v, "centre": centre, "classifier": kind, "C": c, "cv_uar": round(score, 4)})
        log.info("audit: %s%s %s C=%g cross-validated UAR %.3f", v, " centred" if centre else "", kind, c, score)
        if score > best_score:
            best, best_score = option, score

    if n_groups >= 3:
        cv = [(train, test) for train, test in GroupKFold(n_splits=min(5, n_groups)).split(rows, y, groups)
              if len(np.unique(y[train])) == 2 and len(np.unique(y[test])) == 2]
        for option in options:
            v, centre, kind, c = option
            x = view(shadow, rows, v, centre)
            scores = [uar(y[test], classifier(kind, c, seed, len(train)).fit(x[train], y[train]).predict(x[test]))
                      for train, test in cv]
            note(option, float(np.mean(scores)) if scores else -1.0)
        similarity = subspace_similarity(shadow.subspace[rows], shadow.subspace[rows], SUBSPACE_DIMS)
        for dims, sim in similarity.items():
            for k in NEIGHBOURS:
                scores = []
                for train, test in cv:
                    knn = SubspaceNeighbours(k).fit(None, y[train])
                    pred = knn.decision_function(None, similarity=sim[np.ix_(test, train)]) > 0
                    scores.append(uar(y[test], pred.astype(np.int64)))
                note((f"subspace-{dims}", False, "subspace-neighbours", float(k)),
                     float(np.mean(scores)) if scores else -1.0)
    v, centre, kind, c = best
    x = view(shadow, rows, v, centre)
    model = SubspaceNeighbours(int(c)) if kind == "subspace-neighbours" else classifier(kind, c, seed, len(rows))
    return model.fit(x, y), best, best_score, tried


def bootstrap_uar(y: np.ndarray, pred: np.ndarray, peers: np.ndarray, *, samples: int, seed: int) -> tuple[float, float]:
    """95% interval of the UAR, resampling target peers with replacement (their rows together)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(peers)
    rows_of = {p: np.flatnonzero(peers == p) for p in ids}
    values = []
    for _ in range(samples):
        pick = np.concatenate([rows_of[p] for p in rng.choice(ids, len(ids))])
        if len(np.unique(y[pick])) == 2:
            values.append(uar(y[pick], pred[pick]))
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def attack(target: Traces, shadow: Traces, attribute: str, *, bootstrap: int, seed: int) -> dict[str, Any] | None:
    """The attack on one attribute, or None when either side lacks two labelled classes."""
    threshold = threshold_s = None
    if attribute == "age":
        # Older than the target's median speaker, for the shadow too: with ages in whole years and many alike
        # (BAVED: most speakers 19-23), two medians 20.5 and 21 would call a 21-year-old older on one side and
        # younger on the other. Only where the shadow has no speaker on one side of it (corpora of other
        # ages) does the shadow use its own median.
        threshold, threshold_s = target.median_age(), shadow.median_age()
        if threshold is None or threshold_s is None:
            return None
        common = shadow.labels(attribute, threshold)
        if len(np.unique(common[common >= 0])) == 2:
            threshold_s = threshold
    ys, yt = shadow.labels(attribute, threshold_s), target.labels(attribute, threshold)
    ks, kt = np.flatnonzero(ys >= 0), np.flatnonzero(yt >= 0)
    if len(np.unique(ys[ks])) < 2 or len(np.unique(yt[kt])) < 2:
        return None
    if target.inputs != shadow.inputs:
        raise UserError(f"the shadow run's first layer takes {shadow.inputs} inputs, the target's "
                        f"{target.inputs}: features differ between the corpora")
    model, (v, centre, kind, c), cv_uar, tried = fit_attack(shadow, ks, ys[ks], target, seed)
    x_target = view(target, kt, v, centre)
    pred, score = model.predict(x_target), model.decision_function(x_target)
    y, peers, rounds = yt[kt], target.peer[kt], target.round[kt]
    per_round = {int(r): uar(y[rounds == r], pred[rounds == r]) for r in np.unique(rounds)
                 if len(np.unique(y[rounds == r])) == 2}
    ids = np.unique(peers)
    truth = np.array([y[peers == p][0] for p in ids])
    votes = np.array([int(np.mean(pred[peers == p]) > 0.5) for p in ids])
    pooled = np.array([int(np.mean(score[peers == p]) > 0) for p in ids])
    low, high = bootstrap_uar(y, pred, peers, samples=bootstrap, seed=seed)
    return {
        "attack_uar": uar(y, pred),
        "attack_uar_per_round": per_round,
        "attack_uar_vote": uar(truth, votes),
        "attack_uar_pooled": uar(truth, pooled),
        "chance": 0.5,
        "ci_low": low,
        "ci_high": high,
        "peers_attacked": len(ids),
        "predictions": len(y),
        "positive_class": "F" if attribute == "sex" else f"older than {threshold:g}",
        "shadow_positive_class": "F" if attribute == "sex" else f"older than {threshold_s:g}",
        "shadow_cv_uar": cv_uar,
        "features": v + (", centred per round" if centre else ""),
        "attack_model": kind,
        "attack_c": c,
        "candidates": tried,
    }


def default_shadow(meta: dict[str, Any], run_dir: Path) -> Path:
    """The first corpus (by name) beside the run's own, or under P2PSER_SHARED_DATA, that shares no speaker
    with the run's peers and labels what the run learns and both sexes: EmoDB for a RAVDESS run."""
    from p2pser.partition.experiment import load_experiment

    own = Path(meta.get("data_dir", ""))
    roots = [own.parent] + ([Path(os.environ[SHARED_DATA_ENV])] if os.environ.get(SHARED_DATA_ENV) else [])
    task = meta["config"].get("task", "categorical")
    for root in dict.fromkeys(r.resolve() for r in roots if r.is_dir()):
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.resolve() != own.resolve()):
            try:
                experiment = load_experiment(folder, task=task)
            except UserError:
                continue
            if {u.sex for u in experiment.corpus.utterances} >= {"F", "M"}:
                return folder
    raise UserError(f"run folder {run_dir}: no shadow corpus found beside {own} or under ${SHARED_DATA_ENV} "
                    "(another corpus with folds, the run's labels and both sexes); pass one with --shadow DIR")


def check_disjoint(target: Traces, shadow_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse a shadow corpus that holds any recording of the target peers' speakers: the attacker must not
    have heard them (the run's own corpus, or a manifest over part of it). Recordings, not speaker names, are
    compared: two synthetic corpora share names (synth_00 ...) but no voice."""
    from p2pser.audio.corpora import load_corpus

    if Path(meta.get("data_dir", "")).resolve() == shadow_dir.resolve():
        raise UserError(f"shadow corpus {shadow_dir} is the run's own corpus: the attacker must not hold the "
                        "target's speech; give a disjoint corpus (e.g. EmoDB for a RAVDESS run)")
    heard = {s for joined in np.unique(target.speaker) for s in joined.split(",")}
    try:
        own = {u.path.resolve() for u in load_corpus(meta["data_dir"]).utterances if u.speaker in heard}
    except (UserError, KeyError):
        return  # the run's corpus has moved: nothing to compare against
    shared = sorted(u.speaker for u in load_corpus(shadow_dir).utterances if u.path.resolve() in own)
    if shared:
        raise UserError(f"shadow corpus {shadow_dir} holds {len(shared)} recordings of the run's speakers "
                        f"({shared[0]}, ...): the attacker must not hold the target's speech; give a disjoint "
                        "corpus or speaker set")


def audit_run(run_dir: str | Path, shadow_dir: str | Path | None = None, *, attribute: str = "sex",
              folds: int | None = None, bootstrap: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Attack the recorded updates of ``run_dir`` for ``attribute`` (sex, or age: older than the median
    speaker) with shadow peers trained on ``shadow_dir`` (None: ``default_shadow``); write ``RUN/audit.json``
    and ``RUN/audit.png``; return the audit."""
    if attribute not in ATTRIBUTES:
        raise UserError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    start = time.monotonic()
    run_dir = Path(run_dir)
    target, meta = read_traces(run_dir, what="run folder")
    shadow_dir = default_shadow(meta, run_dir) if shadow_dir is None else Path(shadow_dir)
    if not shadow_dir.is_dir():
        raise UserError(f"shadow corpus {shadow_dir} does not exist or is not a folder")
    check_disjoint(target, shadow_dir, meta)
    if not any(a.get(attribute) is not None for a in target.attributes):
        raise UserError(f"run folder {run_dir}: no peer holds speakers of one known {attribute} (sites of mixed "
                        f"speakers, or a corpus without {attribute} labels): there is no attribute to attack")
    shadow, runs = shadow_traces(meta, shadow_dir, run_dir / SHADOW_DIR, folds=folds, progress=progress)
    cfg = meta["config"]
    audit: dict[str, Any] = {
        "run": str(run_dir), "attribute": attribute, "shadow_corpus": str(shadow_dir), "shadow_runs": runs,
        "shadow_peers": len(np.unique(shadow.peer)), "shadow_speakers": len(np.unique(shadow.speaker)),
        "layer": meta["layer"], "dp_mode": cfg.get("dp", "none"),
        "dp_epsilon": _run_epsilon(run_dir), "dp_delta": cfg.get("dp_delta") if cfg.get("dp", "none") != "none" else None,
    }
    result = attack(target, shadow, attribute, bootstrap=bootstrap, seed=seed)
    if result is None:
        what = "both sexes" if attribute == "sex" else "ages on both sides of its median"
        raise UserError(f"shadow corpus {shadow_dir} does not label {what} among its speakers: it cannot train "
                        f"the attack; use a corpus with {attribute} labels (a manifest's {attribute} column)")
    audit |= result  # the headline fields: attack_uar ... for the attribute attacked
    audit["attributes"] = {attribute: result}
    audit["wall_s"] = round(time.monotonic() - start, 2)
    write_json_atomic(run_dir / AUDIT, audit)
    plot_audit(audit, run_dir / AUDIT_PLOT)
    return audit


def _run_epsilon(run_dir: Path) -> float | None:
    """The worst peer's epsilon from the run's summary, else from its metrics rows."""
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            return json.loads(summary.read_text()).get("dp_epsilon")
        except json.JSONDecodeError:
            pass
    from p2pser.report.summary import privacy_figures, read_metrics

    return privacy_figures(read_metrics(run_dir)).get("dp_epsilon")


def plot_audit(audit: dict[str, Any], path: Path) -> None:
    """Attack UAR per round for each attribute, with chance and the overall 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, result in audit.get("attributes", {}).items():
        rounds = sorted(int(r) for r in result["attack_uar_per_round"])
        line = ax.plot(rounds, [result["attack_uar_per_round"][r] for r in rounds], marker=".",
                       label=f"{name}: UAR {100 * result['attack_uar']:.1f}% "
                             f"[{100 * result['ci_low']:.1f}, {100 * result['ci_high']:.1f}]")
        ax.axhspan(result["ci_low"], result["ci_high"], color=line[0].get_color(), alpha=0.12)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    eps = audit.get("dp_epsilon")
    dp = "no DP" if audit.get("dp_mode") == "none" else f"--dp {audit['dp_mode']}, epsilon {eps:.3g}"
    ax.set(xlabel="round", ylabel="attack UAR", ylim=(0, 1),
           title=f"Attribute inference from sent updates ({dp}; shadow {Path(audit['shadow_corpus']).name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_audit(audit: dict[str, Any]) -> str:
    lines = []
    for name, r in audit.get("attributes", {}).items():
        lines.append(f"{name:<4} attack UAR {100 * r['attack_uar']:.1f}% (95% CI {100 * r['ci_low']:.1f}-"
                     f"{100 * r['ci_high']:.1f}%, chance {100 * r['chance']:.0f}%), majority vote per peer "
                     f"{100 * r['attack_uar_vote']:.1f}%, pooled per peer {100 * r['attack_uar_pooled']:.1f}%; "
                     f"{r['peers_attacked']} peers, {r['predictions']} updates; {r['attack_model']} on "
                     f"{r['features']} (shadow CV UAR {100 * r['shadow_cv_uar']:.1f}%)")
    lines.append(f"shadow: {audit['shadow_peers']} peers ({audit['shadow_speakers']} speakers) on "
                 f"{audit['shadow_corpus']}; dp {audit['dp_mode']}, epsilon {audit['dp_epsilon']}")
    return "\n".join(lines)
