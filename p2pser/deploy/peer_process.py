"""One real peer: its own data, its ZeroMQ sockets, its metrics and model files under ``OUT/peer-KKK/``.

``status.json`` in the peer's folder always says where the peer is (starting, running, done, interrupted,
crashed) and, after a crash, the last error: the launcher reads it to report a crashed peer by id.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np

from p2pser.carriers.realtime import MetricsWriter, RealtimeRunner
from p2pser.carriers.security import curve_config, security_on
from p2pser.carriers.transport import ZmqTransport
from p2pser.config import RunConfig
from p2pser.data.features import FeatureSet
from p2pser.errors import UserError
from p2pser.exchange import algorithms
from p2pser.exchange.peer import Peer, PeerData
from p2pser.exchange.pulls import PullLimiter
from p2pser.exchange.topology import Topology, metropolis_hastings_weights
from p2pser.files import write_atomically
from p2pser.learn.checkpoint import Checkpointer
from p2pser.partition.plan import Plan, extract_for, make_plan, rows, test_set
from p2pser.runtime import ensure_numba_cache, pin_threads

log = logging.getLogger(__name__)


def peer_dir(out_dir: str | Path, peer_id: int) -> Path:
    return Path(out_dir) / f"peer-{peer_id:03d}"


def write_json_atomic(path: Path, data: dict) -> None:
    # Status and normaliser files are rewritten often and rebuilt on restart: no fsync needed.
    write_atomically(path, lambda fh: fh.write(json.dumps(data, indent=1).encode()), durable=False)


def forget_rounds_from(path: Path, next_round: int) -> None:
    """Drop the metrics rows of rounds the peer runs again after resuming from a checkpoint of ``next_round``
    (it was stopped after writing them but before checkpointing them): one row per round of the model's own
    history, as a run that never stopped would have written."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["round"]) >= next_round:
                continue
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn last line (killed mid-write)
        kept.append(line)
    if len(kept) < len(lines):
        log.info("%s: dropped %d row(s) of rounds from %d on, which the resumed peer runs again", path,
                 len(lines) - len(kept), next_round)
        write_atomically(path, lambda fh: fh.write("".join(f"{ln}\n" for ln in kept).encode()), durable=False)


def hub_of(topology: Topology) -> int:
    """The star's centre: fedavg needs a peer linked to every other one."""
    for i in range(topology.n):
        if len(topology.neighbours(i)) == topology.n - 1:
            return i
    raise UserError("--algorithm fedavg needs a star (or complete) topology: no peer is linked to all others")


def build_peer(plan: Plan, topology: Topology, peer_id: int, cfg: RunConfig, features: FeatureSet,
               row_of: dict[int, int], test: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Peer:
    """The one way a peer is assembled, shared by real processes and the simulator.

    ``test`` is the fold's test set (x, y, lengths), passed in so that simulated peers share one copy.
    """
    own = rows(row_of, plan.peers[peer_id])
    if len(own) == 0:
        raise UserError(f"peer {peer_id} has no usable training audio: all {len(plan.peers[peer_id])} of its "
                        "files were skipped (reasons above); fix or remove them, or use fewer peers")
    data = PeerData.from_arrays(
        features.x, features.labels, features.lengths, own, test, plan.classes,
        val_fraction=cfg.val_fraction, seed=cfg.seed * 7919 + peer_id,
    )
    w = metropolis_hastings_weights(topology)
    neighbours = topology.neighbours(peer_id)
    # A peer's samples are its training files less validation and skipped ones: never more than its share.
    most = max(len(files) for files in plan.peers)
    return Peer(peer_id, neighbours, data, cfg, mix_weights={j: float(w[peer_id, j]) for j in [*neighbours, peer_id]},
                max_samples=most)


def run_peer(topology: Topology, peer_id: int, data_dir: str | Path, cfg: RunConfig, out_dir: str | Path,
             *, bind_host: str | None = None) -> int:
    """Run peer ``peer_id`` to the end of its schedule; returns an exit status."""
    if not 0 <= peer_id < topology.n:
        raise UserError(f"--id {peer_id} is not a peer of the topology (ids 0..{topology.n - 1})")
    pin_threads(1)
    ensure_numba_cache()
    folder = peer_dir(out_dir, peer_id)
    folder.mkdir(parents=True, exist_ok=True)
    status = {"peer": peer_id, "state": "starting", "pid": os.getpid()}
    write_json_atomic(folder / "status.json", status)
    # The launcher stops peers with SIGTERM: turn it into KeyboardInterrupt so the model is still saved.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    checkpointer = None
    try:
        hub = hub_of(topology) if cfg.algorithm == "fedavg" else 0
        # Keys are checked before feature extraction: a missing key file should not cost minutes first.
        curve = (curve_config(topology, peer_id, cfg.keys, peer_address=cfg.peer_address)
                 if security_on(cfg.security, topology) else None)
        plan = make_plan(data_dir, cfg, topology.n)
        needed = np.concatenate([plan.peers[peer_id], plan.test])
        features, row_of = extract_for(plan, needed, cfg, workers=1)
        peer = build_peer(plan, topology, peer_id, cfg, features, row_of, test_set(features, row_of, plan))
        del features
        saver = Checkpointer(peer, folder, cfg.checkpoint_every)
        resumed = cfg.resume == "auto" and saver.resume()
        if resumed:
            forget_rounds_from(folder / "metrics.jsonl", saver.next_round)
        else:
            saver.save()  # from the first moment on, a restart has something to load
        checkpointer = saver  # only now may the exit path overwrite what a previous life left behind
        host = bind_host or topology.peers[peer_id].host
        transport = ZmqTransport(
            peer_id,
            f"tcp://{host}:{topology.peers[peer_id].port}",
            {j: topology.endpoint(j) for j in peer.neighbours},
            linger_ms=2000,  # let the last round's models reach slower neighbours after we finish
            curve=curve,
        )
        try:
            metrics = MetricsWriter(folder / "metrics.jsonl")
            runner = RealtimeRunner(peer_id, peer.neighbours, transport, peer.decoder(), metrics,
                                    synchronous=cfg.algorithm != "gossip", answer_pull=peer.answer_pull,
                                    checkpointer=checkpointer, rounds=cfg.rounds,
                                    pulls=PullLimiter(cfg.pull_rate))
            status["resumed"] = resumed  # kept to the end: the final status says whether this life resumed
            write_json_atomic(folder / "status.json", status | {"state": "running"})
            runner.run(algorithms.start(peer, checkpointer.next_round, hub=hub, resumed=resumed))
        finally:
            transport.close()
        status["state"] = "done"
        return 0
    except KeyboardInterrupt:
        status["state"] = "interrupted"
        return 130
    except UserError as exc:
        status.update(state="crashed", error=str(exc))
        raise
    except Exception as exc:
        status.update(state="crashed", error=f"{type(exc).__name__}: {exc}")
        log.exception("peer %d crashed", peer_id)
        return 1
    finally:
        if checkpointer is not None:
            checkpointer.save()
            checkpointer.peer.save_model(folder / "model.npz")
            write_json_atomic(folder / "normalizer.json", checkpointer.peer.data.normalizer.to_dict())
        write_json_atomic(folder / "status.json", status)
