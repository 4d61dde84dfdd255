"""``python -m benchmarks``: run the scenarios and print one table per scenario.

Every system's server and client run in separate, freshly spawned processes; each
scenario round measures all systems in turn, and the tables show medians over rounds.
``--json PATH`` also writes every sample. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from benchmarks import aio, call, fanout, large, nats, peers, prune, startup
from benchmarks._harness import Config, log
from benchmarks._report import Table

# A scenario returns its table, or its tables (``aio``: ``aio`` and ``aio100``).
SCENARIOS: dict[str, tuple[Callable[[Config], Table | Sequence[Table]], Sequence[str]]] = {
    "call": (call.run_call, call.SYSTEMS),
    "call4": (call.run_call4, call.SYSTEMS),
    "fanout": (fanout.run_fanout, fanout.SYSTEMS),
    "large": (large.run_large, large.SYSTEMS),
    "startup": (startup.run_startup, startup.SYSTEMS),
    "peers": (peers.run_peers, peers.SYSTEMS),
    "prune": (prune.run_prune, prune.SYSTEMS),
    "aio": (aio.run_aio, aio.SYSTEMS),
    "nats": (nats.run_nats, nats.SYSTEMS),
}
SHM = Path("/dev/shm")


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    every_system = sorted({s for _, systems in SCENARIOS.values() for s in systems})
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark localnet against the alternatives, side by side in one run.",
        epilog="systems: " + ", ".join(every_system),
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls/events/sizes; whole run < 2 minutes"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="rounds per scenario, medians over rounds (3; --quick 1)",
    )
    parser.add_argument(
        "--only", type=_split, metavar="SCENARIO[,SCENARIO]", help=", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--systems",
        type=_split,
        metavar="A,B",
        help="only these systems ('localnet' includes localnet-*); each scenario's floor "
        "always runs, for the ratios",
    )
    parser.add_argument(
        "--pin",
        choices=("same", "split"),
        help="call, call4, aio: run server and client on one CPU (same) or on two (split); "
        "by default the kernel places them, and where it does moves the figures",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="more progress on stderr")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    unknown = set(args.only or ()) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    known = set(every_system) | {"localnet"}
    unknown = set(args.systems or ()) - known
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    return args


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raise, so that every workspace's finally block ends its processes.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cfg = Config(
        quick=args.quick,
        rounds=args.rounds or (1 if args.quick else 3),
        systems=frozenset(args.systems) if args.systems else None,
        verbose=args.verbose,
        pin=args.pin,
    )
    names = [name for name in SCENARIOS if not args.only or name in args.only]
    shm_before = _shm_entries()
    started = time.monotonic()
    print(
        f"localnet benchmarks: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{cfg.rounds} round(s){', quick' if cfg.quick else ''}"
        f"{f', pinned: {cfg.pin}' if cfg.pin else ''}",
        flush=True,
    )
    tables: dict[str, Table] = {}
    for name in names:
        run, systems = SCENARIOS[name]
        if cfg.systems is not None and not any(cfg.wants(s) for s in systems):
            continue
        produced = run(cfg)
        for table in [produced] if isinstance(produced, Table) else produced:
            tables[table.name] = table
            print("\n" + table.render(), flush=True)
    elapsed = time.monotonic() - started
    print(f"\ntotal {elapsed:.0f} s")
    leaked = sorted(_shm_entries() - shm_before)
    if leaked:
        log(f"warning: new entries in {SHM} during the run: {', '.join(leaked)}")
    if args.json is not None:
        document = {
            "python": platform.python_version(),
            "executable": sys.executable,
            "cpus": os.cpu_count(),
            "quick": cfg.quick,
            "rounds": cfg.rounds,
            "seconds": elapsed,
            "scenarios": {name: table.to_json() for name, table in tables.items()},
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
