"""Soak: mixed calls, events and large payloads while peers join and leave.

Two long-lived peers (a hub child and the test's own peer) exchange calls,
small events and 2–4 MiB arrays through shared memory for
``LOCALNET_SOAK_SECONDS`` (20 s by default, which CI runs; try 300 for a
real soak).  Meanwhile short-lived visitor processes join, subscribe, call
the hub with large arrays and leave, one in three killed with SIGKILL in the
middle of a transfer.  At the end the long-lived peers' open descriptors and
shared segments are back to where they started and their resident memory
within a small margin.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import numpy as np
import psutil
import pytest
from helpers import wait_until

import localnet
from localnet import _shm

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("LOCALNET_SOAK_SECONDS", "20"))
MIB = 1024 * 1024

HUB = """
import gc, numpy as np, psutil

@localnet.event("news")
def news(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def checksum(array):
    return float(array[0]) + float(array[-1]), array.nbytes

@localnet.connect()
def publish(i, size):
    news(i, np.full(size, float(i)) if size else None)
    return i

@localnet.connect()
def resources():
    gc.collect()
    localnet._shm.POOL.trim(everything=True)
    proc = psutil.Process()
    rings = localnet._ring.descriptors()  # the event ring, made with the second subscriber,
    return {"fds": proc.num_fds() - rings, "rings": rings,  # lasts as long as its publisher
            "rss": proc.memory_info().rss,
            # shared-memory transfers (the event ring lasts as long as its publisher)
            "segments": sum(1 for m in proc.memory_maps(grouped=False)
                            if "memfd:localnet" in m.path and "ring" not in m.path)}

localnet.serve_forever(localnet.Peer(name="hub", hub=True), ready=lambda: say("READY"))
"""

VISITOR = """
import numpy as np
got = []

@localnet.subscribe("news", hubs_only=True)
def on_news(i, array=None):
    got.append(i)

with localnet.Peer(name=sys.argv[1]):
    hub = localnet.peer("hub")
    for k in range(3):
        total, nbytes = hub.checksum(np.full((1 + k) * 256 * 1024, 2.0))
        assert nbytes == (1 + k) * 256 * 1024 * 8 and total == 4.0
    say("READY")
    sys.stdin.readline()  # the test says when to leave (or kills us)
"""


def own_resources() -> dict[str, int]:
    gc.collect()
    _shm.POOL.trim(everything=True)
    proc = psutil.Process()
    rings = localnet._ring.descriptors()  # the event ring, made with the second subscriber,
    return {"fds": proc.num_fds() - rings, "rings": rings,  # lasts as long as its publisher
            "rss": proc.memory_info().rss,
            # shared-memory transfers (the event ring lasts as long as its publisher)
            "segments": sum(1 for m in proc.memory_maps(grouped=False)
                            if "memfd:localnet" in m.path and "ring" not in m.path)}


def test_soak_keeps_resources_flat(spawn) -> None:
    received: list[int] = []

    def on_news(i: int, array: np.ndarray | None = None) -> None:
        received.append(i)
        if array is not None:
            assert float(array[0]) == float(i)

    localnet.subscribe("news", hubs_only=True)(on_news)
    try:
        _soak(spawn, received)
    finally:
        localnet.unsubscribe(on_news)


def _soak(spawn, received: list[int]) -> None:
    spawn(HUB)
    with localnet.Peer(name="long-lived") as me:
        hub = localnet.peer("hub")
        for i in range(20):  # warm up: pool, channels, mappings, code paths
            hub.checksum(np.ones(MIB))
            hub.publish(i, MIB // 8 if i % 2 else 0)
        me.flush(10)
        wait_until(lambda: len(received) == 20, what="warm-up events")
        # Our handlers ran, but the hub holds an event's segment until our
        # acknowledgement reaches it: the baseline is taken after that.
        hub_start = wait_until(lambda: (r := hub.resources())["segments"] == 0 and r,
                               what="the hub to settle its warm-up events")
        own_start = own_resources()

        deadline = time.monotonic() + SECONDS
        calls = events = visitors = killed = 0
        i = 1000
        while time.monotonic() < deadline:
            name = f"visitor-{visitors}"
            visitor = spawn(VISITOR, args=[name])
            visitors += 1
            for _ in range(20):
                size = (2 + i % 3) * MIB // 8 if i % 5 == 0 else 0
                assert hub.publish(i, size) == i
                assert hub.checksum(np.full(MIB // 4, 1.0))[1] == MIB * 2
                calls += 2
                events += 1
                i += 1
            if visitors % 3 == 0:
                big = np.full(4 * MIB // 8, 3.0)
                visitor.signal(signal.SIGKILL)  # mid-transfer, as far as it knows
                hub.checksum(big)
                visitor.wait_exit()
                killed += 1
            else:
                visitor.send("leave")
                assert visitor.wait_exit() == 0
            visitor.stop()  # closes the pipes the test holds to it
        me.flush(30)
        wait_until(lambda: len(received) == events + 20, timeout=30,
                   what="every event at the long-lived subscriber")
        assert received == sorted(received)

        wait_until(lambda: hub.resources()["fds"] == hub_start["fds"], timeout=15,
                   what="the hub's descriptors to return")
        hub_end, own_end = hub.resources(), own_resources()
    assert hub_end["segments"] == hub_start["segments"] == 0
    # At most the hub's one ring: its descriptor and the one its mapping keeps (mmap
    # dups it); a subscriber keeps one for its mapping of it while its channel is open.
    assert hub_end["rings"] <= 2 and own_end["rings"] <= 1 and own_start["rings"] <= 1
    assert own_end["segments"] == own_start["segments"] == 0
    assert own_end["fds"] == own_start["fds"]
    for label, start, end in (("hub", hub_start, hub_end), ("test", own_start, own_end)):
        growth = end["rss"] - start["rss"]
        assert growth < 64 * MIB, f"{label} RSS grew by {growth / MIB:.1f} MiB"
    print(f"\nsoak {SECONDS:g} s: {calls} calls, {events} events, {visitors} visitors "
          f"({killed} killed); hub fds {hub_start['fds']}->{hub_end['fds']}, "
          f"RSS {hub_start['rss'] / MIB:.1f}->{hub_end['rss'] / MIB:.1f} MiB; "
          f"test fds {own_start['fds']}->{own_end['fds']}, "
          f"RSS {own_start['rss'] / MIB:.1f}->{own_end['rss'] / MIB:.1f} MiB; "
          f"/dev/shm entries {len(os.listdir('/dev/shm'))}")
