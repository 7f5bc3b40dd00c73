"""``p2pser launch``: one OS process per peer on this host, a live progress line, one summary at the end.

The launcher holds no model and relays no message: it fills the feature cache once (so peers start fast
instead of all decoding audio at the same time), starts ``p2pser peer`` processes under the supervisor
(``deploy/supervise.py``: crashes reported by peer id and signal, ``--restart N``, Ctrl-C stops every peer
cleanly), watches their metrics files, and reports. ``--continue`` resumes a stopped run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from p2pser.config import RunConfig, config_to_dict
from p2pser.deploy.supervise import (
    LocalPeer,
    Supervisor,
    finished_peers,
    restart_counts,
    stop_leftovers,
    summary_base,
)
from p2pser.exchange.algorithms import spec_of
from p2pser.exchange.privacy import preflight as privacy_preflight
from p2pser.exchange.topology import Topology, save_topology
from p2pser.learn.tasks import Task, experiment_task
from p2pser.partition.experiment import copies_for, extract_for, make_plan, test_set
from p2pser.report.run_folder import peer_dir, prepare_out_dir
from p2pser.report.summary import read_metrics, report_run

log = logging.getLogger(__name__)


def write_config_toml(cfg: RunConfig, path: Path) -> None:
    """A flat TOML file that ``--config`` reads back: the run's exact settings, kept with its results."""
    lines = []
    for key, value in config_to_dict(cfg).items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def progress_line(metrics: dict[int, list[dict]], n: int, task: Task) -> str:
    last = [rows[-1] for rows in metrics.values() if rows]
    if not last:
        return f"starting {n} peers ..."
    uas = [v for rows in metrics.values() if (v := _final(rows, task.test_key())) is not None]
    dists = [r["consensus_distance"] for r in last if r.get("consensus_distance") is not None]
    rounds = [r["round"] + 1 for r in last]
    text = f"round {min(rounds)}-{max(rounds)}"
    if uas:
        text += f"  {task.label()} mean {np.mean(uas):.3f} min {np.min(uas):.3f}"
    if dists:
        text += f"  consensus {np.mean(dists):.3g}"
    return text


def _final(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def launch(topology: Topology, topology_name: str, data_dir: str | Path, cfg: RunConfig, out_dir: str | Path,
           *, quiet: bool = False, restarts: int = 0, continuing: bool = False) -> dict:
    """Run every peer of ``topology`` as a process on this host under the supervisor; summarise the run.

    ``continuing``: ``out_dir`` holds a stopped run of this topology and ``cfg`` (see ``supervise.continued_config``);
    every peer that has not finished resumes from its checkpoint.
    """
    start = time.monotonic()
    out = prepare_out_dir(out_dir, continuing=continuing)
    plan = make_plan(data_dir, cfg, topology.n)
    task = experiment_task(plan.experiment)
    spec_of(cfg.algorithm).placement(topology)  # a topology the algorithm cannot run on fails now, not in every peer
    privacy_preflight(cfg, [len(p) for p in plan.peers])  # so do DP settings that cannot hold (issue 15)
    topo_file, cfg_file = out / "topology.toml", out / "config.toml"
    if not continuing:
        save_topology(topology, topo_file)
        write_config_toml(cfg, cfg_file)
    # Fill the feature cache once, in parallel; every peer then reads its own rows from it.
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg, progress=not quiet)
    test = test_set(features, row_of, plan, cfg.normalizer)
    copies_for(features, row_of, np.concatenate(plan.peers), cfg, progress=not quiet)  # the peers' copies too
    del features

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    finished = finished_peers(out) if continuing else set()
    workers = [
        LocalPeer(k, [sys.executable, "-m", "p2pser", "peer", "--topology", str(topo_file), "--id", str(k),
                      str(data_dir), "--config", str(cfg_file), "--out", str(out)], peer_dir(out, k), env)
        for k in range(topology.n) if k not in finished
    ]
    if continuing:
        stop_leftovers(out, [w.peer for w in workers])
    supervisor = Supervisor(workers, restarts=restarts,
                            progress=None if quiet else lambda: progress_line(read_metrics(out), topology.n, task))
    result = supervisor.run()
    result.record(out)
    base = summary_base("launch", topology_name, cfg, out, topology.n, result)
    return report_run(out, base, cfg, test, plan.classes, wall_s=time.monotonic() - start,
                      restarts=restart_counts(out, result), task=task)
