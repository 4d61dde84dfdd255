"""Scenario ``peers``: ``localnet.peers()`` latency with 100 other peers registered.

100 small peer processes (one ``localnet.Peer`` each) are started and confirmed live; then
an observer process with its own peer calls ``localnet.peers()`` repeatedly after a
warm-up. Reported: p50 and p99 of one ``peers()`` call (µs), and how many peers it listed
(100 expected: ``peers()`` leaves the caller out). Every peer process is ended by its PID.
"""

from __future__ import annotations

import time

from benchmarks._child import Params, need_localnet, report, run_child, wait_for_quit
from benchmarks._harness import Child, Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Table
from benchmarks._stats import latency_summary

SYSTEMS = ("localnet",)
REQUIRES = {"localnet": ("localnet",)}
PEERS = 100
READY_TIMEOUT = 120.0


def idle(system: str, params: Params) -> None:
    """A registered peer that does nothing until told to quit."""
    localnet = need_localnet()
    with localnet.Peer(name=params["name"]):
        report(ready=True)
        wait_for_quit(params["lifetime"])


def observer(system: str, params: Params) -> None:
    """Time ``localnet.peers()`` calls."""
    localnet = need_localnet("peers")
    with localnet.Peer(name="bench-observer"):
        for _ in range(params["warmup"]):
            listed = localnet.peers()
        latencies = [0] * params["calls"]
        clock = time.perf_counter_ns
        for i in range(params["calls"]):
            start = clock()
            localnet.peers()
            latencies[i] = clock() - start
    result = latency_summary(latencies)
    result["listed"] = float(len(listed))
    report(result=result)


def _calls(cfg: Config) -> tuple[int, int]:
    return (200, 20) if cfg.quick else (1_000, 50)


def _measure(cfg: Config) -> Measure:
    calls, warmup = _calls(cfg)

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        def spawn(i: int) -> Child:
            params = {"name": f"idle-{i:03d}"}
            return ws.spawn("peers", "idle", system, params, name=f"idle{i:03d}")

        # The first peer starts the registry; the other 99 then start all at once.
        spawn(0).expect("ready", READY_TIMEOUT)
        others = [spawn(i) for i in range(1, PEERS)]
        deadline = time.monotonic() + READY_TIMEOUT
        for child in others:
            child.expect("ready", max(0.1, deadline - time.monotonic()))
        params = {"calls": calls, "warmup": warmup}
        watcher = ws.spawn("peers", "observer", system, params, name="observer")
        result: dict[str, float] = watcher.expect("result", 120)["result"]
        if result["listed"] != PEERS:
            return {"": f"peers() listed {result['listed']:.0f} peers, not {PEERS}"}
        return {"": result}

    return measure


def run_peers(cfg: Config) -> Table:
    """The ``peers`` scenario (localnet only)."""
    calls, warmup = _calls(cfg)
    table = Table(
        "peers",
        f"localnet.peers() with {PEERS} other peers registered (one process each)",
        [
            Column("p50_us", "p50 µs"),
            Column("p99_us", "p99 µs"),
            Column("listed", "listed", 0),
        ],
        details=[f"{calls:,} calls after {warmup} warm-up, median of {cfg.rounds} round(s)"],
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS), REQUIRES, _measure(cfg))


if __name__ == "__main__":
    run_child({"idle": idle, "observer": observer})
