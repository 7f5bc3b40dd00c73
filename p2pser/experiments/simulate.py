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
from p2pser.config import RunConfig
from p2pser.exchange.attacks import attacking_peers
from p2pser.exchange.peer import build_peer
from p2pser.exchange.topology import Topology
from p2pser.learn.tasks import experiment_task
from p2pser.partition.experiment import Plan, extract_for, test_set
from p2pser.report.run_folder import STATUS, peer_dir, write_json_atomic

log = logging.getLogger(__name__)


def simulate_run(plan: Plan, topology: Topology, topology_name: str, cfg: RunConfig, faults: FaultPlan,
                 out_dir: Path, *, features=None, row_of=None, progress: bool = False) -> dict:
    """One simulated run into ``out_dir``; ``features`` may be passed in to share them across a sweep."""
    from p2pser.report.average_model import AverageModelTracker
    from p2pser.report.summary import report_run

    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if features is None:
        needed = np.unique(np.concatenate([*plan.peers, plan.test]))
        features, row_of = extract_for(plan, needed, cfg, progress=False)
    test = test_set(features, row_of, plan, cfg.normalizer)
    peers = [build_peer(plan, topology, k, cfg, features, row_of, test) for k in range(topology.n)]
    task = experiment_task(plan.experiment)
    tracker = AverageModelTracker(peers, cfg.model, cfg.seed, plan.classes, task)
    sim = Simulator(peers, topology, cfg, faults, out_dir, progress=progress, on_record=tracker.add)
    t0 = time.perf_counter()
    sim.run()
    loop_s = time.perf_counter() - t0
    training_s = sum(p.learner.timings["train"] + p.learner.timings["eval"] for p in peers)
    for p in peers:
        folder = peer_dir(out_dir, p.id)
        p.save_outputs(folder)
        alive = sim.sim[p.id].alive
        if alive:
            sim.sim[p.id].checkpointer.save()  # as a real peer does at exit
        state = "done" if alive else "crashed"
        write_json_atomic(folder / STATUS, {"peer": p.id, "state": state})
    base = {
        "mode": "simulate", "algorithm": cfg.algorithm, "topology": topology_name, "model": cfg.model,
        "features": cfg.features, "fold": cfg.fold, "seed": cfg.seed, "crashed_peers": [],
        "virtual_time_s": round(sim.now, 3),
        # Share of the simulation's own time spent outside local training and evaluation: mixing,
        # encoding, decoding, the event loop and bookkeeping.
        "overhead_fraction": round(max(loop_s - training_s, 0.0) / max(loop_s, 1e-9), 4),
    }
    return report_run(out_dir, base, cfg, test, plan.classes, wall_s=time.monotonic() - start,
                      average_model_per_round=tracker.scores(), task=task,
                     attackers=attacking_peers(cfg))
