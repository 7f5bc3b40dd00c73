"""``p2pser peer``: run one peer of a topology in this process."""

from __future__ import annotations

import argparse

from p2pser.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("peer", help="run one peer (its own data, ZeroMQ to its neighbours)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder (this peer uses only its own part)")
    p.add_argument("--topology", required=True, metavar="FILE", help="topology TOML file")
    p.add_argument("--id", type=int, required=True, dest="peer_id", help="this peer's id in the topology")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder; the peer writes RUN/peer-KKK/")
    p.add_argument("--bind-host", help="interface address to bind (default: the host in the topology)")
    add_config_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, zmq) only when the command runs: `p2pser --help` stays fast.
    from p2pser.deploy.peer_process import run_peer
    from p2pser.exchange.topology import load_topology

    cfg = config_from_args(args)
    topology = load_topology(args.topology)
    return run_peer(topology, args.peer_id, args.data_dir, cfg, args.out, bind_host=args.bind_host)
