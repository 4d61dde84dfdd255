"""The ``localnet`` command line (also ``python -m localnet``)."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_registry(options: argparse.Namespace) -> int:
    from . import _registry

    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    argv = [] if options.directory is None else ["--directory", options.directory]
    return _registry.main(argv)


def _cmd_demo(options: argparse.Namespace) -> int:
    from . import _demo

    return _demo.main(pause=options.pause)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localnet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry = commands.add_parser("registry", help="run the registry in the foreground",
                                   description="Run the registry of the runtime directory in "
                                   "the foreground, logging to stderr, until SIGINT/SIGTERM.")
    registry.add_argument("--directory", help="runtime directory (default: $LOCALNET_DIR, ...)")
    registry.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    registry.set_defaults(run=_cmd_registry)
    demo = commands.add_parser("demo", help="watch a small scene of peers",
                               description="Start a hub and two workers in subprocesses, "
                               "call them, publish events, kill a worker, and clean up.")
    demo.add_argument("--pause", type=float, default=0.4,
                      help="seconds between scenes (default 0.4)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    return int(options.run(options))
