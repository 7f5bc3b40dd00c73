"""``p2pser launch``: one OS process per peer on this host, a live progress line, one summary at the end.

The launcher holds no model and relays no message: it fills the feature cache once (so peers start fast
instead of all decoding audio at the same time), starts ``p2pser peer`` processes, watches their metrics
files, and reports. Ctrl-C stops every peer cleanly; a peer that dies is named with its last error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from p2pser.config import RunConfig, config_to_dict
from p2pser.exchange.algorithms import spec_of
from p2pser.exchange.topology import Topology, save_topology
from p2pser.learn.tasks import CLASSIFICATION
from p2pser.partition.experiment import extract_for, make_plan, test_set
from p2pser.report.run_folder import peer_dir, prepare_out_dir
from p2pser.report.summary import read_metrics, read_status, report_run

log = logging.getLogger(__name__)


def write_config_toml(cfg: RunConfig, path: Path) -> None:
    """A flat TOML file that ``--config`` reads back: the run's exact settings, kept with its results."""
    lines = []
    for key, value in config_to_dict(cfg).items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def _last_error(folder: Path) -> str:
    """The peer's own status if it wrote one, else the last line of its log."""
    try:
        error = json.loads((folder / "status.json").read_text()).get("error")
        if error:
            return error
    except (OSError, json.JSONDecodeError):
        pass
    try:
        lines = [ln for ln in (folder / "log.txt").read_text().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"
    except OSError:
        return "no log"


def progress_line(metrics: dict[int, list[dict]], n: int) -> str:
    last = [rows[-1] for rows in metrics.values() if rows]
    if not last:
        return f"starting {n} peers ..."
    uas = [v for rows in metrics.values() if (v := _final(rows, CLASSIFICATION.test_key())) is not None]
    dists = [r["consensus_distance"] for r in last if r.get("consensus_distance") is not None]
    rounds = [r["round"] + 1 for r in last]
    text = f"round {min(rounds)}-{max(rounds)}"
    if uas:
        text += f"  UA mean {np.mean(uas):.3f} min {np.min(uas):.3f}"
    if dists:
        text += f"  consensus {np.mean(dists):.3g}"
    return text


def _final(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def launch(topology: Topology, topology_name: str, data_dir: str | Path, cfg: RunConfig, out_dir: str | Path,
           *, quiet: bool = False) -> dict:
    start = time.monotonic()
    out = prepare_out_dir(out_dir)
    plan = make_plan(data_dir, cfg, topology.n)
    spec_of(cfg.algorithm).placement(topology)  # a topology the algorithm cannot run on fails now, not in every peer
    topo_file, cfg_file = out / "topology.toml", out / "config.toml"
    save_topology(topology, topo_file)
    write_config_toml(cfg, cfg_file)
    # Fill the feature cache once, in parallel; every peer then reads its own rows from it.
    needed = np.unique(np.concatenate([*plan.peers, plan.test]))
    features, row_of = extract_for(plan, needed, cfg, progress=not quiet)
    test = test_set(features, row_of, plan, cfg.normalizer)
    del features

    procs: dict[int, subprocess.Popen] = {}
    logs = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    interrupted = False
    try:
        for k in range(topology.n):
            folder = peer_dir(out, k)
            folder.mkdir(parents=True, exist_ok=True)
            fh = open(folder / "log.txt", "w")  # noqa: SIM115 -- the child writes to it until it exits
            logs.append(fh)
            cmd = [sys.executable, "-m", "p2pser", "peer", "--topology", str(topo_file), "--id", str(k),
                   str(data_dir), "--config", str(cfg_file), "--out", str(out)]
            procs[k] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        reported: set[int] = set()
        last_line, tty = "", sys.stdout.isatty()
        while any(p.poll() is None for p in procs.values()):
            time.sleep(1.0)
            for k, p in procs.items():
                if p.returncode not in (None, 0) and k not in reported:
                    reported.add(k)
                    print(f"\npeer {k} crashed (exit {p.returncode}): {_last_error(peer_dir(out, k))}",
                          file=sys.stderr)
            line = progress_line(read_metrics(out), topology.n)
            if not quiet and line != last_line:
                # On a terminal one line is rewritten in place; in a log file each change is its own line.
                print("\r" + line.ljust(78) if tty else line, end="" if tty else "\n", flush=True)
                last_line = line
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping all peers ...", file=sys.stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in logs:
            fh.close()
    if not quiet and sys.stdout.isatty():
        print()
    crashed = sorted(k for k, s in read_status(out).items() if s.get("state") == "crashed")
    base = {
        "mode": "launch",
        "algorithm": cfg.algorithm,
        "topology": topology_name,
        "model": cfg.model,
        "features": cfg.features,
        "fold": cfg.fold,
        "seed": cfg.seed,
        "interrupted": interrupted,
        "crashed_peers": crashed,
    }
    return report_run(out, base, cfg, test, plan.classes, wall_s=time.monotonic() - start)
