"""Subscribers that take the same events share one lane: the event group.

A trigger appends an event once to its group's log whatever the number of
subscribers (localnet._routes); the courier moves the log into each
member's queue.  These tests check the group itself (the C fan-out on its
lane, moving, cutting, room, spilling, closing), then real subscriber
processes: every event reaches every member in order through the log, a
stopped member spills the log and drops only its own events, a member that
leaves closes its group and the remaining ones get a new one, and
subscribers of different events get groups of their own.
"""

from __future__ import annotations

import signal
import threading

import pytest
from helpers import wait_stopped, wait_until

import localnet
from localnet import _lanes, _ring, _routes

pytestmark = [
    pytest.mark.skipif(not _ring.available(), reason="no memfd shared memory here"),
    pytest.mark.skipif(_lanes.c_ring_fan_out is None, reason="localnet._speedups is not built"),
]

SUBSCRIBER = """
import os, time
got = []
DELAY = float(os.environ.get("DELAY", "0"))  # seconds a handler takes

def on(event):
    @localnet.subscribe(event)
    def handler(i):
        if DELAY:
            time.sleep(DELAY)
        got.append((event, i))

for event in sys.argv[2].split(","):
    on(event)

@localnet.connect()
def received():
    return got

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.event("group_a")
def group_a(*args, **kwargs):
    return args, kwargs


@localnet.event("group_b")
def group_b(*args, **kwargs):
    return args, kwargs


class _Member:
    """What a group reads of an outbox: its lane [queue, room, idle], its courier."""

    def __init__(self, room: int) -> None:
        self.lane = [[], room, False]
        self.courier = None

    def virtual_in(self, group: object) -> int:
        return 0  # (its lane's room does not count them here)


class _Waiter(_Member):
    """A member a trigger would wait for (``Outbox.would_wait``), up to ``block`` seconds."""

    def __init__(self, room: int, block: float) -> None:
        super().__init__(room)
        self.block = block
        self.congested = False

    def would_wait(self) -> bool:
        return not self.congested

    def congest(self) -> None:
        self.congested = True


def _full_group(block: float) -> tuple[_ring.EventRing, list[_Waiter], _routes.EventGroup]:
    """A group of two members with room for 2, whose log holds 2 entries: the first member
    took and acknowledged them, the second did not."""
    ring = _ring.EventRing(4096)
    members = [_Waiter(2, block), _Waiter(2, block)]
    group = _routes.EventGroup(members)  # type: ignore[arg-type]
    for i in range(2):
        _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"item%d" % i)
    group.move(members[0])
    members[0].lane[0].clear()  # (acknowledged)
    assert _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"x") == ([], [0])
    return ring, members, group


def _waiting(group: _routes.EventGroup) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(group.wait_for_room()))
    thread.start()
    wait_until(lambda: group._waiting == 1, timeout=10)
    return thread, result


def test_a_trigger_waits_for_the_room_of_a_full_group_until_its_members_take_the_log() -> None:
    ring, members, group = _full_group(block=30.0)
    try:
        thread, result = _waiting(group)
        group.move(members[1])  # the second member takes the log (the entries are cut) ...
        members[1].lane[0].clear()  # ... and acknowledges them
        group.refresh()
        thread.join(10)
        assert result == [True] and not thread.is_alive()
        assert group.log == [] and group.lane[1] == 2
        assert not any(member.congested for member in members)
    finally:
        ring.close()


def test_a_trigger_waiting_on_a_group_that_closes_goes_the_members_own_ways() -> None:
    ring, members, group = _full_group(block=30.0)
    try:
        thread, result = _waiting(group)
        group.close()  # (the routes changed)
        thread.join(10)
        assert result == [False] and not thread.is_alive()
        assert not any(member.congested for member in members)  # nobody drops for it
    finally:
        ring.close()


def test_a_wait_in_vain_makes_only_the_members_the_log_fills_drop_their_events() -> None:
    ring, members, group = _full_group(block=0.05)
    try:
        assert group.wait_for_room() is False
        assert [member.congested for member in members] == [False, True]
        assert group.wait_for_room() is False  # a member drops: no trigger waits any more
    finally:
        ring.close()


def _span(log: list, low: int, high: int) -> tuple[int, int]:
    return low, high


def _queue(member: _Member) -> list[int]:
    return [entry[3] for entry in member.lane[0]]


def test_the_group_takes_an_entry_once_and_moves_it_to_each_member() -> None:
    ring = _ring.EventRing(4096)
    members = [_Member(10), _Member(6), _Member(10)]
    group = _routes.EventGroup(members)  # type: ignore[arg-type]
    try:
        assert group.lane[1] == 6  # the least room of its members
        for i in range(4):
            rest = _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"item%d" % i)
            assert rest is None  # (no courier idle)
        assert [entry[3] for entry in group.log] == [1, 2, 3, 4]
        assert all(member.lane[0] == [] for member in members)  # nothing per member yet
        assert group.ring_hold() == 0

        moved = group.move(members[0])
        assert [entry[3] for entry in moved] == [1, 2, 3, 4] and _queue(members[0]) == [1, 2, 3, 4]
        assert group.move(members[0]) is None and not group.behind(members[0])
        assert group.behind(members[1])
        group.move(members[1])
        assert len(group.log) == 4  # members[2] has not taken them: they stay
        group.move(members[2])
        assert group.log == [] and group.ring_hold() is None  # every member has them: cut
        # the room now counts what the members' queues hold: 6 - 4 for members[1]
        assert group.lane[1] == 2
        for _ in range(2):
            _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"more")
        # no room: nothing is written, and the trigger goes the locked way
        head = ring.state[0]
        assert _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"x") == ([], [0])
        assert ring.state[0] == head and len(group.log) == 2

        group.spill()
        assert [_queue(member) for member in members] == [[1, 2, 3, 4, 5, 6]] * 3
        members[1].lane[0].clear()  # (acknowledged)
        group.refresh()
        assert group.lane[1] == 4  # members[0] and [2]: 10 - 6
        assert group.log == []  # (cut: every member has them)
    finally:
        ring.close()


def test_a_member_with_an_empty_queue_is_sent_the_log_itself_until_it_acknowledges() -> None:
    ring = _ring.EventRing(4096)
    members = [_Member(10), _Member(10)]
    group = _routes.EventGroup(members)  # type: ignore[arg-type]
    try:
        for i in range(3):
            _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"item%d" % i)
        assert group.take(members[0], _span) == (3, (0, 3))  # its virtual events: log[0:3]
        assert members[0].lane[0] == [] and not group.behind(members[0])
        assert group.take(members[0], _span) is None  # nothing new
        assert group.take(members[1], _span) == (3, (0, 3))
        _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"item3")
        assert group.take(members[0], _span) == (1, (3, 4))  # more of them
        assert [entry[3] for entry in group.entries(members[0], 4)] == [1, 2, 3, 4]

        group.release(members[0], 2, 2)  # two acknowledged, two left
        assert len(group.log) == 4  # members[1] still holds them all
        group.release(members[1], 3, 0)
        assert [entry[3] for entry in group.log] == [3, 4]  # members[0] holds 3 and 4
        assert [entry[3] for entry in group.entries(members[0], 2)] == [3, 4]
        assert group.ring_hold() == group.log[0][2]

        # an entry in the queue first: the log is moved behind it, never sent around it
        members[1].lane[0].append(("e", b"own", 0, 99))
        assert group.take(members[1], _span) is None
        assert [entry[3] for entry in group.move(members[1])] == [4]

        group.close()  # sealed: takes nothing more, but keeps what members[0] holds
        assert group.sealed and not group.closed and group.lane[1] == 0
        assert _lanes.c_ring_fan_out(ring.state, ring.map, (group.lane,), "e", b"x") == ([], [0])
        group.refresh()
        assert group.lane[1] == 0  # sealed for good
        group.release(members[0], 2, 0)
        assert group.log == [] and group.closed
    finally:
        ring.close()


def _group_of(peer: localnet.Peer, event: str) -> _routes.EventGroup | None:
    route = peer._publisher._routes.get(event)
    return None if route is None else route.group


def _open_group(peer: localnet.Peer) -> _routes.EventGroup:
    """Trigger group_a(-1) and wait until it is handled (every channel open): the group."""
    group_a(-1)
    peer.flush(20)
    group = _group_of(peer, "group_a")
    assert group is not None
    return group


def _received(peer: localnet.Peer, name: str, event: str) -> list[int]:
    return [i for got_event, i in peer.peer(name).received() if got_event == event]


def test_subscribers_of_the_same_events_get_every_event_in_order_through_one_log(
        spawn) -> None:
    names = [f"group-sub-{i}" for i in range(3)]
    for name in names:
        spawn(SUBSCRIBER, args=[name, "group_a,group_b"])
    n = 6_000
    with localnet.Peer(name="group-pub") as peer:
        for i in range(n):
            (group_a if i % 3 else group_b)(i)
        peer.flush(60)
        group = _group_of(peer, "group_a")
        assert group is not None and _group_of(peer, "group_b") is group
        assert peer._publisher._routes["group_a"].lanes == (group.lane,)
        outboxes = list(peer._publisher._outboxes.values())
        assert sorted(outbox.name for outbox in group.members) == names
        assert all(outbox.group is group for outbox in outboxes)
        # every event went through the log (moved to each member from it), once each
        assert sorted(group._moved.values()) == [n, n, n]
        assert group.log == [] and all(not outbox._queue for outbox in outboxes)
        for name in names:
            assert _received(peer, name, "group_a") == [i for i in range(n) if i % 3]
            assert _received(peer, name, "group_b") == list(range(0, n, 3))
        stats = peer.stats()
        rows = {name: (row.sent, row.delivered, row.dropped, row.failed)
                for name, row in {**stats.published, **stats.subscribers}.items()}
        a, b = n - n // 3, n // 3
        assert rows == {"group_a": (3 * a, 3 * a, 0, 0), "group_b": (3 * b, 3 * b, 0, 0),
                        **{name: (n, n, 0, 0) for name in names}}


def test_a_stopped_member_spills_the_log_and_only_its_own_events_are_dropped(spawn) -> None:
    running = [spawn(SUBSCRIBER, args=[f"group-run-{i}", "group_a"]) for i in range(2)]
    stopped = spawn(SUBSCRIBER, args=["group-stopped", "group_a"])
    n = 3_000
    # (the running ones wait for room; the stopped one makes the trigger wait once)
    with localnet.Peer(name="group-pub", event_queue=500, event_block=1.0) as peer:
        group = _open_group(peer)
        stopped.signal(signal.SIGSTOP)
        try:
            for i in range(n):
                group_a(i)
            for name in ("group-run-0", "group-run-1"):
                wait_until(lambda name=name: len(_received(peer, name, "group_a")) == n + 1,
                           timeout=30)
                assert _received(peer, name, "group_a") == list(range(-1, n))
            row = peer.stats().subscribers["group-stopped"]
            assert row.dropped > 0 and row.sent + row.dropped == n + 1
        finally:
            stopped.signal(signal.SIGCONT)
        peer.flush(30)
        got = _received(peer, "group-stopped", "group_a")
        assert got == sorted(got) and len(got) == row.sent and got[:1] == [-1]
        # caught up: the group takes the events again, and they reach everyone
        before = dict(group._moved)
        for i in range(n, n + 100):
            group_a(i)
        peer.flush(30)
        assert _group_of(peer, "group_a") is group and not group.closed
        assert all(group._moved[outbox] > before[outbox] for outbox in group.members)
        for name in ("group-run-0", "group-run-1", "group-stopped"):
            assert _received(peer, name, "group_a")[-100:] == list(range(n, n + 100))
        rows = peer.stats().subscribers
        assert rows["group-run-0"].delivered == rows["group-run-1"].delivered == n + 101
        assert rows["group-stopped"].delivered == rows["group-stopped"].sent
        assert rows["group-stopped"].sent + rows["group-stopped"].dropped == n + 101
    assert [child.stop() for child in (*running, stopped)] == [0, 0, 0]


def test_slow_members_make_the_trigger_wait_for_the_log_which_takes_every_event(
        spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    spills: list[_routes.EventGroup] = []
    spill = _routes.EventGroup.spill

    def counted(group: _routes.EventGroup) -> None:
        spills.append(group)
        spill(group)

    monkeypatch.setattr(_routes.EventGroup, "spill", counted)
    names = [f"group-slow-{i}" for i in range(2)]
    subs = [spawn(SUBSCRIBER, args=[name, "group_a"], DELAY="0.0005") for name in names]
    n = 400
    # (a queue of 50 a subscriber: the trigger waits for room again and again)
    with localnet.Peer(name="group-pub", event_queue=50, event_block=10.0) as peer:
        group = _open_group(peer)
        for i in range(n):
            group_a(i)
        peer.flush(30)
        assert _group_of(peer, "group_a") is group and not group.sealed
        for name in names:
            assert _received(peer, name, "group_a") == list(range(-1, n))
        rows = peer.stats().subscribers
        assert [(rows[name].delivered, rows[name].dropped) for name in names] == [(n + 1, 0)] * 2
    assert spills == []  # the members' queues never took the log: it waited, then took them
    assert [child.stop() for child in subs] == [0, 0]


def test_a_member_that_leaves_closes_its_group_and_the_others_get_a_new_one(spawn) -> None:
    staying = [spawn(SUBSCRIBER, args=[f"group-stay-{i}", "group_a"]) for i in range(2)]
    leaving = spawn(SUBSCRIBER, args=["group-leave", "group_a"])
    n = 2_000
    with localnet.Peer(name="group-pub") as peer:
        for i in range(n):
            group_a(i)
        first = _group_of(peer, "group_a")
        assert first is not None and len(first.members) == 3
        assert leaving.stop() == 0  # it leaves while its events may still be in flight
        wait_until(lambda: "group-leave" not in peer.subscribers("group_a"), timeout=30)
        for i in range(n, 2 * n):
            group_a(i)
        peer.flush(60)
        second = _group_of(peer, "group_a")
        assert first.closed and second is not None and second is not first
        assert sorted(outbox.name for outbox in second.members) == ["group-stay-0", "group-stay-1"]
        for name in ("group-stay-0", "group-stay-1"):
            assert _received(peer, name, "group_a") == list(range(2 * n))
        row = peer.stats().subscribers["group-leave"]
        assert row.sent == row.delivered + row.failed and row.sent <= 2 * n and row.dropped == 0
    assert [child.stop() for child in staying] == [0, 0]


def test_subscribers_of_other_events_get_groups_of_their_own_or_none(spawn) -> None:
    for name, events in (("group-a-0", "group_a"), ("group-a-1", "group_a"),
                         ("group-b-0", "group_b"), ("group-b-1", "group_b")):
        spawn(SUBSCRIBER, args=[name, events])
    both = spawn(SUBSCRIBER, args=["group-both", "group_a,group_b"])
    n = 2_000
    with localnet.Peer(name="group-pub") as peer:
        for i in range(n):
            group_a(i)
            group_b(i)
        peer.flush(60)
        # group-both takes both events, the others one each: no route's outboxes
        # take the same events, so neither route has a group
        assert _group_of(peer, "group_a") is None and _group_of(peer, "group_b") is None
        assert [tuple(pair) for pair in peer.peer("group-both").received()] == \
            [(event, i) for i in range(n) for event in ("group_a", "group_b")]
        assert both.stop() == 0
        wait_until(lambda: "group-both" not in peer.subscribers(), timeout=30)
        for i in range(n, 2 * n):
            group_a(i)
            group_b(i)
        peer.flush(60)
        a, b = _group_of(peer, "group_a"), _group_of(peer, "group_b")
        assert a is not None and b is not None and a is not b
        assert sorted(outbox.name for outbox in a.members) == ["group-a-0", "group-a-1"]
        assert sorted(outbox.name for outbox in b.members) == ["group-b-0", "group-b-1"]
        for name in ("group-a-0", "group-a-1"):
            assert [tuple(pair) for pair in peer.peer(name).received()] == \
                [("group_a", i) for i in range(2 * n)]
        for name in ("group-b-0", "group-b-1"):
            assert [tuple(pair) for pair in peer.peer(name).received()] == \
                [("group_b", i) for i in range(2 * n)]


def test_a_member_killed_while_it_holds_events_sent_from_the_log_fails_them_alone(
        spawn) -> None:
    running = [spawn(SUBSCRIBER, args=[f"group-live-{i}", "group_a"]) for i in range(2)]
    doomed = spawn(SUBSCRIBER, args=["group-doomed", "group_a"])
    n = 2_000
    with localnet.Peer(name="group-pub") as peer:
        group_a(-1)
        peer.flush(20)
        group = _group_of(peer, "group_a")
        assert group is not None
        doomed.signal(signal.SIGSTOP)
        wait_stopped(doomed.pid)
        for i in range(n):
            group_a(i)
        outbox = next(box for box in group.members if box.name == "group-doomed")
        # the courier sends it its events straight from the log: they wait there for it
        wait_until(lambda: outbox._virtual > 0, timeout=30)
        assert group.log and group.ring_hold() is not None
        doomed.kill9()
        wait_until(lambda: "group-doomed" not in peer.subscribers("group_a"), timeout=30)
        peer.flush(30)
        for name in ("group-live-0", "group-live-1"):
            assert _received(peer, name, "group_a") == list(range(-1, n))
        row = peer.stats().subscribers["group-doomed"]
        assert row.sent == n + 1 and row.delivered == 1 and row.failed == n and row.dropped == 0
        # the group it was in let go of its log; the others have a group of their own
        assert group.sealed and group.log == [] and group.closed
        second = _group_of(peer, "group_a")
        assert second is not None and second is not group
        for i in range(n, n + 100):
            group_a(i)
        peer.flush(30)
        for name in ("group-live-0", "group-live-1"):
            assert _received(peer, name, "group_a")[-100:] == list(range(n, n + 100))
    assert [child.stop() for child in running] == [0, 0]


FAILING = """
got = []

@localnet.subscribe("group_a")
def handler(i):
    if i % 10 == 3:
        raise ValueError(i)
    got.append(i)

@localnet.subscribe("group_b")
def other(i):
    got.append(-i)

@localnet.connect()
def received():
    return got

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_failed_handlers_are_counted_per_event_for_events_sent_from_the_log(spawn) -> None:
    names = ["group-fail-0", "group-fail-1"]
    for name in names:
        spawn(FAILING, args=[name])
    n = 1_000
    with localnet.Peer(name="group-pub") as peer:
        for i in range(n):
            group_a(i)
            if i % 4 == 0:
                group_b(i)
        peer.flush(30)
        assert _group_of(peer, "group_a") is not None
        failing = len([i for i in range(n) if i % 10 == 3])
        stats = peer.stats()
        assert (stats.published["group_a"].delivered, stats.published["group_a"].failed) == \
            (2 * (n - failing), 2 * failing)
        assert (stats.published["group_b"].delivered, stats.published["group_b"].failed) == \
            (2 * (n // 4), 0)
        for name in names:
            row = stats.subscribers[name]
            assert (row.sent, row.delivered, row.failed) == \
                (n + n // 4, n + n // 4 - failing, failing)
