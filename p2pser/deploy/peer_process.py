"""One real peer: its own data, its ZeroMQ sockets, its metrics and model files under ``OUT/peer-KKK/``.

``status.json`` in the peer's folder always says where the peer is (starting, running, done, interrupted,
crashed) and, after a crash, the last error: the launcher reads it to report a crashed peer by id.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np

from p2pser.carriers.mailbox import Mailbox
from p2pser.carriers.realtime import RealtimeRunner
from p2pser.carriers.security import curve_config, security_on
from p2pser.carriers.transport import ZmqTransport
from p2pser.config import RunConfig
from p2pser.errors import UserError
from p2pser.exchange import algorithms
from p2pser.exchange.algorithms import spec_of
from p2pser.exchange.checkpoint import Checkpointer
from p2pser.exchange.peer import build_peer
from p2pser.exchange.topology import Topology
from p2pser.partition.experiment import copies_for, extract_for, make_plan, test_set
from p2pser.report.metrics_log import MetricsWriter, forget_rounds_from
from p2pser.report.run_folder import METRICS, STATUS, peer_dir, write_json_atomic
from p2pser.runtime import ensure_numba_cache, pin_threads

log = logging.getLogger(__name__)


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
    write_json_atomic(folder / STATUS, status)
    # The launcher stops peers with SIGTERM: turn it into KeyboardInterrupt so the model is still saved.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    checkpointer = None
    try:
        placement = spec_of(cfg.algorithm).placement(topology)
        # Keys are checked before feature extraction: a missing key file should not cost minutes first.
        curve = (curve_config(topology, peer_id, cfg.keys, peer_address=cfg.peer_address)
                 if security_on(cfg.security, topology) else None)
        plan = make_plan(data_dir, cfg, topology.n)
        needed = np.concatenate([plan.peers[peer_id], plan.test])
        features, row_of = extract_for(plan, needed, cfg, workers=1)
        copies = copies_for(features, row_of, plan.peers[peer_id], cfg, workers=1)  # its own utterances only
        peer = build_peer(plan, topology, peer_id, cfg, features, row_of,
                          test_set(features, row_of, plan, cfg.normalizer), copies=copies)
        del features
        saver = Checkpointer(peer, folder, cfg.checkpoint_every)
        resumed = cfg.resume == "auto" and saver.resume()
        if resumed:
            forget_rounds_from(folder / METRICS, saver.next_round)
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
            mailbox = Mailbox(peer, MetricsWriter(folder / METRICS), checkpointer=checkpointer)
            status["resumed"] = resumed  # kept to the end: the final status says whether this life resumed
            write_json_atomic(folder / STATUS, status | {"state": "running"})
            RealtimeRunner(mailbox, transport).run(
                algorithms.start(peer, checkpointer.next_round, resumed=resumed, **placement))
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
            checkpointer.peer.save_outputs(folder)
        write_json_atomic(folder / STATUS, status)
