"""``p2pser launch``: one process per peer of a topology on this host."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from p2pser.config import RunConfig, add_config_arguments, config_from_args, given_config_keys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="start one peer process per topology node on this host")
    p.add_argument("topology", metavar="TOPOLOGY_FILE", help="topology TOML file (see topologies/)")
    p.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder, partitioned among the peers")
    p.add_argument("--out", required=True, metavar="RUN", help="new run folder for results (or, with --continue, "
                   "the run to continue)")
    p.add_argument("--base-port", type=int, help="renumber the peers' ports from this one (avoid clashes)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_supervisor_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=_run)


def add_supervisor_arguments(p: argparse.ArgumentParser, *, continuable: bool = True) -> None:
    """The supervisor's own options, shared by launch, launch-hosts and slurm peer (not run settings: they
    say how to look after the peers, not what the peers compute)."""
    p.add_argument("--restart", type=int, default=0, metavar="N",
                   help="restart a crashed peer up to N times; it resumes from its checkpoint and catches up [0]")
    if continuable:
        p.add_argument("--continue", dest="continue_run", action="store_true",
                       help="continue the stopped run in RUN from every peer's checkpoint, with RUN/config.toml's "
                       "settings (a flag that differs from them is an error)")


def run_settings(args: argparse.Namespace, topology: Any) -> tuple[RunConfig, Any]:
    """The run's settings and topology: from the command line, or with --continue the run's own (checked)."""
    cfg = config_from_args(args)
    if not args.continue_run:
        return cfg, topology
    from p2pser.deploy.supervise import continued_config, continued_topology

    out = Path(args.out)
    cfg = continued_config(out, cfg, given_config_keys(args))
    return cfg, continued_topology(out, topology, args.topology)


def finish(summary: dict, args: argparse.Namespace, command: list[str]) -> int:
    """Print the summary; on an interrupted run the command that continues it. The exit status: 130 when
    interrupted, 1 when a peer crashed and was not recovered, else 0."""
    from p2pser.report.tables import print_summary

    print_summary(summary, args.out)
    if summary["interrupted"]:
        again = [*command, "--out", args.out, "--continue"] + (["--restart", str(args.restart)] if args.restart else [])
        print(f"interrupted; continue this run with:\n  p2pser {shlex.join(map(str, again))}", file=sys.stderr)
        return 130
    return 1 if summary["crashed_peers"] else 0


def _run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, zmq) only when the command runs: `p2pser --help` stays fast.
    from p2pser.deploy.launch import launch
    from p2pser.exchange.topology import load_topology

    topology = load_topology(args.topology)
    if args.base_port:
        topology = topology.with_ports(args.base_port)
    cfg, topology = run_settings(args, topology)
    summary = launch(topology, Path(args.topology).stem, args.data_dir, cfg, args.out, quiet=args.quiet,
                     restarts=args.restart, continuing=args.continue_run)
    command = ["launch", args.topology, args.data_dir] + (["--base-port", str(args.base_port)] if args.base_port
                                                         else []) + (["--quiet"] if args.quiet else [])
    return finish(summary, args, command)
