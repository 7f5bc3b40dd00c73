"""The ``p2pser`` command line: argparse subcommands that parse, validate and call the library.

Each area registers its own subcommands from a small module (``cli/data.py``, ``cli/train.py``, ...), so
this file only assembles them and turns ``UserError`` into one clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from p2pser.errors import UserError

# Modules under p2pser.cli that define ``register(subparsers)``; a module not written yet is skipped so
# the CLI keeps working while areas are added.
COMMAND_MODULES = ("data", "features", "train", "topology", "peer", "launch", "simulate", "keys", "multihost",
                   "audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pser", description="Decentralized speech emotion recognition: gossip learning over ZeroMQ."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"p2pser.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"p2pser.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def command_paths(parser: argparse.ArgumentParser | None = None) -> list[list[str]]:
    """Every command of the CLI as its words: [], ["data"], ["data", "info"], ... (tests and benchmarks
    print each one's help)."""
    parser = parser or build_parser()
    paths = [[]]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += [[name, *rest] for rest in command_paths(sub)]
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a supervisor restarts the same command
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"p2pser: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2pser: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
