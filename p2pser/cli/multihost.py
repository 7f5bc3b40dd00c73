"""``p2pser launch-hosts`` (peers on many hosts over SSH) and ``p2pser slurm peer|summarize`` (one Slurm task
per peer; see launch/slurm.sbatch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pser.cli.launch import add_supervisor_arguments, finish, run_settings
from p2pser.config import add_config_arguments, config_from_args, load_config
from p2pser.exchange.topology import KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch-hosts", help="start the peers of a topology on many hosts (SSH)",
                              description="Start each peer on the host the topology names, through the remote "
                              "shell of the hosts file; gather every peer folder into RUN and summarise it.")
    p.add_argument("hosts", metavar="HOSTS_FILE", help="hosts file (TOML): how to reach each topology host")
    p.add_argument("topology", metavar="TOPOLOGY_FILE", help="topology TOML file with the peers' real hosts")
    p.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder here (scoring); hosts may use their own")
    p.add_argument("--out", required=True, metavar="RUN", help="new local run folder for the gathered results "
                   "(or, with --continue, the run to continue)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_supervisor_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=_launch_hosts)

    slurm = subparsers.add_parser("slurm", help="Slurm helper: run this task's peer, or summarise the run")
    sub = slurm.add_subparsers(dest="slurm_command", metavar="ACTION")
    sub.required = True
    peer = sub.add_parser("peer", help="run peer SLURM_PROCID of a topology built from the allocation")
    peer.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder")
    peer.add_argument("--out", required=True, metavar="RUN", help="run folder on a shared file system")
    peer.add_argument("--kind", choices=KINDS, default="exponential", help="topology kind [exponential]")
    peer.add_argument("--degree", type=int, help="degree for random-regular and small-world")
    peer.add_argument("--base-port", type=int, default=27100, help="peer i listens on BASE_PORT+i [27100]")
    peer.add_argument("--bind-host", help="interface address to bind (default: the node's address)")
    peer.add_argument("--no-supervisor", action="store_true",
                      help="run the peer in this process: no restarts, and a peer killed by a signal is not recorded "
                      "(what the task's supervisor itself starts)")
    add_supervisor_arguments(peer, continuable=False)
    add_config_arguments(peer)
    peer.set_defaults(func=_slurm_peer)
    summ = sub.add_parser("summarize", help="write RUN/summary.json once every task has finished")
    summ.add_argument("data_dir", metavar="DATA_DIR", help="corpus folder")
    summ.add_argument("--out", required=True, metavar="RUN", help="the run folder the tasks wrote")
    summ.add_argument("--wall-s", type=float, default=0.0, help="wall seconds of the job step, for the summary")
    summ.set_defaults(func=_slurm_summary)


def _launch_hosts(args: argparse.Namespace) -> int:
    from p2pser.deploy.multihost import launch_hosts
    from p2pser.exchange.topology import load_topology

    cfg, topology = run_settings(args, load_topology(args.topology))
    summary = launch_hosts(args.hosts, topology, Path(args.topology).stem, args.data_dir, cfg, args.out,
                           quiet=args.quiet, restarts=args.restart, continuing=args.continue_run)
    # The run folder keeps no key paths: a continued run needs --keys again to send hosts their secret keys.
    command = ["launch-hosts", args.hosts, args.topology, args.data_dir] + (["--keys", cfg.keys] if cfg.keys else []) \
        + (["--quiet"] if args.quiet else [])
    return finish(summary, args, command)


def _slurm_peer(args: argparse.Namespace) -> int:
    import os
    import sys

    from p2pser.deploy.multihost import slurm_peer, slurm_task

    if args.no_supervisor:
        return slurm_peer(os.environ, args.out, args.data_dir, config_from_args(args), kind=args.kind,
                          base_port=args.base_port, degree=args.degree, bind_host=args.bind_host)
    # The task's peer runs as a child of this same command, so that its exit status (a signal included) is
    # seen, recorded and, with --restart, answered by starting it again.
    child = [sys.executable, "-m", "p2pser", *args.argv, "--no-supervisor"]
    return slurm_task(os.environ, args.out, child, restarts=args.restart)


def _slurm_summary(args: argparse.Namespace) -> int:
    from p2pser.deploy.multihost import slurm_summary
    from p2pser.report.tables import print_summary

    cfg = load_config(Path(args.out) / "config.toml")
    summary = slurm_summary(args.out, args.data_dir, cfg, wall_s=args.wall_s)
    print_summary(summary, args.out)
    return 1 if summary["crashed_peers"] else 0
