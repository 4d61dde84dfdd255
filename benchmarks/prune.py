"""Scenario ``prune``: from SIGKILL of a subscriber to its pruning at the publisher.

A publisher process with ``SUBSCRIBERS`` subscriber processes sends them an
event (so every connection is open and acknowledged), then, one at a time,
kills a subscriber with SIGKILL and times how long until
``peer.subscribers()`` no longer lists it: the publisher saw the connection
close, confirmed the death with psutil and stopped routing to it.  It does
not ask the registry.  Reported: median and maximum over the kills (ms).
"""

from __future__ import annotations

import os
import signal
import time

from benchmarks._child import Params, need_localnet, report, run_child, wait_for_quit
from benchmarks._harness import Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Table
from benchmarks._stats import latency_summary

SYSTEMS = ("localnet",)
REQUIRES = {"localnet": ("localnet",)}
SUBSCRIBERS = 5
TIMEOUT = 60.0


def subscriber(system: str, params: Params) -> None:
    """A subscriber that waits to be killed."""
    localnet = need_localnet()
    localnet.subscribe("bench_prune")(lambda *a: None)
    with localnet.Peer(name=params["name"]):
        report(ready=True)
        wait_for_quit(params["lifetime"])


def publisher(system: str, params: Params) -> None:
    """Kill each subscriber and time its disappearance from ``peer.subscribers()``."""
    localnet = need_localnet()
    names = params["names"]

    @localnet.event("bench_prune")
    def bench_prune(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict]:
        return args, kwargs

    times = []
    with localnet.Peer(name="bench-publisher") as peer:
        deadline = time.monotonic() + TIMEOUT
        while sorted(peer.subscribers("bench_prune")) != sorted(names):
            if time.monotonic() > deadline:
                raise TimeoutError("subscribers did not appear")
            time.sleep(0.001)  # the subscribers are other processes: poll their arrival
        bench_prune(0)
        peer.flush(TIMEOUT)
        for name in names:
            pid = localnet.peer(name).pid
            start = time.perf_counter_ns()
            os.kill(pid, signal.SIGKILL)
            while name in peer.subscribers():
                if time.perf_counter_ns() - start > TIMEOUT * 1e9:
                    raise TimeoutError(f"{name} was never pruned")
                time.sleep(0.0002)  # poll the publisher's own view; nothing to wait on
            times.append(time.perf_counter_ns() - start)
    summary = latency_summary(times)
    report(result={"p50_ms": summary["p50_us"] / 1000,
                   "max_ms": max(times) / 1e6, "kills": float(len(times))})


def _measure(cfg: Config) -> Measure:
    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        names = [f"bench-sub-{i}" for i in range(SUBSCRIBERS)]
        subs = [ws.spawn("prune", "subscriber", system, {"name": n}, name=n) for n in names]
        for child in subs:
            child.expect("ready", TIMEOUT)
        pub = ws.spawn("prune", "publisher", system, {"names": names}, name="publisher")
        result: dict[str, float] = pub.expect("result", TIMEOUT)["result"]
        return {"": result}

    return measure


def run_prune(cfg: Config) -> Table:
    """The ``prune`` scenario (localnet only)."""
    table = Table(
        "prune",
        "SIGKILL of a subscriber → the publisher stops routing to it (ms)",
        [Column("p50_ms", "p50 ms", 2), Column("max_ms", "max ms", 2),
         Column("kills", "kills", 0)],
        details=[f"{SUBSCRIBERS} subscribers killed one at a time, median of {cfg.rounds} "
                 "round(s)"],
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS), REQUIRES, _measure(cfg))


if __name__ == "__main__":
    run_child({"subscriber": subscriber, "publisher": publisher})
