"""The event ring: small events written once into shared memory for every subscriber.

Real subscriber processes read the publisher's ring (localnet._ring); these
tests make the ring small so that it wraps and fills, stop a subscriber
that holds it, mix ring events with events that cannot go through it, feed a
peer malformed RING frames, and run a publisher without the C extensions.
"""

from __future__ import annotations

import fractions
import os
import signal
import struct

import numpy
import pytest
from helpers import raw_channel, wait_until

import localnet
from localnet import _ring, _wire
from localnet._lanes import take

pytestmark = pytest.mark.skipif(not _ring.available(), reason="no memfd shared memory here")

SUBSCRIBER = """
got = []

@localnet.subscribe("ring_tick")
def on_tick(i, pad=b""):
    got.append(i)

@localnet.subscribe("ring_mixed")
def on_mixed(i, value):
    got.append((i, type(value).__name__))

@localnet.connect()
def received():
    return got

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.event("ring_tick")
def ring_tick(*args, **kwargs):
    return args, kwargs


@localnet.event("ring_mixed")
def ring_mixed(*args, **kwargs):
    return args, kwargs


def _written(peer: localnet.Peer) -> int:
    ring = peer._publisher._ring
    return 0 if ring is None else ring.state[2]


def test_a_small_ring_wraps_and_fills_and_every_subscriber_gets_every_event_in_order(
        spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ring, "RING_BYTES", 8192)  # a few dozen laps
    names = [f"ring-sub-{i}" for i in range(3)]
    for name in names:
        spawn(SUBSCRIBER, args=[name])
    n = 20_000
    with localnet.Peer(name="ring-pub") as peer:
        for i in range(n):
            ring_tick(i, pad=b"p" * (i % 300))  # items of 30..330 bytes: splits at each lap
        peer.flush(60)
        for name in names:
            assert peer.peer(name).received() == list(range(n))
        ring = peer._publisher._ring
        assert ring is not None and ring.state[0] > 3 * 8192  # it went round 3 times or more
        assert 0 < _written(peer) < n  # (the rest went the plain way while it was full)
        rows = peer.stats().subscribers
        assert {name: (rows[name].sent, rows[name].delivered, rows[name].failed)
                for name in names} == {name: (n, n, 0) for name in names}


def test_a_stopped_subscriber_holds_the_ring_and_the_others_go_on_the_plain_way(
        spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ring, "RING_BYTES", 8192)
    running = [spawn(SUBSCRIBER, args=[f"ring-running-{i}"]) for i in range(2)]
    n = 5_000
    with localnet.Peer(name="ring-pub") as peer:
        ring_tick(-2)
        peer.flush(20)  # two outboxes: the ring is made with the second
        ring = peer._publisher._ring
        assert ring is not None
        stopped = spawn(SUBSCRIBER, args=["ring-stopped"])  # so it reads the ring
        ring_tick(-1)
        peer.flush(20)  # its channel open, the ring's descriptor sent
        assert [outbox.ring for outbox in peer._publisher._outboxes.values()
                if outbox.name == "ring-stopped"] == [ring]
        stopped.signal(signal.SIGSTOP)
        try:
            for i in range(n):
                ring_tick(i)
            for name in ("ring-running-0", "ring-running-1"):
                other = peer.peer(name)
                wait_until(lambda other=other: len(other.received()) == n + 2, timeout=30)
                assert other.received() == list(range(-2, n))
        finally:
            stopped.signal(signal.SIGCONT)
        peer.flush(30)
        assert peer.peer("ring-stopped").received() == list(range(-1, n))
        assert 0 < ring.state[2] < n + 2  # it filled while the subscriber was stopped
    assert [child.stop() for child in (*running, stopped)] == [0, 0, 0]


class Opaque:
    """Not a plain value: its events go as whole pickles, not through the ring."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_ring_events_keep_their_order_among_pickles_and_shared_memory(spawn) -> None:
    for name in ("ring-mixed-0", "ring-mixed-1"):  # (the ring comes with the second)
        spawn(SUBSCRIBER, args=[name])
    expected = []
    with localnet.Peer(name="ring-pub") as peer:
        for i in range(600):
            kind = i % 4
            value = (i if kind < 2 else fractions.Fraction(i, 7) if kind == 2
                     else numpy.full(300_000, i, dtype="int64"))  # shared memory
            ring_mixed(i, value)
            expected.append([i, type(value).__name__])
        peer.flush(60)
        for name in ("ring-mixed-0", "ring-mixed-1"):
            got = peer.peer(name).received()
            assert [list(pair) for pair in got] == expected
        assert _written(peer) >= 300


def test_a_subscriber_reads_the_ring_and_refuses_a_reused_or_malformed_span() -> None:
    ring = _ring.EventRing(4096)
    reader = _ring.RingReader()
    try:
        lane: list = [[], 100, False]
        items = [_serial_item(i) for i in range(5)]
        for item in items:
            assert ring.fan_out(([lane[0], 100, False],), "e", item) is None
        entries = lane[0]
        assert [entry[3] for entry in entries] == [1, 2, 3, 4, 5]
        assert _ring.is_ring_run(entries)
        start, end = entries[0][2], entries[-1][2] + len(entries[-1][1])
        frame = (int(_wire.Kind.EVENT), 5, _ring.pack_span(start, end), [ring.dup()])
        _, ident, body, fds = reader.items_frame(frame)
        assert ident == 5 and fds == [] and body[0] == _wire.ITEMS_MARK
        import pickle
        assert [event[1][0] for event in pickle.loads(body[1:])] == list(range(5))
        with pytest.raises(_wire.ProtocolError, match="unexpected descriptor"):
            reader.items_frame((5, 5, _ring.pack_span(start, end), [ring.dup()]))
        with pytest.raises(_wire.ProtocolError, match="ring"):  # across the end
            reader.items_frame((5, 5, _ring.pack_span(4000, 4200), []))
        with pytest.raises(_wire.ProtocolError, match="bytes"):
            reader.items_frame((5, 5, _ring.pack_span(10, 10), []))
        with pytest.raises(_wire.ProtocolError, match="RING frame of"):
            reader.items_frame((5, 5, b"R" + b"\0" * 3, []))
        # The publisher took the space back (it had let go of this subscriber):
        struct.pack_into("<Q", ring.map, 0, end)
        with pytest.raises(_wire.ProtocolError, match="reused"):
            reader.items_frame((5, 5, _ring.pack_span(start, end), []))
        with pytest.raises(_wire.ProtocolError, match="before the ring"):
            _ring.RingReader().items_frame((5, 5, _ring.pack_span(start, end), []))
    finally:
        reader.close()
        ring.close()
    assert take(("e", b"x"), ()) is None


def _serial_item(i: int) -> bytes:
    from localnet import _serial
    item = _serial.dumps_event("e", (i,), {}, None)
    assert isinstance(item, bytes) and item[0] != 0x80
    return item


def test_the_ring_takes_space_back_only_behind_every_holder() -> None:
    class Holder:
        closed = False
        hold: int | None = None

        def ring_hold(self) -> int | None:
            return self.hold

    ring = _ring.EventRing(1000)
    try:
        a, b = Holder(), Holder()
        ring.join((a, b))
        lanes = ([[], 10**6, False],)
        for _ in range(9):
            assert ring.fan_out(lanes, "e", b"x" * 100) is None
        a.hold, b.hold = 0, 500
        assert ring.fan_out(lanes, "e", b"x" * 200) is False  # a holds the start
        assert ring.state[3] > 0  # so it pauses: the next triggers go the plain way
        ring.state[3] = 0
        a.hold = 800
        assert ring.fan_out(lanes, "e", b"x" * 200) is None  # behind b (500): room at 0
        assert lanes[0][0][-1][2] == 1000 and ring.state[1] == 500
        b.closed = True  # a closed outbox holds nothing
        assert ring.reclaim() == 800
    finally:
        ring.close()
    assert ring.closed and ring.fan_out(lanes, "e", b"x") is False


@localnet.connect()
def ring_ping() -> str:
    return "pong"


def test_malformed_ring_frames_drop_the_channel_not_the_peer() -> None:
    with localnet.Peer(name="ring-target") as peer:
        address = peer.address
        for body, fds in ((_ring.pack_span(0, 10), []), (b"R", []),
                          (_ring.pack_span(0, 10), "pipe")):
            sock = raw_channel(address, "events")
            try:
                if fds == "pipe":  # a descriptor that is no ring (no size)
                    read, write = os.pipe()
                    try:
                        _wire.send_raw_with_fds(
                            sock, _wire.pack_header(_wire.Kind.EVENT, 1, len(body), 1) + body,
                            [read])
                    finally:
                        os.close(read)
                        os.close(write)
                else:
                    sock.sendall(_wire.pack_header(_wire.Kind.EVENT, 1, len(body)) + body)
                sock.settimeout(10)
                assert sock.recv(64) == b""  # dropped
            finally:
                sock.close()
        with localnet.Peer(name="ring-caller") as caller:
            assert caller.call("ring-target", "ring_ping", (), {}) == "pong"


PURE_PUBLISHER = """
import localnet._lanes, localnet._ring
assert localnet._lanes.c_ring_fan_out is None
localnet._ring.RING_BYTES = 8192

@localnet.event("ring_tick")
def ring_tick(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def fire(n):
    for i in range(n):
        ring_tick(i, pad=b"p" * (i % 200))
    peer.flush(60)
    return peer._publisher._ring.state[2]

peer = localnet.Peer(name="ring-pure").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_a_publisher_without_the_extensions_writes_the_ring_in_python(spawn, tmp_path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['localnet._fastcall'] = None\n"
        "sys.modules['localnet._speedups'] = None\n"
        "sys.modules['localnet._trigger'] = None\n")
    spawn(SUBSCRIBER, args=["ring-pure-sub"])  # a second subscriber: the ring is made
    spawn(PURE_PUBLISHER,
          PYTHONPATH=os.pathsep.join([str(tmp_path), spawn.env()["PYTHONPATH"]]))
    got: list[int] = []

    @localnet.subscribe("ring_tick", peers="ring-pure")
    def on_tick(i: int, pad: bytes = b"") -> None:
        got.append(i)

    try:
        with localnet.Peer(name="ring-reader") as me:
            written = me.call("ring-pure", "fire", (5_000,), {}, timeout=90)
            assert written > 0
            assert got == list(range(5_000))
            assert me.peer("ring-pure-sub").received() == list(range(5_000))
    finally:
        localnet.unsubscribe(on_tick)


def test_the_c_ring_write_refuses_what_is_not_a_ring_state() -> None:
    from localnet import _lanes
    if _lanes.c_ring_fan_out is None:
        pytest.skip("localnet._speedups is not built")
    ring = _ring.EventRing(4096)
    try:
        with pytest.raises(TypeError, match="state list"):
            _lanes.c_ring_fan_out([0] * 5, ring.map, (), "e", b"x")
        with pytest.raises(TypeError, match="bytes"):
            _lanes.c_ring_fan_out(ring.state, ring.map, (), "e", "not bytes")
        lanes = ([[], 10, False],)
        with pytest.raises(ValueError, match="smaller"):
            _lanes.c_ring_fan_out([0, 0, 0, 0, 4096, 10**6], ring.map, lanes, "e", b"x")
        assert _lanes.c_ring_fan_out(ring.state, ring.map, lanes, "e", b"x" * 5000) is False
        # no lane with room: nothing is written, and every lane goes the locked way
        full = ([[1, 2], 2, False], [[], 0, True])
        assert _lanes.c_ring_fan_out(ring.state, ring.map, full, "e", b"x") == ([], [0, 1])
        assert ring.state[:3] == [0, 0, 0] and full[0][0] == [1, 2] and full[1][0] == []
    finally:
        ring.close()


@pytest.mark.parametrize("use_c", [True, False])
def test_a_run_goes_through_the_ring_only_when_it_holds_ring_entries_only(
        monkeypatch: pytest.MonkeyPatch, use_c: bool) -> None:
    from localnet import _lanes
    if use_c and _lanes.c_ring_run is None:
        pytest.skip("localnet._speedups is not built")
    if not use_c:
        monkeypatch.setattr(_ring, "c_ring_run", None)
    a, b, c = ("e", b"a", 0, 7), ("e", b"b", 1, 8), ("e", b"c", 2, 9)
    assert _ring.is_ring_run([a, b, c])
    assert _ring.is_ring_run([b])
    assert not _ring.is_ring_run([a, c])  # 8 went elsewhere: the bytes between are not ours
    assert not _ring.is_ring_run([a, ("e", b"plain"), c])  # same count, but one is plain
    assert not _ring.is_ring_run([("e", b"plain"), b, c])
    assert not _ring.is_ring_run([])


ONLY_TICKS = """
got = []

@localnet.subscribe("ring_tick")
def on_tick(i, pad=b""):
    got.append(i)

@localnet.connect()
def received():
    return got

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_two_events_through_one_ring_to_subscribers_of_one_or_both(
        spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both subscribers of ring_tick read it from the ring; the ring also holds
    # ring_mixed, which only one of them takes, so the other's runs have gaps
    # and go the plain way: each gets exactly its events, in order.
    monkeypatch.setattr(_ring, "RING_BYTES", 16384)
    spawn(SUBSCRIBER, args=["ring-both"])
    spawn(ONLY_TICKS, args=["ring-ticks"])
    spawn(ONLY_TICKS, args=["ring-ticks-2"])
    n = 3_000
    with localnet.Peer(name="ring-pub") as peer:
        for i in range(n):
            ring_tick(i)
            ring_mixed(i, i)
        peer.flush(60)
        both = [item if isinstance(item, int) else list(item)
                for item in peer.peer("ring-both").received()]
        assert both == [x for i in range(n) for x in (i, [i, "int"])]
        assert peer.peer("ring-ticks").received() == list(range(n))
        assert peer.peer("ring-ticks-2").received() == list(range(n))
        assert _written(peer) > 0


FORKING_PUBLISHER = """
@localnet.event("ring_tick")
def ring_tick(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def fork_and_publish():
    for i in range(1_000):
        ring_tick(i)
    peer.flush(30)
    pid = os.fork()
    if pid == 0:  # the child: its own peer, its own ring; the parent's left alone
        code = 1
        try:
            assert peer._publisher._ring is None
            with localnet.Peer(name="ring-child") as child:
                for i in range(1_000, 2_000):
                    ring_tick(i)
                child.flush(30)
                code = 0 if child._publisher._ring is not None else 2
        finally:
            os._exit(code)
    for i in range(2_000, 3_000):
        ring_tick(i)
    peer.flush(30)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

peer = localnet.Peer(name="ring-forker").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_a_publisher_that_forks_keeps_its_ring_and_the_child_makes_its_own(spawn) -> None:
    for name in ("ring-fork-0", "ring-fork-1"):
        spawn(SUBSCRIBER, args=[name])
    spawn(FORKING_PUBLISHER)
    with localnet.Peer(name="ring-driver") as me:
        assert me.call("ring-forker", "fork_and_publish", (), {}, timeout=90) == 0
        for name in ("ring-fork-0", "ring-fork-1"):
            got = me.peer(name).received()
            parent = [i for i in got if not 1_000 <= i < 2_000]
            child = [i for i in got if 1_000 <= i < 2_000]
            assert parent == list(range(1_000)) + list(range(2_000, 3_000))
            assert child == list(range(1_000, 2_000))


def test_the_c_ring_frames_are_the_python_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from localnet import _lanes
    if _lanes.c_ring_frames is None:
        pytest.skip("localnet._speedups is not built")
    ring = _ring.EventRing(4096)
    try:
        # items of 10..49 bytes: frames split at 256 events and at each lap's end
        entries, pos = [], 0
        for i in range(1_500):
            item = b"x" * (10 + i % 40)
            if pos % 4096 + len(item) > 4096:
                pos += 4096 - pos % 4096
            entries.append(("e", item, pos, i + 1))
            pos += len(item)
        fd = ring.dup()
        cases = [(entries, 7, None, 0, None), (entries, 7, fd, 100, 1_200),
                 (entries, 1, None, 1_499, 1_500)]
        made = [ring.chunks(*case) for case in cases]
        monkeypatch.setattr(_ring, "c_ring_frames", None)
        assert made == [ring.chunks(*case) for case in cases]
        assert made[1][0][1] == [fd] and len(made[1][0][0]) == 33  # the descriptor: first frame
        os.close(fd)
        with pytest.raises(TypeError, match="ring entry"):
            _lanes.c_ring_frames([("e", "not bytes", 0, 1)], 0, 1, 4096, 1, 0, 256, 65536,
                                 (1, 5), 0x52)
        with pytest.raises(ValueError, match="range"):
            _lanes.c_ring_frames(entries, 5, 5, 4096, 1, 0, 256, 65536, (1, 5), 0x52)
    finally:
        ring.close()
