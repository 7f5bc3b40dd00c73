"""Run one or many simulations side by side and compare them.

A comma list on a sweepable option (``--topology ring,exponential,complete,star``, ``--algorithm``,
``--model``, ``--partition``) runs every combination into its own sub-folder, then writes
``comparison.md`` and comparison plots. Features are extracted once and shared by every run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pser.carriers.faults import Distribution, FaultPlan, parse_churn, parse_window
from p2pser.config import RunConfig, SimConfig
from p2pser.errors import UserError
from p2pser.exchange.topology import Topology, draw_topology, load_topology, make_topology
from p2pser.experiments.simulate import simulate_run
from p2pser.partition.experiment import extract_for, make_plan
from p2pser.runtime import pin_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    label: str  # what distinguishes this run in a sweep ("" for a single run)
    run: RunConfig
    sim: SimConfig


def resolve_topology(spec: str, n_peers: int | None, sim: SimConfig, seed: int) -> tuple[Topology, str]:
    """A topology file, or a kind built for ``n_peers`` peers."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        topology = load_topology(path)
        if n_peers is not None and topology.n != n_peers:
            raise UserError(f"topology {path} has {topology.n} peers but the run needs {n_peers}")
        return topology, path.stem
    if n_peers is None:
        raise UserError(f"--topology {spec} needs a number of peers: pass --peers N")
    return make_topology(spec, n_peers, degree=sim.degree, seed=seed), spec


def fault_plan(sim: SimConfig, n_peers: int, *, rounds: int = 0, seed: int = 0) -> FaultPlan:
    return FaultPlan(
        drop=sim.drop,
        delay=Distribution.parse(sim.delay, "--delay"),
        step_time=Distribution.parse(sim.step_time, "--step-time"),
        stragglers=sim.stragglers,
        straggler_factor=sim.straggler_factor,
        churn=tuple(parse_churn(sim.churn, n_peers, rounds=rounds, seed=seed)),
        partition=parse_window(sim.network_partition),
    )


def _peers_needed(case: Case) -> int | None:
    path = Path(case.sim.topology)
    if path.suffix == ".toml" or path.exists():
        return load_topology(path).n
    return case.sim.peers


def run_cases(data_dir: str | Path, cases: list[Case], out_dir: str | Path) -> list[dict]:
    # Many small models step one after another: a second torch thread buys nothing, and on a shared
    # machine it costs a lot (measured: svm forward of 16 RAVDESS utterances 19 ms on 1 thread, 415 ms on 2
    # under load 7 on 2 cores).
    pin_threads(1)
    out = Path(out_dir)
    shared: dict[tuple, tuple] = {}  # (fold, features, ...) -> extracted features, reused by every case
    summaries = []
    for case in cases:
        cfg = case.run
        plan = make_plan(data_dir, cfg, _peers_needed(case))
        topology, name = resolve_topology(case.sim.topology, plan.n_peers, case.sim, cfg.seed)
        faults = fault_plan(case.sim, topology.n, rounds=case.run.rounds, seed=case.run.seed)
        key = (cfg.fold, cfg.folds, cfg.test_speakers, cfg.features, cfg.cache_dir)
        if key not in shared:
            needed = np.unique(np.concatenate([*plan.peers, plan.test]))
            shared[key] = extract_for(plan, needed, cfg, progress=True)
        features, row_of = shared[key]
        run_dir = out / case.label if case.label else out
        if any(run_dir.glob("peer-*")):
            raise UserError(f"output folder {run_dir} already holds a run: choose a new --out")
        print(f"simulating {case.label or name}: {topology.n} peers, {cfg.algorithm}, {cfg.rounds} rounds ...",
              flush=True)
        summary = simulate_run(plan, topology, name, cfg, faults, run_dir, features=features, row_of=row_of,
                               progress=True, workers=case.sim.workers,
                               batch_peers=case.sim.batch_peers)
        summary["label"] = case.label or name
        summaries.append(summary)
        draw_topology(topology, run_dir / "topology.png")
    return summaries


def run_baseline(data_dir: str | Path, cfg: RunConfig, n_peers: int, out_dir: Path) -> dict:
    """The pooled-data model with the same model, features and epoch budget as the ``n_peers`` peers."""
    from p2pser.config import ENSEMBLE_MODELS, train_config
    from p2pser.experiments.centralized import train_centralized
    from p2pser.features.augment import perturbations
    from p2pser.learn.trees import XGB_TREES
    from p2pser.partition.experiment import feature_spec

    plan = make_plan(data_dir, cfg, n_peers)
    tokens = perturbations(cfg.augment, cfg.augment_copies)
    # A peer's training part holds its perturbed copies too: an epoch of it is that much longer.
    mean_own = np.mean([len(p) for p in plan.peers]) * (1 - cfg.val_fraction) * (1 + len(tokens))
    # Each peer sees rounds x local_steps x batch_size samples of its own data: that many epochs of it.
    epochs = max(1, round(cfg.rounds * cfg.local_steps * cfg.batch_size / max(mean_own, 1)))
    start = time.monotonic()
    summary = train_centralized(
        data_dir, out_dir, folds_path=cfg.folds, fold=cfg.fold, test_speakers=cfg.test_speakers,
        # The peers' training recipe exactly (config.train_config) and their feature length: only the data
        # pooling and the step count differ between the two arms.
        model_name=cfg.model, spec=feature_spec(cfg), train_cfg=train_config(cfg, epochs=epochs),
        seed=cfg.seed, cache_dir=cfg.cache_dir, progress=True, normalizer=cfg.normalizer, task=cfg.task,
        augment=tokens,
    )
    # Trees have no epochs: the pooled xgb boosts as many trees as a peer may (p2pser.learn.trees.XGB_TREES).
    trees = cfg.model in ENSEMBLE_MODELS
    summary.update(label="centralized", epochs=None if trees else epochs,
                   budget=f"{XGB_TREES} boosting rounds" if trees else f"{epochs} epochs",
                   wall_s=round(time.monotonic() - start, 2))
    return summary
