"""Scale: 100 peer processes on one host.

``test_hundred_peers_on_one_host`` starts a hundred child processes in
parallel, each running one peer (``scale-000`` ... ``scale-099``) that offers
``whoami()``, ``count()`` and ``seen()`` and subscribes to the event ``tick``
from the test's own peer, ``scale-driver``.  From that peer the test measures

* the time from the first spawn to the last READY line (all 100 started
  and registered),
* ``localnet.peers()`` latency with 100 peers registered (median of 50),
* a fan-out of ``TICKS`` events to the 100 subscribers followed by
  ``flush()``,
* ``whoami()`` and ``seen()`` on each of the 100, from four threads,

and checks that every peer saw exactly the events triggered, in order, and
that every call returned that peer's name.  All are then stopped with
SIGTERM, must exit with status 0 and leave the registry; the ``runtime_dir``
fixture fails the test if a process, a socket file or a shared-memory
segment is left.  The figures are printed as one line (visible with ``-s``).

``test_hundred_unfiltered_subscribers_start_together`` is the same start-up
with ``@subscribe("tick")`` *without* a publisher filter, so that every peer
is a possible publisher to every other: each peer then opens an event channel
to each of the 99 others (about 10,000 connections and 30,000 threads on the
host).  It checks that the 100 still start within the deadline.

``LOCALNET_SCALE_PEERS`` and ``LOCALNET_SCALE_TICKS`` change the sizes.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from helpers import wait_until

import localnet

pytestmark = pytest.mark.slow

PEERS = int(os.environ.get("LOCALNET_SCALE_PEERS", "100"))
TICKS = int(os.environ.get("LOCALNET_SCALE_TICKS", "20"))
START_DEADLINE = max(60.0, PEERS * 0.6)  # every peer READY this long after the first spawn
DRIVER = "scale-driver"

CHILD = """
import threading
NAME = sys.argv[1]
FILTER = json.loads(sys.argv[2])
got = []
lock = threading.Lock()

@localnet.connect()
def whoami():
    return NAME

@localnet.connect()
def count():
    with lock:
        return len(got)

@localnet.connect()
def seen():
    with lock:
        return list(got)

@localnet.subscribe("tick", **FILTER)
def on_tick(value, source=None):
    with lock:
        got.append([source, value])

peer = localnet.Peer(name=NAME)
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.event("tick")
def tick(*args, **kwargs):
    return args, kwargs


def start_all(spawn, names: list[str], subscribe_filter: str) -> tuple[list, float]:
    """Spawn one child per name at once; wait for every READY; returns (children, seconds)."""
    first = time.monotonic()
    children = [spawn(CHILD, ready=None, args=[name, subscribe_filter]) for name in names]
    deadline = first + START_DEADLINE
    failures = []
    for name, child in zip(names, children, strict=True):
        try:
            child.expect("READY", max(0.1, deadline - time.monotonic()))
        except AssertionError as exc:
            failures.append(f"{name}: {str(exc)[-300:]}")
    elapsed = time.monotonic() - first
    assert not failures, (f"{len(failures)} of {len(names)} peers did not start within "
                          f"{START_DEADLINE:g} s; first: {failures[0]}")
    return children, elapsed


def stop_all(children: list) -> float:
    """SIGTERM every child; each must exit with status 0.  Returns the seconds taken."""
    t = time.perf_counter()
    for child in children:
        child.signal(signal.SIGTERM)
    for child in children:
        code = child.wait_exit(30)
        assert code == 0, (child.pid, code, child.stderr[-20:])
    return time.perf_counter() - t


@pytest.mark.timeout(max(120, PEERS * 1.2))
def test_hundred_peers_on_one_host(spawn) -> None:
    names = [f"scale-{i:03d}" for i in range(PEERS)]
    with localnet.Peer(name=DRIVER) as driver:
        # -- start every peer in parallel; wait for all READY lines --------------
        children, started = start_all(spawn, names, f'{{"peers": "{DRIVER}"}}')
        rss = sum(psutil.Process(c.pid).memory_info().rss for c in children)

        # -- discovery with 100 registered ------------------------------------------
        listed = {p.name for p in localnet.peers()}
        assert set(names) <= listed, sorted(set(names) - listed)[:5]
        samples = []
        for _ in range(50):
            t = time.perf_counter()
            localnet.peers()
            samples.append(time.perf_counter() - t)
        peers_p50 = statistics.median(samples)

        # -- fan-out: every child's start() has returned, so (the contract) every
        # event triggered from now on reaches it; no waiting for routes here.
        t = time.perf_counter()
        for i in range(TICKS):
            tick(i, source=DRIVER)
        driver.flush(30)
        fan_out = time.perf_counter() - t
        expected = [[DRIVER, i] for i in range(TICKS)]

        # -- calls to each peer, from a few threads ----------------------------------
        def check(name: str) -> tuple[str, object, object]:
            remote = localnet.peer(name)
            return name, remote.call("whoami", timeout=20), remote.call("seen", timeout=20)

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(check, names))
        calls = time.perf_counter() - t
        wrong = [(name, who) for name, who, _ in results if who != name]
        assert not wrong, wrong[:5]
        missed = [(name, len(seen), seen[:3]) for name, _, seen in results if seen != expected]
        assert not missed, f"{len(missed)} peers did not see exactly the events: {missed[:3]}"
        per_peer = driver.stats().subscribers
        counts = {name: (per_peer[name].sent, per_peer[name].delivered,
                         per_peer[name].dropped, per_peer[name].failed) for name in names}
        odd = {name: c for name, c in counts.items() if c != (TICKS, TICKS, 0, 0)}
        assert not odd, f"(sent, delivered, dropped, failed) per subscriber: {odd}"

        # -- stop them all -------------------------------------------------------------
        stopped = stop_all(children)
        wait_until(lambda: not set(names) & {p.name for p in localnet.peers()}, 20,
                   what="the registry to forget every stopped peer")

    print(f"\nscale: {PEERS} peers started in parallel in {started:.2f} s "
          f"(RSS {rss / 2**20:.0f} MiB in all); peers() p50 {peers_p50 * 1000:.2f} ms; "
          f"{TICKS} events to {PEERS} subscribers + flush {fan_out * 1000:.0f} ms; "
          f"{PEERS} x (whoami + seen) from 4 threads {calls * 1000:.0f} ms; "
          f"SIGTERM to exit of all {stopped:.2f} s")


@pytest.mark.timeout(max(120, PEERS * 1.2))
def test_hundred_unfiltered_subscribers_start_together(spawn) -> None:
    names = [f"mesh-{i:03d}" for i in range(PEERS)]
    # Regression (found here, fixed): every peer used to open an event
    # channel (a connection and three threads) to every subscriber as soon
    # as the registry told it about one, whether or not it ever published:
    # about 30,300 threads for 100 peers, and a third of them failed to
    # start.  Publishers now open a channel when they first publish to it.
    children, started = start_all(spawn, names, "{}")
    threads = sum(psutil.Process(c.pid).num_threads() for c in children)
    stopped = stop_all(children)
    print(f"\nscale (unfiltered): {PEERS} peers started in parallel in {started:.2f} s, "
          f"{threads} threads in all; SIGTERM to exit of all {stopped:.2f} s")
