"""`p2pser topology make|show`: write a topology file, or check one and draw it."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from p2pser.exchange.topology import (
    KINDS,
    draw_topology,
    load_topology,
    make_topology,
    save_topology,
    summary,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("topology", help="make, check and draw peer topologies (TOML files)")
    sub = parser.add_subparsers(dest="topology_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make", help="write a topology file", description=(
        "Write a connected topology of N peers to a TOML file; peer i listens on HOST:BASE_PORT+i. "
        "Edit hosts/ports in the file for a multi-host run."))
    make.add_argument("kind", choices=KINDS, metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    make.add_argument("-n", "--peers", type=int, required=True, dest="n", help="number of peers")
    make.add_argument("--degree", type=int, help="degree for random-regular and small-world (default 4)")
    make.add_argument("--rewire", type=float, help="small-world rewiring probability (default 0.1)")
    make.add_argument("--seed", type=int, default=0, help="seed for the random kinds (default 0)")
    make.add_argument("--host", default="127.0.0.1", help="host of every peer (default 127.0.0.1)")
    make.add_argument("--base-port", type=int, default=27100, help="port of peer 0 (default 27100)")
    make.add_argument("-o", "--output", type=Path, required=True, help="TOML file to write")
    make.set_defaults(func=_make)

    show = sub.add_parser("show", help="check a topology file, print its numbers and draw it")
    show.add_argument("file", type=Path, help="topology TOML file")
    show.add_argument("--png", type=Path, help="picture to write (default: FILE with .png)")
    show.add_argument("--json", action="store_true", help="print the numbers as JSON")
    show.set_defaults(func=_show)


def _make(args: argparse.Namespace) -> int:
    topo = make_topology(args.kind, args.n, degree=args.degree, seed=args.seed, host=args.host,
                         base_port=args.base_port, rewire=args.rewire)
    parts = ["p2pser", "topology", "make", args.kind, "-n", str(args.n)]
    for flag, value in (("--degree", args.degree), ("--rewire", args.rewire)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--seed", str(args.seed), "--host", args.host, "--base-port", str(args.base_port)]
    save_topology(topo, args.output, note="made by: " + shlex.join(parts))
    info = summary(topo)
    print(f"wrote {args.output}: {info['kind']}, {info['peers']} peers, {info['edges']} edges, "
          f"diameter {info['diameter']}, MH spectral gap {info['spectral_gap_mh']:.4f}")
    return 0


def _show(args: argparse.Namespace) -> int:
    topo = load_topology(args.file)
    png = draw_topology(topo, args.png or args.file.with_suffix(".png"))
    info = summary(topo)
    if args.json:
        print(json.dumps({**info, "png": str(png)}, indent=2))
        return 0
    print(f"{args.file}: {info['kind']}, {info['peers']} peers, {info['edges']} edges, "
          f"host(s) {', '.join(info['hosts'])}")
    print(f"degree min/mean/max {info['degree_min']}/{info['degree_mean']:.2f}/{info['degree_max']}, "
          f"diameter {info['diameter']}, MH spectral gap {info['spectral_gap_mh']:.4f}")
    width = len(str(topo.n - 1))
    for p in topo.peers:
        key = "  key " + p.public_key if p.public_key else ""
        print(f"  peer {p.id:>{width}}  {topo.endpoint(p.id):<28} neighbours {topo.neighbours(p.id)}{key}")
    print(f"picture: {png}")
    return 0
