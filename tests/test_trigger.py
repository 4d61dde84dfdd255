"""The C trigger (localnet/_trigger.c): a peer's publish() for the common case, its
table of routes, and everything it leaves to Publisher.publish."""

from __future__ import annotations

import os
import shutil
import signal
import sysconfig
from typing import Any

import pytest
from helpers import wait_until
from test_events import SUBSCRIBER, received

import localnet
from localnet import _api, _fastpath, _serial

try:
    from localnet import _speedups, _trigger
except ImportError:
    _speedups = _trigger = None  # type: ignore[assignment]

needs_trigger = pytest.mark.skipif(_trigger is None or _speedups is None,
                                   reason="localnet._trigger is not built")
RUNNING, STOPPED = object(), object()
HAVE_COMPILER = shutil.which(str(sysconfig.get_config_var("CC") or "cc").split()[0]) is not None


def test_the_trigger_is_built_where_a_compiler_is() -> None:
    # setup.py builds it optionally: a silent build failure would only show as lost speed
    if not HAVE_COMPILER:
        pytest.skip("no C compiler here; localnet runs in pure Python")
    assert _trigger is not None and _fastpath.Trigger is not None


class Calls:
    """The Python side a Trigger calls, recording each call."""

    def __init__(self) -> None:
        self.state: Any = RUNNING
        self.slow: list[tuple[Any, ...]] = []
        self.finish: list[tuple[Any, ...]] = []

    def on_slow(self, *args: Any) -> str:
        self.slow.append(args)
        return "slow"

    def on_finish(self, *args: Any) -> str:
        self.finish.append(args)
        return "finished"


def _trigger_of(calls: Calls) -> Any:
    return _trigger.Trigger(calls, RUNNING, calls.on_slow, calls.on_finish,
                            _speedups.encode_item, _speedups.fan_out, _speedups.ring_fan_out,
                            _serial.ITEM_MAX)


@needs_trigger
def test_the_trigger_queues_items_on_the_lanes_of_its_table() -> None:
    calls = Calls()
    trigger = _trigger_of(calls)
    lanes = ([[], 10, False], [[], 10, False])
    trigger.routes = {"ev": ("route", lanes), "nobody": ()}
    assert trigger("ev", (1, "a"), {"k": 2}) is None
    item = _speedups.encode_item("ev", (1, "a"), {"k": 2}, _serial.ITEM_MAX)
    assert [lane[0] for lane in lanes] == [[("ev", item)], [("ev", item)]]
    assert trigger("nobody", (1,), {}) is None  # made, and gone nowhere
    assert calls.slow == [] and calls.finish == []


@needs_trigger
def test_the_trigger_leaves_what_the_fan_out_left_to_finish() -> None:
    calls = Calls()
    trigger = _trigger_of(calls)
    lanes = ([[], 10, True], [[], 0, False])  # the first one's courier idle, no room in the second
    trigger.routes = {"ev": ("route", lanes)}
    assert trigger("ev", (1,), {}) == "finished"
    item = _speedups.encode_item("ev", (1,), {}, _serial.ITEM_MAX)
    assert calls.finish == [("route", "ev", item, ([0], [1]))]
    assert lanes[1][0] == []


@needs_trigger
def test_the_trigger_leaves_the_rest_to_publish() -> None:
    calls = Calls()
    trigger = _trigger_of(calls)
    lanes = ([[], 10, False],)
    trigger.routes = {"ev": ("route", lanes)}
    assert trigger("other", (1,), {}) == "slow"  # not in the table
    assert trigger("ev", ({1, 2},), {}) == "slow"  # not an item of plain values
    assert trigger("ev", ("x" * (_serial.ITEM_MAX + 1),), {}) == "slow"  # too large an item
    calls.state = STOPPED
    assert trigger("ev", (1,), {}) == "slow"  # publish() says what the state means
    assert [args[0] for args in calls.slow] == ["other", "ev", "ev", "ev"]
    assert calls.slow[1] == ("ev", ({1, 2},), {})
    assert lanes[0][0] == []


@needs_trigger
def test_the_trigger_refuses_bad_arguments_and_tables() -> None:
    calls = Calls()
    trigger = _trigger_of(calls)
    with pytest.raises(TypeError, match="event, args and kwargs"):
        trigger("ev", (1,))
    with pytest.raises(TypeError, match="event, args and kwargs"):
        trigger("ev", (1,), {}, kw=1)
    with pytest.raises(TypeError, match="dict"):
        trigger.routes = [("ev", ())]
    trigger.routes = {"ev": ("route",)}
    with pytest.raises(TypeError, match="route, lanes"):
        trigger("ev", (1,), {})
    trigger.routes = {"ev": ("route", ([1, 2],))}
    with pytest.raises(TypeError, match="lane"):
        trigger("ev", (1,), {})


@needs_trigger
def test_a_peer_publishes_through_the_trigger_and_fills_its_table() -> None:
    with localnet.Peer(name="solo") as peer:
        assert isinstance(peer.publish, _trigger.Trigger)
        table = peer._publisher._trigger.routes  # noqa: SLF001
        peer.publish("nobody", (1,), {})
        assert table == {"nobody": ()}
    with pytest.raises(localnet.PeerClosed, match="closed"):
        peer.publish("nobody", (1,), {})  # the state, looked at first


@pytest.mark.skipif(_fastpath.Trigger is None, reason="localnet._trigger is not built")
def test_a_new_subscriber_gets_the_events_after_the_table_knew_the_old_routes(spawn) -> None:
    spawn(SUBSCRIBER, args=["a", "{}"])
    with localnet.Peer(name="pub") as peer:
        publisher = peer._publisher  # noqa: SLF001
        for i in range(3):
            peer.publish("tick", (i,), {"source": "pub"})
        assert "tick" in publisher._trigger.routes  # noqa: SLF001
        peer.flush(20)
        spawn(SUBSCRIBER, args=["b", "{}"])
        wait_until(lambda: sorted(peer.subscribers("tick")) == ["a", "b"], timeout=20)
        assert "tick" not in publisher._trigger.routes  # noqa: SLF001 (replaced)
        for i in range(3, 6):
            peer.publish("tick", (i,), {"source": "pub"})
        assert len(publisher._trigger.routes["tick"]) == 4  # noqa: SLF001 (a ring route)
        peer.flush(20)
        assert received("a") == [("pub", i) for i in range(6)]
        assert received("b") == [("pub", i) for i in range(3, 6)]


@pytest.mark.skipif(_fastpath.Trigger is None, reason="localnet._trigger is not built")
def test_a_stopped_subscriber_costs_the_trigger_a_bounded_wait_then_drops(spawn) -> None:
    sub = spawn(SUBSCRIBER, args=["slow", "{}"])
    with localnet.Peer(name="pub", event_queue=5, event_block=0.05) as peer:
        peer.publish("tick", (0,), {"source": "pub"})
        peer.flush(20)
        os.kill(sub.pid, signal.SIGSTOP)
        try:
            for i in range(1, 20):
                peer.publish("tick", (i,), {"source": "pub"})
        finally:
            os.kill(sub.pid, signal.SIGCONT)
        peer.flush(20)
        got = received("slow")
        stats = peer.stats().published["tick"]
    assert got[0] == ("pub", 0) and got == sorted(got) and len(got) < 20
    assert stats.dropped == 20 - len(got) and stats.delivered == len(got)


# -- calling an event: localnet._trigger.EventCall, and its Python twin ---------------------
class FakePeer:
    def __init__(self, fail: bool = False) -> None:
        self.published: list[tuple[Any, ...]] = []
        self.fail = fail

    def publish(self, *args: Any) -> None:
        if self.fail:
            raise localnet.Timeout("no room")
        self.published.append(args)


class PythonEvent(_api._EventCall):
    """localnet.Event as a build without the extension makes it."""

    __init__ = localnet.Event.__init__
    _check = localnet.Event._check


def _events() -> list[type]:
    return [localnet.Event, PythonEvent] if _trigger is not None else [PythonEvent]


@pytest.mark.parametrize("kind", _events())
def test_calling_an_event_publishes_what_its_function_returns_on_the_current_peer(kind) -> None:
    def tick(*args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    event = kind(tick, "tick")
    peer = FakePeer()
    event._live = [FakePeer(), peer]  # the current one last
    assert event(1, "a", k=2) == ((1, "a"), {"k": 2})
    assert peer.published == [("tick", (1, "a"), {"k": 2})]
    assert event.__name__ == "tick" and event.__wrapped__ is tick


@pytest.mark.parametrize("kind", _events())
def test_an_event_converts_or_refuses_what_its_function_returns(kind) -> None:
    returned: list[Any] = [([1, 2], {"k": 3})]
    event = kind(lambda: returned[0], "tick")
    peer = FakePeer()
    event._live = [peer]
    assert event() == ((1, 2), {"k": 3})  # a list of args: converted
    returned[0] = "neither"
    with pytest.raises(TypeError, match="must return \\(args, kwargs\\)"):
        event()
    assert peer.published == [("tick", (1, 2), {"k": 3})]


@pytest.mark.parametrize("kind", _events())
def test_an_event_without_a_live_peer_asks_for_the_current_one_and_raises_what_fails(kind) -> None:
    def broken() -> Any:
        raise ValueError("the function failed")

    peer, failing = FakePeer(), FakePeer(fail=True)
    event = kind(lambda *a: (a, {}), "tick")
    event._live = []
    event._current_peer = lambda: peer
    assert event(5) == ((5,), {})
    assert peer.published == [("tick", (5,), {})]
    event._live = [failing]
    with pytest.raises(localnet.Timeout, match="no room"):
        event(6)
    event = kind(broken, "tick")
    event._live = [peer]
    with pytest.raises(ValueError, match="the function failed"):
        event()
    assert len(peer.published) == 1


@needs_trigger
def test_an_event_call_without_its_members_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="func, name"):
        _trigger.EventCall()()
