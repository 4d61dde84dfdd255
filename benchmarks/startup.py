"""Scenario ``startup``: how long a fresh localnet process takes to its first remote call.

Each round uses a fresh ``LOCALNET_DIR`` with no registry running:

1. ``cold``: peer ``x`` is started in a fresh process and directory; entering
   ``localnet.Peer`` there includes spawning the registry. Reported: import time,
   ``Peer`` start time (→ live), and spawn → live (interpreter start included).
2. ``cold call``: right after ``x`` is live, a fresh process runs
   ``with localnet.Peer(): bench_echo("hello", peer="x")``. Reported: its import, ``Peer``
   start, start → first call completed, and spawn of ``x`` → that call completed (what
   starting two programs back to back in a fresh directory costs).
3. ``warm call``: the same fresh-process call, repeated, with the registry and ``x``
   already running; spawn → first call is from this process's own spawn.

Times come from ``time.monotonic()`` (one clock for all processes of the machine). Only
localnet is measured; a call needs a live target, which itself needs the registry, so
"cold" is the first peer's start.
"""

from __future__ import annotations

import time

from benchmarks._child import Params, load_localnet_module, report, run_child, wait_for_quit
from benchmarks._harness import Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Table
from benchmarks._stats import median

SYSTEMS = ("localnet",)
REQUIRES = {"localnet": ("localnet",)}
TARGET = "x"


def _ms(start: float, end: float) -> float:
    return (end - start) * 1e3


def target(system: str, params: Params) -> None:
    """Peer ``x``: report how long import and start took, then serve until quit."""
    begin = time.monotonic()
    app = load_localnet_module("_ln_app", "connect")
    imported = time.monotonic()
    with app.localnet.Peer(name=TARGET):
        live = time.monotonic()
        timings = {
            "import_ms": _ms(begin, imported),
            "start_ms": _ms(imported, live),
            "spawn_to_done_ms": _ms(params["spawned_at"], live),
        }
        report(ready=timings)
        wait_for_quit(params["lifetime"])


def probe(system: str, params: Params) -> None:
    """A fresh process: start a peer, make one call to ``x``, report the timings."""
    begin = time.monotonic()
    app = load_localnet_module("_ln_app", "connect")
    imported = time.monotonic()
    with app.localnet.Peer(name=params["name"]):
        started = time.monotonic()
        reply = app.bench_echo("hello", peer=TARGET)
        called = time.monotonic()
    if reply != "hello":
        raise AssertionError(f"echo returned {reply!r}")
    report(
        result={
            "import_ms": _ms(begin, imported),
            "start_ms": _ms(imported, started),
            "call_ms": _ms(imported, called),
            "called_at": called,
        }
    )


def _probes(cfg: Config) -> int:
    return 3 if cfg.quick else 5


def _measure(cfg: Config) -> Measure:
    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        x = ws.spawn("startup", "target", system, {}, name="target")
        cold = x.expect("ready", 60)["ready"]
        results = []
        for i in range(1 + _probes(cfg)):
            p = ws.spawn("startup", "probe", system, {"name": f"probe-{i}"}, name=f"probe{i}")
            result = p.expect("result", 60)["result"]
            # The first probe counts from the spawn of x: two programs started in a row.
            spawned_at = x.spawned_at if i == 0 else p.spawned_at
            result["spawn_to_done_ms"] = _ms(spawned_at, result.pop("called_at"))
            results.append(result)
        warm = {key: median([r[key] for r in results[1:]]) for key in results[1]}
        return {"cold": cold, "cold call": results[0], "warm call": warm}

    return measure


def run_startup(cfg: Config) -> Table:
    """The ``startup`` scenario (localnet only)."""
    table = Table(
        "startup",
        "fresh process → localnet peer live → first completed call to another peer (ms)",
        [
            Column("import_ms", "import", 1),
            Column("start_ms", "Peer start", 1),
            Column("call_ms", "start → call", 1),
            Column("spawn_to_done_ms", "spawn → done", 1),
        ],
        details=[
            f"fresh LOCALNET_DIR per round; warm call = median of {_probes(cfg)} fresh "
            f"processes; median of {cfg.rounds} round(s)",
        ],
        notes=[
            "cold: first peer in a fresh directory, no registry (its start spawns it); "
            "done = peer live",
            "cold call: the next fresh process, started as soon as the first is live; "
            "spawn → done counts from the first peer's spawn",
            "warm call: registry and target running; spawn → done from its own spawn",
            "start → call = from entering localnet.Peer() to the first call's reply (after import)",
        ],
        groups=["cold", "cold call", "warm call"],
        group_header="case",
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS), REQUIRES, _measure(cfg))


if __name__ == "__main__":
    run_child({"target": target, "probe": probe})
