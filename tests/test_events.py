"""Events and subscriptions: contract, filters, no missed peers, delivery, isolation."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import textwrap
import threading

import pytest
from helpers import raw_channel, wait_until

import localnet

PUBLISHER = """
import sys
NAME = sys.argv[1]
GROUP = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
HUB = len(sys.argv) > 3 and sys.argv[3] == "hub"

@localnet.event("tick")
def tick(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def fire(count, start=0, flush=True):
    for i in range(start, start + count):
        tick(i, source=NAME)
    if flush:
        peer.flush(20)
    return True

@localnet.connect()
def stats():
    import dataclasses
    return dataclasses.asdict(peer.stats())

@localnet.connect()
def outboxes():
    return peer.subscribers()

peer = localnet.Peer(name=NAME, group=GROUP, hub=HUB,
                     event_queue=int(os.environ.get("QUEUE", "10000")),
                     event_block=float(os.environ.get("BLOCK", "1.0")))
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

SUBSCRIBER = """
import sys, threading
NAME = sys.argv[1]
FILTER = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
got = []
lock = threading.Lock()

@localnet.subscribe("tick", **FILTER)
def on_tick(i, source=None):
    with lock:
        got.append((source, i))
    if os.environ.get("ECHO"):
        say("TICK", source, i)
    if os.environ.get("FAIL_ON") and i == int(os.environ["FAIL_ON"]):
        raise RuntimeError(f"handler refuses {i}")

@localnet.connect()
def received():
    with lock:
        return list(got)

@localnet.connect()
def stats():
    import dataclasses
    return dataclasses.asdict(peer.stats())

peer = localnet.Peer(name=NAME)
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def publisher(spawn, name: str = "pub", group: str | None = None, hub: bool = False, **env):
    return spawn(PUBLISHER, args=[name, group or "-", "hub" if hub else "no"], **env)


def subscriber(spawn, name: str, **filters):
    return spawn(SUBSCRIBER, args=[name, json.dumps(filters)])


def burst_publisher(spawn, events: list[str], fire: str, preamble: str = "") -> None:
    """Start a publisher "pub" with the ``events`` and ``burst(count)``, which
    runs ``fire`` (Python lines, with ``i``) for each i < count, then flushes."""
    script = preamble + "".join(f"""
@localnet.event({name!r})
def {name}(*args, **kwargs):
    return args, kwargs
""" for name in events) + """
@localnet.connect()
def burst(count):
    for i in range(count):
""" + textwrap.indent(textwrap.dedent(fire).strip(), " " * 8) + """
    peer.flush(20)
    return count

peer = localnet.Peer(name="pub")
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""
    spawn(script)


def received(name: str) -> list[tuple[str, int]]:
    return [tuple(x) for x in localnet.peer(name).received()]


# -- the @event contract ---------------------------------------------------------

def test_event_returns_its_args_and_kwargs() -> None:
    @localnet.event("cleaned")
    def cleaned(frame, path=None):
        return (int(frame),), {"path": str(path)}

    with localnet.Peer(name="solo"):
        assert cleaned("7", path=3) == ((7,), {"path": "3"})


def test_event_with_a_bad_return_value_is_a_type_error() -> None:
    @localnet.event("broken")
    def broken_event(x):
        return x

    with localnet.Peer(name="solo"), \
            pytest.raises(TypeError, match="'test_event_with_a_bad_return_value_is_a_type_error"
                                           ".<locals>.broken_event' must return"):
        broken_event(1)


def test_unpicklable_event_argument_fails_at_the_trigger_and_sends_nothing(spawn) -> None:
    subscriber(spawn, "sub")

    @localnet.event("tick")
    def tick(*args, **kwargs):
        return args, kwargs

    with localnet.Peer(name="pub") as me:
        with pytest.raises(localnet.SerializationError, match="event 'tick'"):
            tick(1, source=threading.Lock())
        tick(2, source="ok")
        me.flush(10)
        assert received("sub") == [("ok", 2)]
        assert me.stats().published["tick"].sent == 1


# -- no missed peers ---------------------------------------------------------------

def test_subscriber_before_publisher_gets_the_first_event(spawn) -> None:
    subscriber(spawn, "early")
    # the publisher triggers right after its start returns
    pub = spawn("""
        @localnet.event("tick")
        def tick(*a, **k): return a, k
        with localnet.Peer(name="late-pub") as peer:
            tick(0, source="late-pub")
            peer.flush(10)
            say("READY")
            sys.stdin.readline()
    """)
    with localnet.Peer(name="observer"):
        assert received("early") == [("late-pub", 0)]
    pub.send("bye")
    assert pub.wait_exit() == 0


def test_subscribe_returns_only_when_publishers_know(spawn) -> None:
    for name in ("pub-a", "pub-b", "pub-c"):
        publisher(spawn, name)
    child = spawn("""
        peer = localnet.Peer(name="late-sub").start()
        for round in range(20):
            got = []

            def on_tick(i, source=None, got=got):
                got.append((source, i))

            localnet.subscribe("tick")(on_tick)
            # no pause: each publisher must already route to us
            for name in ("pub-a", "pub-b", "pub-c"):
                localnet.peer(name).fire(1, start=round)
            localnet.unsubscribe(on_tick)
            say("GOT", json.dumps(sorted(got)))
        say("READY")
        localnet.serve_forever(peer)
    """, ready=None)
    for round in range(20):
        assert json.loads(child.expect("GOT")[4:]) == [
            ["pub-a", round], ["pub-b", round], ["pub-c", round]]


# -- filters -----------------------------------------------------------------------

def test_filters_select_publishers_by_name_group_and_hub(spawn) -> None:
    publisher(spawn, "p-plain")
    publisher(spawn, "p-render", group="render")
    publisher(spawn, "p-hub", hub=True)
    subscriber(spawn, "all")
    subscriber(spawn, "by-name", peers=["p-plain", "p-hub"])
    subscriber(spawn, "by-group", group="render")
    subscriber(spawn, "hubs", hubs_only=True)
    with localnet.Peer(name="driver"):
        for name in ("p-plain", "p-render", "p-hub"):
            localnet.peer(name).fire(1)
        sources = {name: sorted(s for s, _ in received(name))
                   for name in ("all", "by-name", "by-group", "hubs")}
    assert sources == {
        "all": ["p-hub", "p-plain", "p-render"],
        "by-name": ["p-hub", "p-plain"],
        "by-group": ["p-render"],
        "hubs": ["p-hub"],
    }


def test_subscribe_accepts_remote_peers_and_validates_filters(spawn) -> None:
    publisher(spawn, "pub")
    got: list[int] = []
    with localnet.Peer(name="me") as me:
        pub = localnet.peer("pub")

        @localnet.subscribe("tick", peers=pub)
        def on_tick(i, source=None):
            got.append(i)

        try:
            pub.fire(2)
            assert got == [0, 1]
            assert me.stats().received["tick"].handled == 2
        finally:
            assert localnet.unsubscribe(on_tick) == 1
        with pytest.raises(localnet.ConfigurationError):
            localnet.subscribe("tick", peers=[3])
        with pytest.raises(localnet.ConfigurationError):
            localnet.subscribe("", group="g")


def test_unsubscribe_stops_delivery(spawn) -> None:
    publisher(spawn, "pub")
    got: list[int] = []
    with localnet.Peer(name="me"):

        @localnet.subscribe("tick")
        def on_tick(i, source=None):
            got.append(i)

        localnet.peer("pub").fire(2)
        assert localnet.unsubscribe(on_tick, "tick") == 1
        assert localnet.unsubscribe(on_tick) == 0
        localnet.peer("pub").fire(2, start=10)
        assert got == [0, 1]
        assert localnet.peer("pub").outboxes() == []  # the publisher was told


def test_a_handler_that_unsubscribes_itself_is_not_called_again(spawn) -> None:
    # A burst arrives in few batches; the catalog is checked per event, so the
    # rest of the batch no longer reaches the handler, and the other one still runs.
    burst_publisher(spawn, ["tick"], "tick(i)")
    once: list[int] = []
    every: list[int] = []
    with localnet.Peer(name="me") as me:

        @localnet.subscribe("tick")
        def on_first(i):
            once.append(i)
            localnet.unsubscribe(on_first)

        @localnet.subscribe("tick")
        def on_each(i):
            every.append(i)

        try:
            assert localnet.peer("pub").burst(2000) == 2000
        finally:
            localnet.unsubscribe(on_each)
        assert me.stats().received["tick"].handled == 2001
    assert once == [0]
    assert every == list(range(2000))


# -- delivery ----------------------------------------------------------------------

def test_events_arrive_in_order_and_flush_waits_for_handlers(spawn) -> None:
    publisher(spawn, "pub")
    for name in ("s1", "s2", "s3"):
        subscriber(spawn, name)
    with localnet.Peer(name="driver"):
        localnet.peer("pub").fire(2000)  # flushes before returning
        for name in ("s1", "s2", "s3"):
            assert received(name) == [("pub", i) for i in range(2000)]
        stats = localnet.peer("pub").stats()
        assert stats["published"]["tick"] == {"sent": 6000, "delivered": 6000, "dropped": 0,
                                              "failed": 0}
        assert stats["subscribers"]["s2"]["delivered"] == 2000


def test_threads_triggering_at_once_lose_nothing_and_keep_their_order(spawn) -> None:
    # Triggers append to the outboxes without a lock: four threads at once,
    # two subscribers, each thread's events in order, every count consistent.
    burst_publisher(spawn, ["tick"], """
        threads = [threading.Thread(target=lambda t=t: [tick(i, source=f"t{t}")
                                                        for i in range(count)])
                   for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        break
    """)
    for name in ("s1", "s2"):
        subscriber(spawn, name)
    with localnet.Peer(name="driver"):
        # (4 x 2,000 events stay under the 10,000 a subscriber may have queued)
        assert localnet.peer("pub").burst(2000) == 2000
        for name in ("s1", "s2"):
            got = received(name)
            assert len(got) == 8000
            for t in range(4):
                assert [i for source, i in got if source == f"t{t}"] == list(range(2000))
            stats = localnet.peer(name).stats()
            assert stats["received"]["tick"]["handled"] == 8000


def test_trigger_does_not_wait_for_the_subscriber(spawn) -> None:
    slow = spawn(SUBSCRIBER.replace("    with lock:\n        got.append",
                                    "    release.wait(30)\n    with lock:\n        got.append")
                 .replace("got = []", "got = []\nrelease = threading.Event()")
                 .replace("@localnet.connect()\ndef received",
                          "@localnet.connect()\ndef go():\n    release.set()\n\n"
                          "@localnet.connect()\ndef received"), args=["slow"])
    del slow

    @localnet.event("tick")
    def tick(*args, **kwargs):
        return args, kwargs

    with localnet.Peer(name="pub") as me:
        for i in range(5):
            tick(i, source="pub")  # returns although no handler has finished
        assert me.stats().published["tick"].delivered == 0
        with pytest.raises(localnet.Timeout):
            me.flush(0.2)
        localnet.peer("slow").go()
        me.flush(10)
        assert received("slow") == [("pub", i) for i in range(5)]


def test_a_failing_handler_is_counted_and_isolated(spawn) -> None:
    publisher(spawn, "pub")
    spawn(SUBSCRIBER, args=["fragile", "{}"], FAIL_ON="3")
    subscriber(spawn, "sturdy")
    with localnet.Peer(name="driver"):
        localnet.peer("pub").fire(6)
        assert received("sturdy") == [("pub", i) for i in range(6)]
        assert received("fragile") == [("pub", i) for i in range(6)]  # appended before raising
        mine = localnet.peer("fragile").stats()["received"]["tick"]
        assert mine == {"received": 6, "handled": 5, "failed": 1}
        pub = localnet.peer("pub").stats()["published"]["tick"]
        # the publisher counts the event the handler failed on failed, never raises
        assert pub["delivered"] == 11 and pub["failed"] == 1


def test_stopped_subscriber_costs_a_bounded_wait_then_drops(spawn) -> None:
    publisher(spawn, "pub", QUEUE="20", BLOCK="0.2")
    stopped = subscriber(spawn, "stopped")
    subscriber(spawn, "healthy")
    with localnet.Peer(name="driver"):
        pub = localnet.peer("pub")
        pub.fire(5)
        stopped.signal(signal.SIGSTOP)
        try:
            pub.call("fire", 200, start=5, flush=False, timeout=30)
            stats = pub.stats()["subscribers"]["stopped"]
            assert stats["dropped"] > 0
            assert stats["sent"] + stats["dropped"] == 205
        finally:
            stopped.signal(signal.SIGCONT)
        pub.call("fire", 0, timeout=30)  # flush: everything accepted is handled
        stats = pub.stats()["subscribers"]["stopped"]
        got = received("stopped")
        # exactly what was not dropped arrived, in order, without duplicates
        assert len(got) == stats["sent"] == stats["delivered"] == 205 - stats["dropped"]
        assert [i for _, i in got] == sorted({i for _, i in got})
        assert received("healthy") == [("pub", i) for i in range(205)]


# -- liveness ----------------------------------------------------------------------

def test_killed_subscriber_is_pruned_by_the_publisher(spawn) -> None:
    publisher(spawn, "pub")
    victim = subscriber(spawn, "victim")
    subscriber(spawn, "survivor")
    with localnet.Peer(name="driver"):
        pub = localnet.peer("pub")
        pub.fire(3)
        assert pub.outboxes() == ["survivor", "victim"]
        victim.kill9()
        wait_until(lambda: pub.outboxes() == ["survivor"], timeout=5,
                   what="the publisher to prune the dead subscriber")
        pub.fire(3, start=3)
        assert received("survivor") == [("pub", i) for i in range(6)]
        assert "victim" not in [p.name for p in localnet.peers()]


def test_killed_publisher_leaves_subscribers_working(spawn) -> None:
    doomed = publisher(spawn, "doomed")
    publisher(spawn, "steady")
    subscriber(spawn, "sub")
    with localnet.Peer(name="driver"):
        localnet.peer("doomed").fire(2)
        doomed.kill9()
        localnet.peer("steady").fire(2)
        assert sorted(received("sub")) == [("doomed", 0), ("doomed", 1),
                                           ("steady", 0), ("steady", 1)]
        assert [p.name for p in localnet.peers()] == ["steady", "sub"]


def test_liveness_uses_the_process_start_time() -> None:
    from localnet import _liveness

    me = _liveness.create_time()
    assert _liveness.is_alive(os.getpid(), me)
    assert not _liveness.is_alive(os.getpid(), me - 100)  # a reused pid is another process


def test_local_subscription_receives_own_events() -> None:
    got: list[int] = []

    @localnet.subscribe("self-tick")
    def on_self(i):
        got.append(i)

    @localnet.event("self-tick")
    def self_tick(i):
        return (i,), {}

    try:
        with localnet.Peer(name="narcissus") as me:
            for i in range(3):
                self_tick(i)
            me.flush(10)
            assert got == [0, 1, 2]
            assert dataclasses.asdict(me.stats())["received"]["self-tick"]["handled"] == 3
    finally:
        localnet.unsubscribe(on_self)


def test_flush_with_no_subscribers_returns() -> None:
    with localnet.Peer(name="lonely") as me:
        me.flush(1)  # nothing to wait for: no Timeout


STREAMER = PUBLISHER.replace('''peer = localnet.Peer(''', '''streaming = threading.Event()
count = [0]

def _stream():
    while streaming.is_set():
        tick(count[0], source=NAME)
        count[0] += 1

threads = []

@localnet.connect()
def start_stream():
    streaming.set()
    threads.append(threading.Thread(target=_stream, daemon=True))
    threads[-1].start()

@localnet.connect()
def stop_stream():
    streaming.clear()
    threads[-1].join(10)
    return count[0]

peer = localnet.Peer(''').replace("import sys\n", "import sys, threading\n", 1)


def test_registry_killed_while_events_flow(spawn, runtime_dir) -> None:
    from helpers import registry_pid

    pub = spawn(STREAMER, args=["pub", "-", "no"])
    subs = [subscriber(spawn, name) for name in ("s1", "s2")]
    with localnet.Peer(name="driver") as me:
        remote = localnet.peer("pub")
        remote.start_stream()
        wait_until(lambda: len(received("s1")) > 100, what="the stream to flow")
        old = registry_pid(runtime_dir)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        # events keep flowing while there is no registry
        before = len(received("s2"))
        wait_until(lambda: len(received("s2")) > before + 100, what="events without a registry")
        # the peers bring a new registry up and register again, subscriptions included
        wait_until(lambda: registry_pid(runtime_dir) not in (None, old), timeout=5,
                   what="a new registry")
        wait_until(lambda: sorted(p.name for p in localnet.peers()) == ["pub", "s1", "s2"],
                   timeout=5, what="every peer to register again")
        late = subscriber(spawn, "s3")  # a subscription made after the recovery
        wait_until(lambda: len(received("s3")) > 10, what="the new subscriber to get events")
        total = remote.stop_stream()
        remote.fire(0)  # flush
        for name in ("s1", "s2"):
            assert received(name) == [("pub", i) for i in range(total)]
        got = [i for _, i in received("s3")]
        assert got == list(range(got[0], total))
        assert me.stats().registry_recoveries == 1
    for child in [pub, late, *subs]:
        assert not [line for line in child.stderr if "Traceback" in line]


def test_handlers_know_which_publisher_sent_the_event(spawn) -> None:
    publisher(spawn, "pub", group="render", hub=True)
    seen: list[localnet.EventContext | None] = []
    with localnet.Peer(name="me"):

        @localnet.subscribe("tick")
        def on_tick(i, source=None):
            seen.append(localnet.current_event())

        try:
            localnet.peer("pub").fire(1)
        finally:
            localnet.unsubscribe(on_tick)
    assert len(seen) == 1 and seen[0] is not None
    assert (seen[0].event, seen[0].publisher, seen[0].group, seen[0].hub) == \
        ("tick", "pub", "render", True)
    assert localnet.current_event() is None


def test_events_of_several_names_in_one_burst_each_see_their_own_context(spawn) -> None:
    # Fired back to back, the events reach the subscriber in batches that mix
    # both names; each handler must still see its own event in current_event().
    burst_publisher(spawn, ["tick", "tock"], "(tick if i % 2 else tock)(i)")
    seen: list[tuple[str, str, int]] = []
    with localnet.Peer(name="me") as me:

        @localnet.subscribe("tick")
        def on_tick(i):
            seen.append(("tick", localnet.current_event().event, i))

        @localnet.subscribe("tock")
        def on_tock(i, **kwargs):
            seen.append(("tock", localnet.current_event().event, i))

        try:
            assert localnet.peer("pub").burst(2000) == 2000
        finally:
            localnet.unsubscribe(on_tick)
            localnet.unsubscribe(on_tock)
        stats = me.stats()
    assert [i for _, _, i in seen] == list(range(2000))
    assert all(handler == event == ("tick" if i % 2 else "tock") for handler, event, i in seen)
    assert stats.received["tick"].handled == stats.received["tock"].handled == 1000


def test_small_events_travel_in_batches_that_a_small_max_frame_still_accepts(spawn) -> None:
    # Up to EVENT_BATCH bytes of small events share a frame; a subscriber whose
    # max_frame is far smaller still takes them (its limit is per event).
    publisher(spawn, "pub")
    got: list[int] = []
    with localnet.Peer(name="me", max_frame=1024):

        @localnet.subscribe("tick")
        def on_tick(i, source=None):
            got.append(i)

        try:
            assert localnet.peer("pub").fire(3000) is True
        finally:
            localnet.unsubscribe(on_tick)
        stats = localnet.peer("pub").stats()
    assert got == list(range(3000))
    assert stats["published"]["tick"]["delivered"] == 3000


def test_a_broken_event_in_a_batch_loses_only_itself(caplog) -> None:
    from localnet import _wire
    from localnet._wire import FrameReader, Kind

    got: list[object] = []
    with localnet.Peer(name="me") as me:

        @localnet.subscribe("tick")
        def on_tick(i):
            got.append(i)

        try:
            sock = raw_channel(me.address, "events")
            bodies = [pickle.dumps(("tick", (1,), {}), 5),
                      pickle.dumps(42, 5),  # a pickle, but not an event
                      b"\x80\x05garbage",
                      pickle.dumps(("tick", (2,), {}), 5)]
            batch = b"".join(_wire.pack_batch(bodies, 1))
            # a table that promises more bytes than the frame holds: the whole frame goes
            bad_body = b"".join(_wire.pack_batch([pickle.dumps(("tick", (9,), {}), 5)], 5))
            bad_body = bad_body[_wire.HEADER_SIZE:-1]
            bad = _wire.pack_header(Kind.EVENT, 5, len(bad_body)) + bad_body
            # a list frame with a broken item: the whole frame goes
            broken = _wire.ITEMS_HEAD + b"\x80garbage" + _wire.ITEMS_TAIL
            bad += _wire.pack_header(Kind.EVENT, 6, len(broken)) + broken
            good = pickle.dumps(("tick", (3,), {}), 5)
            sock.sendall(batch + bad)
            reader = FrameReader(sock)
            acks = [reader.read(10)[:2]]
            while acks[-1][1] != 6 and len(acks) < 3:  # the frames may be handled apart
                acks.append(reader.read(10)[:2])
            assert acks[-1] == (Kind.ACK, 6)  # the channel carries on
            sock.sendall(_wire.pack_header(Kind.EVENT, 7, len(good)) + good)
            assert reader.read(10)[:2] == (Kind.ACK, 7)
            sock.close()
        finally:
            localnet.unsubscribe(on_tick)
        assert me.stats().received["tick"].handled == 3
    assert got == [1, 2, 3]
    messages = [r.getMessage() for r in caplog.records]
    assert any("malformed event from 'raw'" in m for m in messages)
    assert any("from 'raw' that cannot be rebuilt" in m for m in messages)
    assert any("malformed batch of events from 'raw'" in m for m in messages)
    assert any("batch of events from 'raw' that cannot be rebuilt" in m for m in messages)


def test_batch_frames_carry_each_pickle_whole() -> None:
    from localnet import _wire
    from localnet._wire import Kind

    bodies = [pickle.dumps(("tick", (i, "x" * (i % 50)), {}), 5) for i in range(5000)]
    bodies.insert(10, pickle.dumps(("big", (b"y" * (_wire.EVENT_BATCH + 10),), {}), 5))
    seqs = list(range(1, len(bodies) + 1))
    data = b"".join(_wire.pack_batch(bodies, 1))
    got, ids, offset = [], [], 0
    while offset < len(data):
        _, kind, _, length, ident = _wire.HEADER.unpack_from(data, offset)
        body = data[offset + _wire.HEADER_SIZE: offset + _wire.HEADER_SIZE + length]
        assert kind == Kind.EVENT and (length <= _wire.EVENT_BATCH or body[0] == 0x80)
        if body[0] == _wire.BATCH_MARK:
            first, sizes = _wire.unpack_batch(body)
            for size in sizes:
                got.append(body[first: first + size])
                first += size
        else:
            got.append(body)
        ids.append(ident)
        offset += _wire.HEADER_SIZE + length
    assert got == bodies
    assert ids == sorted(ids) and ids[-1] == seqs[-1] and 3 < len(ids) < 20
    with pytest.raises(ValueError):
        _wire.unpack_batch(b"B\xff\xff\xff\xff")


def test_subscriber_that_leaves_right_after_handling_still_acknowledges(spawn) -> None:
    script = """
        done = threading.Event()

        @localnet.subscribe("x")
        def on_x(*args):
            done.set()

        with localnet.Peer(name="brief"):
            say("READY")
            done.wait(30)
    """
    for _ in range(5):
        sub = spawn(script)
        with localnet.Peer(name="pub") as pub:
            pub.publish("x", (), {})
            pub.flush(10)
            assert pub.stats().published["x"] == localnet.EventCounts(1, 1, 0, 0)
        assert sub.wait_exit() == 0


def test_closing_a_self_subscribed_peer_logs_no_warning(caplog) -> None:
    got: list[int] = []
    localnet.subscribe("echo-self")(got.append)
    try:
        with caplog.at_level("WARNING", logger="localnet"), \
                localnet.Peer(name="self-sub") as me:
            me.publish("echo-self", (1,), {})
            me.flush(10)
        assert got == [1]
        assert not [r for r in caplog.records if r.name.startswith("localnet")]
    finally:
        assert localnet.unsubscribe(got.append) == 1


def test_library_logger_has_a_null_handler() -> None:
    import logging

    assert any(isinstance(h, logging.NullHandler)
               for h in logging.getLogger("localnet").handlers)


def test_close_from_a_handler_ends_serve_forever(spawn) -> None:
    child = spawn("""
        peer = localnet.Peer(name="stoppable")

        @localnet.connect()
        def stop():
            threading.Thread(target=peer.close).start()
            return "stopping"

        localnet.serve_forever(peer, ready=lambda: say("READY"))
        say("RETURNED")
    """)
    with localnet.Peer(name="driver"):
        assert localnet.peer("stoppable").stop() == "stopping"
    child.expect("RETURNED")
    assert child.wait_exit() == 0


def test_batched_events_with_shared_objects_arrive_intact(spawn) -> None:
    # A pickle refers back to an object it holds twice (a memo reference);
    # events packed into one frame must each be rebuilt on their own, never
    # with a reference into the previous event.
    burst_publisher(spawn, ["pair"], """
        text = f"text-{i}-" * 3
        items = [i, text]
        pair(i, text, text, items, items, label=text)
    """)
    wrong: list[int] = []
    seen: list[int] = []
    with localnet.Peer(name="me"):

        @localnet.subscribe("pair")
        def on_pair(i, a, b, items, again, label):
            text = f"text-{i}-" * 3
            seen.append(i)
            if not (a == b == label == text and items == [i, text] and again is items):
                wrong.append(i)

        try:
            assert localnet.peer("pub").burst(3000) == 3000
        finally:
            localnet.unsubscribe(on_pair)
    assert seen == list(range(3000))
    assert wrong == []


def test_items_whole_pickles_and_large_events_keep_their_order(spawn) -> None:
    # Builtin values travel as list items, other values (here a class defined
    # in the publisher's script) as whole cloudpickles, large ones alone:
    # a burst mixing all three must arrive complete and in order.
    burst_publisher(spawn, ["mixed"], """
        if i % 3 == 1:
            mixed(i, Point(i))
        elif i % 100 == 2:
            mixed(i, "z" * 40000)
        else:
            mixed(i, f"v{i}")
    """, preamble="""
class Point:
    def __init__(self, x):
        self.x = x
""")
    got: list[tuple[int, object]] = []
    with localnet.Peer(name="me"):

        @localnet.subscribe("mixed")
        def on_mixed(i, value):
            got.append((i, value.x if hasattr(value, "x") else value))

        try:
            assert localnet.peer("pub").burst(3000) == 3000
        finally:
            localnet.unsubscribe(on_mixed)
    assert [i for i, _ in got] == list(range(3000))
    for i, value in got:
        expected = i if i % 3 == 1 else "z" * 40000 if i % 100 == 2 else f"v{i}"
        assert value == expected, i


def test_item_frames_rebuild_as_lists_of_events() -> None:
    from localnet import _serial, _wire
    from localnet._wire import Kind

    text = "shared" * 5
    events = [("tick", (i, text, text, [i], "x" * (i % 70)), {"k": text}) for i in range(4000)]
    items = [_serial.dumps_event(name, args, kwargs) for name, args, kwargs in events]
    assert all(type(item) is bytes and item[0] != 0x80 for item in items)
    big = _serial.dumps_event("big", ("y" * (_wire.EVENT_BATCH + 10),), {})
    assert type(big) is bytes and big[0] == 0x80  # too large for an item: a whole pickle
    huge = ("big", ("y" * (_wire.EVENT_BATCH + 10),), {})
    lone = b"".join(_wire.pack_items([pickle.dumps(huge, 3)[2:-1]], 7))
    assert _wire.HEADER.unpack_from(lone)[4] == 7
    assert pickle.loads(lone[_wire.HEADER_SIZE:]) == huge  # alone, as a whole pickle
    data = b"".join(_wire.pack_items(items, 1))
    got, offset, frames = [], 0, 0
    while offset < len(data):
        _, kind, _, length, ident = _wire.HEADER.unpack_from(data, offset)
        body = data[offset + _wire.HEADER_SIZE: offset + _wire.HEADER_SIZE + length]
        assert kind == Kind.EVENT and length <= _wire.EVENT_BATCH and body[0] == _wire.ITEMS_MARK
        batch = pickle.loads(body[1:])
        assert 0 < len(batch) <= _wire.ITEMS_PER_FRAME
        got += batch
        assert ident == len(got)
        frames += 1
        offset += _wire.HEADER_SIZE + length
    assert got == events and frames >= len(events) / _wire.ITEMS_PER_FRAME
    # a long run of large items fills frames by bytes before the count does
    wide = [pickle.dumps(("w", ("z" * 1000,), {}), 3)[2:-1] for _ in range(300)]
    sizes = []
    data = b"".join(_wire.pack_items(wide, 1))
    while data:
        length = _wire.HEADER.unpack_from(data)[3]
        sizes.append(len(pickle.loads(data[_wire.HEADER_SIZE + 1: _wire.HEADER_SIZE + length])))
        assert length <= _wire.EVENT_BATCH
        data = data[_wire.HEADER_SIZE + length:]
    assert sum(sizes) == 300 and len(sizes) > 300 // _wire.ITEMS_PER_FRAME + 1
    assert all(args[1] is args[2] for _, args, _ in got)  # shared within an event, as sent
    assert got[0][1][1] is not got[1][1][1]  # and not across events
