"""``p2pser keys new|fill``: CurveZMQ key pairs for peers, and their public keys into a topology file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="CurveZMQ key pairs for secured (encrypted, authenticated) runs")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    sub.required = True

    new = sub.add_parser("new", help="write peer-K.key (secret, 0600) and peer-K.pub files", description=(
        "Write CurveZMQ key pairs into DIR. Give --peers N for peers 0..N-1 (one admin makes all keys), "
        "--id K for one peer (each site makes its own secret key and sends only peer-K.pub), or --topology "
        "FILE for every peer of that file. With --topology the file's public_key fields are filled too."))
    new.add_argument("folder", type=Path, metavar="DIR", help="key folder (created if missing)")
    which = new.add_mutually_exclusive_group()
    which.add_argument("--peers", type=int, metavar="N", help="make keys for peers 0..N-1")
    which.add_argument("--id", type=int, dest="peer_id", metavar="K", help="make the key pair of peer K only")
    new.add_argument("--topology", type=Path, metavar="FILE",
                     help="topology file whose public_key fields are filled from DIR afterwards")
    new.set_defaults(func=_new)

    fill = sub.add_parser("fill", help="put the public keys of DIR/peer-K.pub into a topology file")
    fill.add_argument("folder", type=Path, metavar="DIR", help="folder with peer-K.pub for every peer")
    fill.add_argument("topology", type=Path, metavar="FILE", help="topology file to update in place")
    fill.add_argument("-o", "--output", type=Path, help="write here instead of updating FILE")
    fill.set_defaults(func=_fill)


def _new(args: argparse.Namespace) -> int:
    from p2pser.carriers.security import new_key_pair
    from p2pser.errors import UserError
    from p2pser.exchange.topology import load_topology

    topology = load_topology(args.topology) if args.topology is not None else None
    if args.peer_id is not None:
        ids = [args.peer_id]
    elif args.peers is not None:
        if args.peers < 1:
            raise UserError(f"--peers must be at least 1, got {args.peers}")
        ids = list(range(args.peers))
    elif topology is not None:
        ids = list(range(topology.n))
    else:
        raise UserError("say which keys to make: --peers N, --id K or --topology FILE")
    for k in ids:
        new_key_pair(args.folder, k)
    print(f"wrote {len(ids)} key pair(s) to {args.folder}: peer-K.key is secret (0600, keep it on peer K's "
          "host), peer-K.pub goes into the topology")
    if topology is not None:
        _fill_file(args.folder, args.topology, args.topology)
    return 0


def _fill(args: argparse.Namespace) -> int:
    _fill_file(args.folder, args.topology, args.output or args.topology)
    return 0


def _fill_file(folder: Path, source: Path, target: Path) -> None:
    from p2pser.carriers.security import with_public_keys
    from p2pser.exchange.topology import load_topology, save_topology

    topology = with_public_keys(load_topology(source), folder)
    save_topology(topology, target, note=f"public keys from {folder}")
    print(f"wrote {target}: public keys of {topology.n} peers")
