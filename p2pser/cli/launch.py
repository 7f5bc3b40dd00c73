"""``p2pser launch``: one process per peer of a topology on this host."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pser.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="start one peer process per topology node on this host")
    p.add_argument("topology", metavar="TOPOLOGY_FILE", help="topology TOML file (see topologies/)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder, partitioned among the peers")
    p.add_argument("--out", required=True, metavar="RUN", help="new run folder for results")
    p.add_argument("--base-port", type=int, help="renumber the peers' ports from this one (avoid clashes)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, zmq) only when the command runs: `p2pser --help` stays fast.
    from p2pser.deploy.launch import launch
    from p2pser.exchange.topology import load_topology
    from p2pser.report.tables import print_summary

    cfg = config_from_args(args)
    topology = load_topology(args.topology)
    if args.base_port:
        topology = topology.with_ports(args.base_port)
    summary = launch(topology, Path(args.topology).stem, args.data_dir, cfg, args.out, quiet=args.quiet)
    print_summary(summary, args.out)
    return 1 if summary["crashed_peers"] else 0
