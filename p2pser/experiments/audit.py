"""``p2pser audit RUN``: what a curious neighbour learns about a peer's speaker from the updates it sends.

The attribute-inference attack of federated SER (Feng et al., "Attribute inference attack of speech emotion
recognition in federated learning settings", 2021-22), on the updates a run recorded
(``--record-updates first-layer``, ``p2pser.exchange.recording``):

1. **Shadow peers.** The attacker knows the protocol (the run's settings, its initial model, its DP mode and
   epsilon) but not the target's speech. It runs the same configuration, seed and schedule on a *disjoint*
   corpus whose speakers' sex it knows (EmoDB for a RAVDESS run), one simulated run per fold of that corpus so
   that every shadow speaker is a shadow peer, and records its shadow peers' first-layer updates.
2. **Attack model.** Each update becomes a feature vector (the first layer's update averaged over its
   kernel taps, scaled to unit norm so that the learning-rate schedule does not dominate; per input its
   mean and RMS over the outputs when the two corpora's layers differ in outputs), and a logistic
   regression learns update -> speaker sex; its regularisation is chosen by cross-validation grouped by
   shadow speaker, so it is judged on voices it did not see.
3. **Attack.** One prediction per target peer and recorded round. ``attack_uar`` is the unweighted average
   recall over all of them (chance 0.5 for two classes), ``attack_uar_per_round`` the same per round,
   ``ci_low``/``ci_high`` a 95% bootstrap interval resampling target *peers* (a peer's rounds are not
   independent). ``attack_uar_vote`` is the UAR of one majority vote per peer.

Sex first; age (older or younger than the corpus's median speaker) too when both corpora label it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange.recording import UPDATES, UPDATES_META
from p2pser.report.run_folder import PEER_GLOB, write_json_atomic

log = logging.getLogger(__name__)

AUDIT = "audit.json"
AUDIT_PLOT = "audit.png"
SHADOW_DIR = "audit-shadow"
ATTRIBUTES = ("sex", "age")
# Regularisation strengths tried for the attack model (inverse L2 weight of the logistic regression).
C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class Traces:
    """Recorded updates of many peers: one row per (peer, round)."""

    updates: np.ndarray  # [rows, outputs, inputs] float32 (update_features)
    peer: np.ndarray  # [rows] peer id (or shadow trace id)
    round: np.ndarray  # [rows]
    speaker: np.ndarray  # [rows] the peer's speaker (grouping for cross-validation)
    attributes: list[dict[str, Any]]  # per row: the peer's attributes

    def labels(self, attribute: str, threshold: float | None = None) -> np.ndarray:
        """0/1 per row (-1 unknown): sex F=1; age above ``threshold`` = 1."""
        out = np.full(len(self.peer), -1, dtype=np.int64)
        for i, attrs in enumerate(self.attributes):
            value = attrs.get(attribute)
            if value is None:
                continue
            out[i] = int(value == "F") if attribute == "sex" else int(float(value) > threshold)
        return out


def update_features(update: np.ndarray) -> np.ndarray:
    """One update of the first layer as ``[outputs, inputs]``: a convolution's weight averaged over its kernel
    taps (the axes after the second)."""
    u = np.asarray(update, dtype=np.float32)
    if u.ndim >= 3:
        u = u.mean(axis=tuple(range(2, u.ndim)))
    return u.reshape(u.shape[0], -1)


def attack_features(updates: np.ndarray, per_input: bool) -> np.ndarray:
    """The attack's features of ``[rows, outputs, inputs]`` updates, each row scaled to unit L2 norm so that
    the learning-rate schedule does not dominate: the whole layer, or (``per_input``, when the target's and
    the shadow's layers have different outputs, e.g. the ``svm``'s class rows) the mean and RMS of each
    input over the outputs."""
    if per_input:
        flat = np.concatenate([updates.mean(axis=1), np.sqrt((updates ** 2).mean(axis=1))], axis=1)
    else:
        flat = updates.reshape(len(updates), -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return (flat / np.where(norms > 0, norms, 1.0)).astype(np.float32)


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
    rows: dict[str, list] = {"features": [], "peer": [], "round": [], "speaker": [], "attributes": []}
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
            rows["features"].append(update_features(u))
            rows["peer"].append(int(info["peer"]))
            rows["round"].append(int(r))
            rows["speaker"].append(speaker)
            rows["attributes"].append(info["attributes"])
    if not rows["features"]:
        raise UserError(f"{what} {run_dir} recorded no training round: nothing to attack")
    if len({f.shape for f in rows["features"]}) > 1:
        raise UserError(f"{what} {run_dir}: its peers recorded layers of different shapes: not one run")
    traces = Traces(np.stack(rows["features"]), np.asarray(rows["peer"]), np.asarray(rows["round"]),
                    np.asarray(rows["speaker"]), rows["attributes"])
    return traces, meta


def shadow_traces(meta: dict[str, Any], shadow_dir: Path, out: Path, *, folds: int | None,
                  progress: bool) -> tuple[Traces, list[str]]:
    """Simulate shadow peers on ``shadow_dir`` with the target's settings, one run per fold; their traces
    (trace ids made unique across folds) and the run folders."""
    from p2pser.carriers.faults import FaultPlan
    from p2pser.exchange.topology import make_topology
    from p2pser.experiments.simulate import simulate_run
    from p2pser.partition.experiment import load_experiment, make_plan

    target = RunConfig(**meta["config"])
    experiment = load_experiment(shadow_dir)
    n_folds = len(experiment.folds) if folds is None else min(folds, len(experiment.folds))
    parts, runs = [], []
    for k in range(1, n_folds + 1):
        # The target's recipe, DP and seed (so the same initial model); evaluation only at the end, no final
        # averaging (it records nothing), one peer per shadow speaker.
        cfg = target.replace(fold=k, folds=None, test_speakers=None, partition="speaker", record_updates="first-layer",
                             final_mixing=0, eval_every=target.rounds, attack="none", attackers=None,
                             time_budget=0.0, consensus_threshold=0.0)
        plan = make_plan(shadow_dir, cfg, None)
        kind = "complete" if plan.n_peers <= 8 else "exponential"
        topology = make_topology(kind, plan.n_peers, seed=cfg.seed)
        folder = out / f"fold-{k}"
        if progress:
            print(f"audit: shadow run {k}/{n_folds}: {plan.n_peers} peers on {shadow_dir} ({cfg.rounds} rounds)",
                  flush=True)
        simulate_run(plan, topology, kind, cfg, FaultPlan(), folder)
        traces, _ = read_traces(folder, what="shadow run")
        traces.peer = traces.peer + 1000 * k
        parts.append(traces)
        runs.append(str(folder))
    if len({p.updates.shape[2] for p in parts}) > 1:
        raise UserError(f"shadow corpus {shadow_dir}: its folds give layers of different shapes")
    return Traces(np.concatenate([p.updates for p in parts]), np.concatenate([p.peer for p in parts]),
                  np.concatenate([p.round for p in parts]), np.concatenate([p.speaker for p in parts]),
                  [a for p in parts for a in p.attributes]), runs


def uar(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted average recall over the classes present in ``y``."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def fit_attack(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int):
    """Logistic regression on standardised features, its L2 strength chosen by cross-validated UAR with
    folds grouped by shadow speaker."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced",
                                                                  random_state=seed))

    n_groups = len(np.unique(groups))
    best_c, best = C_GRID[0], -1.0
    if n_groups >= 3:
        cv = GroupKFold(n_splits=min(5, n_groups))
        for c in C_GRID:
            scores = []
            for train, test in cv.split(x, y, groups):
                if len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2:
                    continue
                scores.append(uar(y[test], model(c).fit(x[train], y[train]).predict(x[test])))
            score = float(np.mean(scores)) if scores else -1.0
            log.info("audit: C=%g cross-validated UAR %.3f", c, score)
            if score > best:
                best_c, best = c, score
    return model(best_c).fit(x, y), best_c, best


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
    threshold = None
    if attribute == "age":
        ages_t = [float(a["age"]) for a in target.attributes if a.get("age") is not None]
        ages_s = [float(a["age"]) for a in shadow.attributes if a.get("age") is not None]
        if not ages_t or not ages_s:
            return None
        # Older or younger than the median speaker of each corpus (its own median: corpora differ in age).
        threshold_s = float(np.median(ages_s))
        threshold = float(np.median(ages_t))
        ys = shadow.labels(attribute, threshold_s)
    else:
        ys = shadow.labels(attribute)
    yt = target.labels(attribute, threshold)
    ks, kt = ys >= 0, yt >= 0
    if len(np.unique(ys[ks])) < 2 or len(np.unique(yt[kt])) < 2:
        return None
    if target.updates.shape[2] != shadow.updates.shape[2]:
        raise UserError(f"the shadow run's first layer takes {shadow.updates.shape[2]} inputs, the target's "
                        f"{target.updates.shape[2]}: features differ between the corpora")
    per_input = target.updates.shape[1] != shadow.updates.shape[1]
    x_shadow = attack_features(shadow.updates[ks], per_input)
    clf, c, cv_uar = fit_attack(x_shadow, ys[ks], shadow.speaker[ks], seed)
    pred = clf.predict(attack_features(target.updates[kt], per_input))
    y, peers, rounds = yt[kt], target.peer[kt], target.round[kt]
    per_round = {int(r): uar(y[rounds == r], pred[rounds == r]) for r in np.unique(rounds)
                 if len(np.unique(y[rounds == r])) == 2}
    votes = {p: int(np.mean(pred[peers == p]) > 0.5) for p in np.unique(peers)}
    truth = {p: int(y[peers == p][0]) for p in np.unique(peers)}
    low, high = bootstrap_uar(y, pred, peers, samples=bootstrap, seed=seed)
    return {
        "attack_uar": uar(y, pred),
        "attack_uar_per_round": per_round,
        "attack_uar_vote": uar(np.array(list(truth.values())), np.array([votes[p] for p in truth])),
        "chance": 0.5,
        "ci_low": low,
        "ci_high": high,
        "peers_attacked": len(truth),
        "predictions": len(y),
        "positive_class": "F" if attribute == "sex" else f"older than {threshold:g}",
        "shadow_cv_uar": cv_uar,
        "features": "per-input mean and RMS over outputs" if per_input else "whole layer",
        "attack_c": c,
    }


def audit_run(run_dir: str | Path, shadow_dir: str | Path, *, folds: int | None = None, bootstrap: int = 1000,
              seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Attack the recorded updates of ``run_dir`` with shadow peers trained on ``shadow_dir``; write
    ``RUN/audit.json`` and ``RUN/audit.png``; return the audit."""
    start = time.monotonic()
    run_dir, shadow_dir = Path(run_dir), Path(shadow_dir)
    target, meta = read_traces(run_dir, what="run folder")
    if not shadow_dir.is_dir():
        raise UserError(f"shadow corpus {shadow_dir} does not exist or is not a folder")
    if Path(meta.get("data_dir", "")).resolve() == shadow_dir.resolve():
        raise UserError(f"shadow corpus {shadow_dir} is the run's own corpus: the attacker must not hold the "
                        "target's speech; give a disjoint corpus (e.g. EmoDB for a RAVDESS run)")
    if not any(a.get("sex") for a in target.attributes):
        raise UserError(f"run folder {run_dir}: no peer holds speakers of one known sex (sites of mixed "
                        "speakers, or a corpus without sex labels): there is no attribute to attack")
    shadow, runs = shadow_traces(meta, shadow_dir, run_dir / SHADOW_DIR, folds=folds, progress=progress)
    cfg = meta["config"]
    audit: dict[str, Any] = {
        "run": str(run_dir), "shadow_corpus": str(shadow_dir), "shadow_runs": runs,
        "shadow_peers": len(np.unique(shadow.peer)), "shadow_speakers": len(np.unique(shadow.speaker)),
        "layer": meta["layer"], "dp_mode": cfg.get("dp", "none"),
        "dp_epsilon": _run_epsilon(run_dir), "dp_delta": cfg.get("dp_delta") if cfg.get("dp", "none") != "none" else None,
    }
    for attribute in ATTRIBUTES:
        result = attack(target, shadow, attribute, bootstrap=bootstrap, seed=seed)
        if result is None:
            continue
        if attribute == "sex":
            audit |= result  # the headline fields: attack_uar ... for sex
        audit.setdefault("attributes", {})[attribute] = result
    if "attack_uar" not in audit:
        raise UserError(f"shadow corpus {shadow_dir} does not label both sexes among its speakers: it cannot "
                        "train the attack; use a corpus with sex labels (EmoDB, RAVDESS, a manifest's sex column)")
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
                     f"{100 * r['attack_uar_vote']:.1f}%; {r['peers_attacked']} peers, {r['predictions']} updates")
    lines.append(f"shadow: {audit['shadow_peers']} peers ({audit['shadow_speakers']} speakers) on "
                 f"{audit['shadow_corpus']}; dp {audit['dp_mode']}, epsilon {audit['dp_epsilon']}")
    return "\n".join(lines)
