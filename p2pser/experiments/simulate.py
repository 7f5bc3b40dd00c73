"""``p2pser simulate``: one simulated run, from a plan to a run folder with the same files as a launch.

The carrying-out is ``p2pser.carriers.simulated``; this module assembles the peers exactly as a real peer
process does (``build_peer``), runs them, writes what every real peer writes at exit, and reports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from p2pser.carriers.faults import FaultPlan
from p2pser.carriers.simulated import Simulator
from p2pser.carriers.workers import RemoteLearner, WorkerPool, default_workers
from p2pser.config import ENSEMBLE_MODELS, RunConfig
from p2pser.errors import UserError
from p2pser.exchange.attacks import attacking_peers
from p2pser.exchange.peer import build_peer
from p2pser.exchange.topology import Topology
from p2pser.learn.tasks import experiment_task
from p2pser.partition.experiment import Plan, extract_for, test_set
from p2pser.report.run_folder import STATUS, peer_dir, write_json_atomic

log = logging.getLogger(__name__)


# Below this many parameters a peer's round of work is a few milliseconds, about what forwarding its learner's
# calls to another process costs (measured: svm, 1,928 parameters, runs slower with two learner processes
# than with one; cnn1d-shallow, 81,800, faster).
SMALL_MODEL = 20_000


def _auto_workers(cfg: RunConfig, input_shape: tuple[int, ...], n_classes: int) -> int:
    """``--workers 0``: one learner process per core, or none for models too small to gain from it."""
    from p2pser.learn.models import build_model, count_parameters

    if cfg.model in ENSEMBLE_MODELS:  # boosting runs in xgboost's own threads, not in torch learners
        return 1
    small = count_parameters(build_model(cfg.model, input_shape[1], input_shape[2], n_classes)) < SMALL_MODEL
    return 1 if small else default_workers()


def simulate_run(plan: Plan, topology: Topology, topology_name: str, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, features=None, row_of=None, progress: bool = False, workers: int = 1) -> dict:
    """One simulated run into ``out_dir``; ``features`` may be passed in to share them across a sweep.

    ``workers`` > 1 puts the peers' learners into that many processes (``p2pser.carriers.workers``; 0: one
    per core): training runs in parallel, and the metrics are the same as with one process."""
    from p2pser.report.average_model import AverageModelTracker
    from p2pser.report.summary import report_run

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if features is None:
        needed = np.unique(np.concatenate([*plan.peers, plan.test]))
        features, row_of = extract_for(plan, needed, cfg, progress=False)
    test = test_set(features, row_of, plan, cfg.normalizer)
    if workers < 0:
        raise UserError(f"--workers must be 0 (one per core) or more, got {workers}")
    workers = min(workers or _auto_workers(cfg, test[0].shape, len(plan.classes)), topology.n)
    if cfg.model in ENSEMBLE_MODELS or cfg.dp != "none" or cfg.record_updates != "off":
        # A bag of received ensembles lives with its peer's event loop (not a torch learner); DP accounting
        # and update records are checked in one process only.
        workers = 1
    task = experiment_task(plan.experiment)
    pool = None
    if workers > 1:
        pool = WorkerPool(workers, topology.n,
                          lambda k: build_peer(plan, topology, k, cfg, features, row_of, test).learner)
    try:
        peers = [build_peer(plan, topology, k, cfg, features, row_of, test,
                            learner=None if pool is None else RemoteLearner(pool, k)) for k in range(topology.n)]
        # Tree ensembles have no average model to track (their peers' bags are reported instead).
        averageable = getattr(peers[0].learner, "averageable", True)
        tracker = AverageModelTracker(peers, cfg.model, cfg.seed, plan.classes, task) if averageable else None
        sim = Simulator(peers, topology, cfg, faults, out_dir, progress=progress,
                        on_record=tracker.add if tracker else None)
        t0 = time.perf_counter()
        sim.run()
        if pool is not None:
            pool.sync()
        loop_s = time.perf_counter() - t0
        training_s = sum(p.learner.timings["train"] + p.learner.timings["eval"] for p in peers)
        for p in peers:
            folder = peer_dir(out_dir, p.id)
            p.save_outputs(folder, durable=False)
            alive = sim.sim[p.id].alive
            if alive:
                sim.sim[p.id].checkpointer.save()  # as a real peer does at exit
            state = "done" if alive else "crashed"
            write_json_atomic(folder / STATUS, {"peer": p.id, "state": state})
        average_model = tracker.scores() if tracker else None
    finally:
        if pool is not None:
            pool.close()
    # With workers, training and evaluation run beside the event loop: their sum over peers can exceed it.
    base = {
        "mode": "simulate", "algorithm": cfg.algorithm, "topology": topology_name, "model": cfg.model,
        "features": cfg.features, "fold": cfg.fold, "seed": cfg.seed, "crashed_peers": [],
        "virtual_time_s": round(sim.now, 3),
        # Share of the simulation's own time spent outside local training and evaluation: mixing,
        # encoding, decoding, the event loop and bookkeeping.
        "overhead_fraction": round(max(loop_s - training_s / workers, 0.0) / max(loop_s, 1e-9), 4),
        "workers": workers,
        "loop_s": round(loop_s, 3),  # wall seconds of the simulation itself (no set-up, no report)
    }
    return report_run(out_dir, base, cfg, test, plan.classes, wall_s=time.monotonic() - start,
                      average_model_per_round=average_model, task=task,
                     attackers=attacking_peers(cfg))
