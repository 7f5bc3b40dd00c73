"""``p2pser simulate``: one simulated run, from a plan to a run folder with the same files as a launch.

The carrying-out is ``p2pser.carriers.simulated``; this module assembles the peers exactly as a real peer
process does (``build_peer``), runs them, writes what every real peer writes at exit, and reports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from p2pser.carriers.batching import PeerBatch
from p2pser.carriers.faults import FaultPlan
from p2pser.carriers.simulated import Simulator
from p2pser.carriers.workers import RemoteLearner, WorkerPool, default_workers
from p2pser.config import ENSEMBLE_MODELS, RunConfig
from p2pser.errors import UserError
from p2pser.exchange.attacks import attacking_peers
from p2pser.exchange.peer import build_peer
from p2pser.exchange.topology import Topology
from p2pser.learn.tasks import experiment_task
from p2pser.partition.experiment import Plan, copies_for, extract_for, test_set
from p2pser.report.run_folder import STATUS, peer_dir, write_json_atomic

log = logging.getLogger(__name__)


# Below this many parameters a peer's round of work is a few milliseconds, about what forwarding its learner's
# calls to another process costs (measured: svm, 1,928 parameters, runs slower with two learner processes
# than with one; cnn1d-shallow, 81,800, faster).
SMALL_MODEL = 20_000


# Stepping peers together removes the Python and dispatch overhead of each peer's step, not its arithmetic:
# it pays for models whose step is a few tiny operations on features computed once (the svm's head on its
# functionals: a 3.6x shorter simulation loop), much less or not at all for models that pool or convolve
# their input frames at every step (measured, BENCHMARKS.md issue 12: mlp on MFCC frames 0.74x, cnn1d-shallow
# 1.14x in one process, against which its default of two learner processes was not compared). ``auto``
# therefore batches models with a fixed front whose head is under this many floating-point operations per
# utterance; ``--batch-peers on`` batches any supported model.
LIGHT_FLOPS = 1_000_000


def _light(cfg: RunConfig, input_shape: tuple[int, ...], n_outputs: int) -> bool:
    """Whether ``cfg.model`` steps on features computed once (a parameter-free front and a recipe without
    augmentation: ``LocalTrainer._fixed_features``) through a head under ``LIGHT_FLOPS`` per utterance."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from p2pser.config import train_config
    from p2pser.learn.models import build_model

    if cfg.model in ENSEMBLE_MODELS:
        return False
    recipe = train_config(cfg)
    if recipe.time_shift > 0 or recipe.specaugment or recipe.mixup_alpha > 0:
        return False
    model = build_model(cfg.model, input_shape[1], input_shape[2], n_outputs)
    if not (hasattr(model, "fixed_features") and hasattr(model, "from_features")):
        return False
    h = model.fixed_features(torch.zeros(1, input_shape[1], input_shape[2]))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.from_features(h)
    return counter.get_total_flops() < LIGHT_FLOPS


def _auto_workers(cfg: RunConfig, input_shape: tuple[int, ...], n_outputs: int, light: bool) -> int:
    """``--workers 0``: one learner process per core, or none for models too small to gain from it (or light
    enough to be stepped together in one process)."""
    from p2pser.learn.models import build_model, count_parameters

    if cfg.model in ENSEMBLE_MODELS:  # boosting runs in xgboost's own threads, not in torch learners
        return 1
    small = count_parameters(build_model(cfg.model, input_shape[1], input_shape[2], n_outputs)) < SMALL_MODEL
    return 1 if small or light else default_workers()


def _batched(learner) -> bool:
    """Whether this peer's training may join a batch (``p2pser.learn.batched``): a plain torch learner (no
    DP, no update records, no attacker's or DP wrapper) of supported modules."""
    from p2pser.learn.batched import batchable
    from p2pser.learn.learner import TorchLearner

    return type(learner) is TorchLearner and batchable(learner.trainer)


def simulate_run(plan: Plan, topology: Topology, topology_name: str, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, features=None, row_of=None, progress: bool = False, workers: int = 1,
                 batch_peers: str = "off") -> dict:
    """One simulated run into ``out_dir``; ``features`` may be passed in to share them across a sweep.

    ``workers`` > 1 puts the peers' learners into that many processes (``p2pser.carriers.workers``; 0: one
    per core): training runs in parallel, and the metrics are the same as with one process.

    ``batch_peers`` (``auto``, ``on``, ``off``): step the local training of peers with one architecture and
    recipe together (``p2pser.carriers.batching``): ``auto`` for light models on features computed once
    (``_light``: the svm), in one learner process; ``on`` in one process for any supported model; the
    results equal ``off``'s up to floating-point rounding."""
    from p2pser.report.average_model import AverageModelTracker
    from p2pser.report.summary import report_run

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if features is None:
        needed = np.unique(np.concatenate([*plan.peers, plan.test]))
        features, row_of = extract_for(plan, needed, cfg, progress=False)
    test = test_set(features, row_of, plan, cfg.normalizer)
    # Each real peer perturbs its own utterances (peer_process); here one call does it for all of them.
    copies = copies_for(features, row_of, np.concatenate(plan.peers), cfg)
    if workers < 0:
        raise UserError(f"--workers must be 0 (one per core) or more, got {workers}")
    if batch_peers not in ("auto", "on", "off"):
        raise UserError(f"--batch-peers must be auto, on or off, got {batch_peers!r}")
    task = experiment_task(plan.experiment)
    # The model's outputs are the task's (class scores and/or one per dimension), not the number of classes:
    # a regression task has no classes at all.
    n_outputs = task.n_outputs(len(plan.classes))
    light = batch_peers == "auto" and _light(cfg, test[0].shape, n_outputs)
    if batch_peers == "on" and not workers:
        workers = 1  # the batch lives in this process
    workers = min(workers or _auto_workers(cfg, test[0].shape, n_outputs, light), topology.n)
    if cfg.model in ENSEMBLE_MODELS or cfg.dp != "none" or cfg.record_updates != "off":
        # A bag of received ensembles lives with its peer's event loop (not a torch learner); DP accounting
        # and update records are checked in one process only.
        workers = 1
    pool = None
    if workers > 1:
        pool = WorkerPool(workers, topology.n,
                          lambda k: build_peer(plan, topology, k, cfg, features, row_of, test, copies=copies).learner)
    try:
        peers = [build_peer(plan, topology, k, cfg, features, row_of, test, copies=copies,
                            learner=None if pool is None else RemoteLearner(pool, k)) for k in range(topology.n)]
        batch = None
        if pool is None and (batch_peers == "on" or light):
            batch = PeerBatch()
            for p in peers:
                if _batched(p.learner):
                    p.learner = batch.wrap(p.learner)
        # Tree ensembles have no average model to track (their peers' bags are reported instead).
        averageable = getattr(peers[0].learner, "averageable", True)
        tracker = AverageModelTracker(peers, cfg.model, cfg.seed, plan.classes, task) if averageable else None
        sim = Simulator(peers, topology, cfg, faults, out_dir, progress=progress,
                        on_record=tracker.add if tracker else None)
        t0 = time.perf_counter()
        sim.run()
        if pool is not None:
            pool.sync()
        if batch is not None:
            batch.flush()
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
        # Training requests carried out in batches, and their mean size (1.0: nothing was batched).
        "batched_peers": None if batch is None else round(batch.requests / max(batch.flushes, 1), 2),
        "loop_s": round(loop_s, 3),  # wall seconds of the simulation itself (no set-up, no report)
    }
    return report_run(out_dir, base, cfg, test, plan.classes, wall_s=time.monotonic() - start,
                      average_model_per_round=average_model, task=task,
                     attackers=attacking_peers(cfg))
