"""The publisher's own CPU per event, apart from its subscribers': ``python -m
benchmarks.publisher_cost [K ...]``.

In the ``fanout`` scenario the publisher shares two CPUs with K subscriber processes,
which weighs on its caches and its figure. Here the K subscribers (the fan-out's
localnet subscribers, in a workspace of their own) are stopped (SIGSTOP) while this
process triggers the events, so the trigger runs alone; then they are let go
(SIGCONT) and ``flush()`` waits until they handled everything. The thread CPU
clocks give, per event: the trigger (this thread) and the rest of the publisher's
threads (the courier, which sends and reads the acknowledgements). Three rounds per
K, the default K being 1, 2, 4 and 16. The events fit the default bounds and the
event ring, so none waits for room.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter

from benchmarks._child import load_localnet_module
from benchmarks._harness import Workspace
from benchmarks.fanout import READY_TIMEOUT

EVENTS = 9_000  # below event_queue (10,000) and the ring's room
ROUNDS = 3


def _thread_clocks() -> Counter[str]:
    clocks: Counter[str] = Counter()
    for thread in threading.enumerate():
        try:
            clock = time.pthread_getcpuclockid(thread.ident)  # type: ignore[arg-type]
            clocks[thread.name.split(" ")[0]] += time.clock_gettime(clock)
        except (OSError, TypeError):  # (a thread that ended meanwhile)
            pass
    return clocks


def measure(k: int) -> list[tuple[float, float]]:
    """(trigger, other threads) µs per event, one pair per round, with K subscribers."""
    with Workspace() as ws:
        os.environ["LOCALNET_DIR"] = ws.env()["LOCALNET_DIR"]  # this process publishes there
        params = {"path": ws.path("unused"), "events": ROUNDS * EVENTS + 1, "timeout": 120.0,
                  "k": k}
        subs = [ws.spawn("fanout", "subscriber", "localnet", {**params, "name": f"bench-sub-{i}"},
                         name=f"sub{i}", lifetime=300.0) for i in range(k)]
        for sub in subs:
            sub.expect("ready", READY_TIMEOUT)
        app = load_localnet_module("_ln_app", "event")
        figures = []
        with app.localnet.Peer(name="bench-publisher") as peer:
            app.bench_tick(-1, "payload")
            peer.flush(60)  # every channel open (and the ring made) before the count
            for _ in range(ROUNDS):
                for sub in subs:
                    os.kill(sub.pid, signal.SIGSTOP)
                try:
                    before = _thread_clocks()
                    for i in range(EVENTS):
                        app.bench_tick(i, "payload")
                    triggered = _thread_clocks()
                finally:
                    for sub in subs:
                        os.kill(sub.pid, signal.SIGCONT)
                peer.flush(120)
                after = _thread_clocks()
                trigger = triggered["MainThread"] - before["MainThread"]
                others = sum(after[name] - before[name] for name in after
                             if name.startswith("localnet-"))
                figures.append((trigger / EVENTS * 1e6, others / EVENTS * 1e6))
        return figures


def main(argv: list[str]) -> None:
    ks = [int(k) for k in argv] or [1, 2, 4, 16]
    print(f"publisher CPU per event, µs ({EVENTS:,} events per round, subscribers stopped "
          f"while triggering; rounds 1..{ROUNDS})")
    for k in ks:
        rounds = measure(k)
        print(f"  K={k:<3} trigger  " + "  ".join(f"{t:5.2f}" for t, _ in rounds)
              + "    courier  " + "  ".join(f"{c:5.2f}" for _, c in rounds))


if __name__ == "__main__":
    main(sys.argv[1:])
