"""Memory held for subscribers that do not keep up, bounded in bytes.

A publisher process triggers events that carry large NumPy arrays (shared
memory) while its only subscriber is stopped (SIGSTOP) or slow (0.5 s per
event).  The publisher must hold at most ``event_bytes`` for it, plus the
event being triggered: further events wait ``event_block`` seconds, then are
dropped for that subscriber and counted.  Under a descriptor limit of 64 a
trigger never raises a raw ``OSError``.

The publisher measures the shared memory it holds after each trigger: the
sizes of its ``memfd`` segments (each counted once, by inode) from
``/proc/self/fd``, and its resident memory.  The figures are printed (run
with ``-s``) and recorded in tests/reliability/README.md.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import PeerProcess

from localnet import _shm

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _shm.AVAILABLE, reason="needs memfd (Linux)")]

MIB = 1024 * 1024
DEFAULT_BUDGET = 256 * MIB  # Peer(event_bytes=...) default

SUBSCRIBER = """
delay = float(sys.argv[1])
got = []

@localnet.subscribe("frame")
def on_frame(i, data):
    if delay:
        time.sleep(delay)  # the scenario: a handler that takes this long per event
    got.append(i)

@localnet.connect()
def count():
    return len(got)

localnet.serve_forever(localnet.Peer(name="sub"), ready=lambda: say("READY"))
"""

PUBLISHER = """
import resource
from collections import Counter
import numpy as np

budget, nofile = int(sys.argv[1]), int(sys.argv[2])
if nofile:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

@localnet.event("frame")
def frame(i, data):
    return (i, data), {}

def held():
    # (shared memory in memfd segments, each counted once; resident memory)
    sizes = {}
    for fd in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                st = os.stat(path)
                sizes[st.st_ino] = st.st_size
        except OSError:
            pass
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return sum(sizes.values()), rss

kwargs = {"event_bytes": budget} if budget else {}
peer = localnet.Peer(name="pub", event_block=0.05, **kwargs).start()
say("READY")
triggered = 0
for line in sys.stdin:
    command, *rest = line.split()
    if command == "send":  # send <events> <MiB each> <pace s> <measure 0/1>
        n, mib, pace, measure = int(rest[0]), float(rest[1]), float(rest[2]), rest[3] == "1"
        data = np.ones(int(mib * 2**20) // 8)
        outcomes, messages, peak_shm, peak_rss = Counter(), {}, 0, 0
        for i in range(n):
            try:
                frame(triggered, data)
                outcomes["ok"] += 1
                triggered += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1
                messages[type(exc).__name__] = str(exc)
            if measure:
                shm, rss = held()
                peak_shm, peak_rss = max(peak_shm, shm), max(peak_rss, rss)
            if pace:
                time.sleep(pace)  # the stream's pace, not synchronisation
        say("SENT", json.dumps({"outcomes": outcomes, "messages": messages,
                                "peak_shm": peak_shm, "peak_rss": peak_rss}))
    elif command == "flush":
        peer.flush(60)
        c = peer.stats().subscribers["sub"]
        got = localnet.peer("sub").count()
        say("STATS", json.dumps([triggered, c.sent, c.delivered, c.dropped, c.failed, got]))
    elif command == "quit":
        break
peer.close()
"""


def send(pub: PeerProcess, events: int, mib: float, pace: float = 0.0,
         measure: bool = True) -> dict:
    pub.send(f"send {events} {mib} {pace} {int(measure)}")
    return dict(json.loads(pub.expect("SENT", timeout=180).split(" ", 1)[1]))


def flush(pub: PeerProcess) -> tuple[int, int, int, int, int, int]:
    """(triggered, sent, delivered, dropped, failed, handled by the subscriber), after flush."""
    pub.send("flush")
    triggered, sent, delivered, dropped, failed, got = json.loads(
        pub.expect("STATS", timeout=90).split(" ", 1)[1])
    return triggered, sent, delivered, dropped, failed, got


def check_counts(pub: PeerProcess) -> tuple[int, int]:
    """Every event was either sent and handled or dropped and counted; (sent, dropped)."""
    triggered, sent, delivered, dropped, failed, got = flush(pub)
    assert sent + dropped == triggered
    assert (delivered, failed) == (sent, 0)
    assert got == delivered
    return sent, dropped


def shared_memory_of(pid: int) -> tuple[int, int]:
    """(bytes of the memfd segments process ``pid`` holds, its open descriptors)."""
    sizes, fds = {}, os.listdir(f"/proc/{pid}/fd")
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                st = os.stat(path)
                sizes[st.st_ino] = st.st_size
        except OSError:
            pass
    return sum(sizes.values()), len(fds)


def test_a_stopped_subscriber_holds_at_most_event_bytes_in_the_publisher(spawn) -> None:
    # Before: every 16 MiB event stayed in shared memory, 100 events 1.6 GB,
    # and nothing was dropped.
    budget, event = 128 * MIB, 16 * MIB
    sub = spawn(SUBSCRIBER, args=["0"])
    pub = spawn(PUBLISHER, args=[str(budget), "0"])
    sub.signal(signal.SIGSTOP)
    try:
        result = send(pub, 100, 16)
    finally:
        sub.signal(signal.SIGCONT)
    assert result["outcomes"] == {"ok": 100}, result
    # the events held, plus the one being triggered (its segment is reused after a drop)
    assert result["peak_shm"] <= budget + event, result
    sent, dropped = check_counts(pub)
    assert dropped > 0 and sent <= budget // event
    print(f"\nstopped subscriber, 100 x 16 MiB, event_bytes=128 MiB: publisher peak "
          f"shared memory {result['peak_shm'] / MIB:.0f} MiB, peak RSS "
          f"{result['peak_rss'] / MIB:.0f} MiB; sent {sent}, dropped {dropped}")


def test_a_slow_subscriber_holds_at_most_event_bytes_in_the_publisher(spawn) -> None:
    # The default bound (256 MiB); the subscriber handles 2 events a second.
    event = 16 * MIB
    spawn(SUBSCRIBER, args=["0.5"])
    pub = spawn(PUBLISHER, args=["0", "0"])
    result = send(pub, 80, 16, pace=0.02)
    assert result["outcomes"] == {"ok": 80}, result
    # held, plus the one being triggered, plus one the subscriber may still map
    # while its acknowledgement is on its way (not yet reusable)
    assert result["peak_shm"] <= DEFAULT_BUDGET + 2 * event, result
    sent, dropped = check_counts(pub)
    assert dropped > 0
    print(f"\nslow subscriber (0.5 s/event), 80 x 16 MiB, default event_bytes: publisher peak "
          f"shared memory {result['peak_shm'] / MIB:.0f} MiB, peak RSS "
          f"{result['peak_rss'] / MIB:.0f} MiB; sent {sent}, dropped {dropped}")


def test_a_descriptor_limit_never_makes_a_trigger_raise_a_raw_os_error(spawn) -> None:
    # Before: each pending segment held two descriptors, and under a limit of
    # 64 the 29th trigger raised OSError: [Errno 24] Too many open files.
    event = 16 * MIB
    sub = spawn(SUBSCRIBER, args=["0"])
    pub = spawn(PUBLISHER, args=["0", "64"])

    # 1. 16 MiB events: the byte bound keeps the descriptors few.
    sub.signal(signal.SIGSTOP)
    try:
        result = send(pub, 40, 16, measure=False)
        shm, fds = shared_memory_of(pub.pid)
    finally:
        sub.signal(signal.SIGCONT)
    assert result["outcomes"] == {"ok": 40}, result
    assert shm <= DEFAULT_BUDGET + event
    check_counts(pub)

    # 2. 2 MiB events: 128 of them fit the byte bound, not the descriptor
    # limit; a trigger past the limit raises OutOfResources, saying what to do.
    sub.signal(signal.SIGSTOP)
    try:
        result = send(pub, 150, 2, measure=False)
    finally:
        sub.signal(signal.SIGCONT)
    outcomes = result["outcomes"]
    assert set(outcomes) <= {"ok", "OutOfResources"}, result
    assert outcomes["ok"] > 20, result
    if "OutOfResources" in outcomes:
        message = result["messages"]["OutOfResources"]
        assert "event 'frame'" in message and "file descriptors (limit 64)" in message, message
        assert "event_bytes" in message, message
    check_counts(pub)

    # 3. Resumed, the publisher works as before.
    assert send(pub, 5, 2, measure=False)["outcomes"] == {"ok": 5}
    check_counts(pub)
    print(f"\ndescriptor limit 64, stopped subscriber: 40 x 16 MiB all sent or dropped "
          f"({shm / MIB:.0f} MiB held, {fds} descriptors open); 150 x 2 MiB: {outcomes}")
