"""The optional C extension (localnet/_speedups.c): the item encoder against the pickler it
stands in for, and the memo guard against pickletools."""

from __future__ import annotations

import enum
import os
import pickle
import pickletools
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import raw_channel
from hypothesis import example, given, settings
from hypothesis import strategies as st

import localnet
from localnet import _serial, _wire

try:
    from localnet import _speedups
except ImportError:
    _speedups = None  # type: ignore[assignment]

HAVE_COMPILER = shutil.which(str(sysconfig.get_config_var("CC") or "cc").split()[0]) is not None
encode_item = _serial.encode_item
needs_encoder = pytest.mark.skipif(encode_item is None, reason="localnet._speedups is not built")
LIMIT = _serial.ITEM_MAX


def test_the_encoder_is_built_where_a_compiler_is() -> None:
    # setup.py builds it optionally: a silent build failure would only show as lost speed
    if not HAVE_COMPILER:
        pytest.skip("no C compiler here; localnet runs in pure Python")
    assert encode_item is not None


def _load(item: bytes) -> Any:
    return pickle.loads(b"\x80\x03" + item + b".")


#: Containers nested this deep in an argument are left to the pickler (MAX_DEPTH
#: in _speedups.c); hypothesis's recursive values reach it now and then.
ENCODER_DEPTH = 8


def _nesting(value: Any) -> int:
    """How many containers deep ``value`` goes (a scalar: 0)."""
    if isinstance(value, (tuple, list)):
        return 1 + max(map(_nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    return 0


#: Lists, dicts and non-empty tuples the encoder tracks per item, to leave a
#: container met twice to the pickler (MAX_SEEN in _speedups.c); past that
#: many it leaves the item to the pickler too.
ENCODER_CONTAINERS = 64


def _containers(value: Any) -> int:
    """How many containers the encoder would track in ``value``."""
    if isinstance(value, (tuple, list)):
        return (1 if value or isinstance(value, list) else 0) + sum(map(_containers, value))
    if isinstance(value, dict):
        return 1 + sum(map(_containers, value.values()))
    return 0


def _shape(value: Any) -> Any:
    """``value`` with every type spelled out, so that 1, 1.0 and True differ."""
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [_shape(v) for v in value]
    if isinstance(value, dict):
        return "dict", [(_shape(k), _shape(v)) for k, v in value.items()]
    if isinstance(value, float) and value != value:
        return "float", "nan"
    return type(value).__name__, value


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=300))
keys = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=10) | st.binary(
    max_size=10)
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=6) | st.lists(inner, max_size=6).map(tuple)
                   | st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


@needs_encoder
@settings(max_examples=400, deadline=None)
@given(name=st.text(max_size=20), args=st.lists(values, max_size=6).map(tuple),
       kwargs=st.dictionaries(st.text(max_size=10), values, max_size=4))
# random examples met this now and then: more containers than the encoder tracks
# (the kwargs dict counts too: 64 here, then 65)
@example(name="", args=([[] for _ in range(62)],), kwargs={})
@example(name="", args=([[] for _ in range(63)],), kwargs={})
def test_items_load_as_the_pickler_would_rebuild_them(name, args, kwargs) -> None:
    item = encode_item(name, args, kwargs, 1 << 20)
    if max(map(_nesting, (*args, *kwargs.values())), default=0) >= ENCODER_DEPTH:
        assert item is None  # deeper than the encoder goes: left to the pickler
        return
    if _containers(kwargs) + sum(map(_containers, args)) > ENCODER_CONTAINERS:
        assert item is None  # more containers than the encoder tracks: left to the pickler
        return
    assert item is not None
    assert _shape(_load(item)) == _shape((name, args, kwargs))
    assert _shape(_load(item)) == _shape(pickle.loads(pickle.dumps((name, args, kwargs), 3)))


@needs_encoder
@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=20), args=st.lists(values, max_size=6).map(tuple),
       kwargs=st.dictionaries(st.text(max_size=10), values, max_size=4))
def test_calls_and_results_load_as_the_pickler_would_rebuild_them(name, args, kwargs) -> None:
    # The whole pickles of a call's triple and of a result: PROTO 3, the item, STOP.
    item = encode_item(name, args, kwargs, 1 << 20)
    call = _serial.encode_call(name, args, kwargs, 1 << 20)  # type: ignore[misc]
    assert call == (None if item is None else b"\x80\x03" + item + b".")
    if call is not None:
        assert _shape(pickle.loads(call)) == _shape((name, args, kwargs))
    for value in (*args, kwargs):
        data = _serial.encode_value(value, 1 << 20)  # type: ignore[misc]
        if _nesting(value) >= ENCODER_DEPTH or _containers(value) > ENCODER_CONTAINERS:
            assert data is None
        else:
            assert data is not None and _shape(pickle.loads(data)) == _shape(value)


@needs_encoder
def test_calls_and_results_over_the_limit_or_not_plain_are_left_to_the_pickler() -> None:
    assert _serial.encode_call("f", (b"x" * 100,), {}, 50) is None  # type: ignore[misc]
    assert _serial.encode_value(b"x" * 100, 50) is None  # type: ignore[misc]
    assert _serial.encode_value({1, 2}, 1000) is None  # type: ignore[misc]
    assert _serial.encode_call("f", ({1},), {}, 1000) is None  # type: ignore[misc]
    assert _serial.encode_call(b"f", (), {}, 1000) is None  # type: ignore[misc]
    # and then the pickler writes them, protocol 5
    assert pickle.loads(_serial.dumps_call("f", ({1},), {}, "an argument of")) == \
        ("f", ({1},), {})


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


@needs_encoder
@pytest.mark.parametrize("value", [
    2**63, -(2**63) - 1,  # beyond 64 bits: the pickler's LONG
    Color.RED, Text("x"),  # subclasses keep their type only through the pickler
    {1, 2}, frozenset({1}), 1j, bytearray(b"x"), memoryview(b"x"), object(),
    "\ud800",  # a lone surrogate
    [[[[[[[[[[1]]]]]]]]]],  # deeper than the encoder goes
    {(1, 2): "tuple key"},
], ids=repr)
def test_values_the_encoder_leaves_to_the_pickler(value) -> None:
    assert encode_item("ev", (value,), {}, LIMIT) is None
    assert encode_item("ev", (), {"k": value}, LIMIT) is None


@needs_encoder
def test_shared_and_recursive_containers_are_left_to_the_pickler() -> None:
    items = [1, 2]
    assert encode_item("ev", (items, items), {}, LIMIT) is None  # pickle keeps them one object
    cycle: list[Any] = []
    cycle.append(cycle)
    assert encode_item("ev", (cycle,), {}, LIMIT) is None
    assert encode_item("ev", ([1, 2], [1, 2]), {}, LIMIT) is not None  # equal, not the same


@needs_encoder
def test_items_over_the_limit_are_left_to_the_pickler() -> None:
    assert encode_item("ev", ("x" * 100,), {}, 64) is None
    assert encode_item("ev", (b"y" * 5000,), {}, 4096) is None
    item = encode_item("ev", (b"y" * 5000,), {}, 8192)
    assert item is not None and _load(item) == ("ev", (b"y" * 5000,), {})


@needs_encoder
def test_bad_arguments() -> None:
    assert encode_item(b"not a str", (), {}, LIMIT) is None
    assert encode_item("ev", [1], {}, LIMIT) is None
    with pytest.raises(TypeError):
        encode_item("ev", (), {})  # type: ignore[call-arg]


@needs_encoder
def test_encoded_and_pickled_items_share_a_list_frame() -> None:
    events = [("a", (i, "x" * i, [i] * 3), {"k": {"n": i}}) for i in range(50)]
    items = []
    for i, (name, args, kwargs) in enumerate(events):
        if i % 2:
            items.append(encode_item(name, args, kwargs, LIMIT))
        else:
            items.append(pickle.dumps((name, args, kwargs), 3)[2:-1])
    data = b"".join(_wire.pack_items(items, 1))
    body = data[_wire.HEADER_SIZE:]
    assert body[0] == _wire.ITEMS_MARK
    assert pickle.loads(body[1:]) == events


def test_events_travel_without_the_encoder(spawn, tmp_path: Path) -> None:
    # Where the extension is not built: the same publisher, pickling every event.
    # (sitecustomize runs before the child's script imports localnet.)
    (tmp_path / "sitecustomize.py").write_text(
        'import sys\nsys.modules["localnet._speedups"] = None  # as if it had not been built\n')
    received: list[tuple[int, str, dict[str, Any]]] = []
    spawn("""
import localnet._serial
assert localnet._serial.encode_item is None

@localnet.event("tick")
def tick(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def burst(count):
    for i in range(count):
        tick(i, "payload", extra={"n": [i]})
    peer.flush(20)
    return count

peer = localnet.Peer(name="pub")
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
""", PYTHONPATH=os.pathsep.join([str(tmp_path), spawn.env()["PYTHONPATH"]]))
    with localnet.Peer(name="me"):

        @localnet.subscribe("tick")
        def on_tick(i, text, extra):
            received.append((i, text, extra))

        try:
            assert localnet.peer("pub").burst(2000) == 2000
        finally:
            localnet.unsubscribe(on_tick)
    assert received == [(i, "payload", {"n": [i]}) for i in range(2000)]


# -- the unpickler's memo guard -----------------------------------------------------

def _largest_put(data: bytes) -> int:
    """The largest explicit memo index in ``data``, read with pickletools."""
    largest = -1
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            largest = max(largest, int(arg))
    return largest


needs_guard = pytest.mark.skipif(_serial._memo_bound is None,
                                 reason="localnet._speedups is not built")


@needs_guard
@settings(max_examples=300, deadline=None)
@given(value=values, protocol=st.integers(0, 5))
def test_memo_bound_reads_the_largest_memo_index_of_real_pickles(value, protocol) -> None:
    data = pickle.dumps([value, value, "text", value], protocol)
    assert _speedups.memo_bound(data) == _largest_put(data)
    assert _speedups.memo_bound(data) < len(data)
    assert _shape(_serial.unpickle(data)) == _shape(pickle.loads(data))


@needs_guard
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_memo_bound_takes_any_bytes(data) -> None:
    assert _speedups.memo_bound(data) >= -1


@needs_guard
@pytest.mark.parametrize("bomb", [
    b"\x80\x03K\x01r\x00\x00\x00\x36.",  # LONG_BINPUT 905,969,664
    b"\x80\x02N" + b"r\xff\xff\xff\x7f" + b".",
    b"I1\np900000000\n.",  # protocol 0 PUT
    b"I1\np" + b"9" * 30 + b"\n.",
    b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00K\x01r\x00\x00\x00\x20.",  # inside a FRAME
], ids=["long_binput", "long_binput_max", "put", "put_long_line", "framed"])
def test_pickles_naming_memo_indices_beyond_their_length_are_refused(bomb) -> None:
    with pytest.raises(ValueError, match="memo index"):
        _serial.unpickle(bomb)
    with pytest.raises(localnet.SerializationError):
        _serial.loads(bomb)


@needs_guard
def test_a_memo_bomb_in_events_or_calls_costs_the_peer_no_memory(caplog) -> None:
    # Unchecked, each of these frames makes the C unpickler allocate and zero
    # about 7 GB; the peer refuses them, answers or logs, and carries on.
    bomb_item = b"K\x01r\x00\x00\x00\x36"  # BININT1 1, LONG_BINPUT 905,969,664
    got: list[int] = []
    with localnet.Peer(name="me") as me:

        @localnet.subscribe("tick")
        def on_tick(i):
            got.append(i)

        try:
            rss = psutil.Process().memory_info().rss
            sock = raw_channel(me.address, "events")
            items = _wire.ITEMS_HEAD + bomb_item + _wire.ITEMS_TAIL
            good = pickle.dumps(("tick", (1,), {}), 5)
            sock.sendall(_wire.pack_header(_wire.Kind.EVENT, 1, len(items)) + items
                         + _wire.pack_header(_wire.Kind.EVENT, 2, len(good)) + good)
            reader = _wire.FrameReader(sock)
            acks = [reader.read(10)[:2]]
            while acks[-1][1] != 2 and len(acks) < 2:
                acks.append(reader.read(10)[:2])
            assert acks[-1] == (_wire.Kind.ACK, 2)
            sock.close()
            call = b"\x80\x03" + bomb_item + b"."
            with raw_channel(me.address, "call") as sock:
                sock.sendall(_wire.pack_header(_wire.Kind.CALL, 5, len(call)) + call)
                assert _wire.FrameReader(sock).read(10)[:2] == (_wire.Kind.ERROR, 5)
            assert psutil.Process().memory_info().rss < rss + 100_000_000
        finally:
            localnet.unsubscribe(on_tick)
        assert got == [1]


# -- the fan-out ---------------------------------------------------------------------

class _Lane:
    """An outbox as fan_out sees it: its lane, wake() and the locked put()."""

    def __init__(self, queue: list[Any], room: int, idle: bool) -> None:
        self.lane = [queue, room, idle]
        self.woken = 0
        self.put_calls: list[tuple[str, bytes]] = []
        self.retiring = False
        self.ring = None

    def wake(self) -> None:
        self.woken += 1

    def put(self, event: str, frame: bytes) -> bool:
        self.put_calls.append((event, frame))
        return False


def _fan_out_both_ways(monkeypatch: pytest.MonkeyPatch, use_c: bool
                       ) -> tuple[list[_Lane], bool]:
    from localnet import _lanes, _routes
    if not use_c:
        monkeypatch.setattr(_lanes, "c_fan_out", None)
    outboxes = [_Lane([], 2, False), _Lane([1, 2], 2, True), _Lane([], 5, True),
                _Lane([], 0, False)]
    outboxes[3].retiring = True  # refused and retiring: the trigger reroutes
    route = _routes.Route(outboxes)  # type: ignore[arg-type]
    moved = _routes.fan_out(route, "ev", b"x")
    return outboxes, moved


@pytest.mark.parametrize("use_c", [True, False])
def test_fan_out_appends_where_there_is_room_wakes_idle_writers_and_locks_the_rest(
        monkeypatch: pytest.MonkeyPatch, use_c: bool) -> None:
    if use_c and (_speedups is None or not hasattr(_speedups, "fan_out")):
        pytest.skip("localnet._speedups is not built")
    outboxes, moved = _fan_out_both_ways(monkeypatch, use_c)
    entry = ("ev", b"x")
    assert [o.lane[0] for o in outboxes] == [[entry], [1, 2], [entry], []]
    assert [o.woken for o in outboxes] == [0, 0, 1, 0]  # took it with its courier idle
    assert [o.put_calls for o in outboxes] == [[], [("ev", b"x")], [], [("ev", b"x")]]
    assert moved is True


@pytest.mark.skipif(_speedups is None, reason="localnet._speedups is not built")
def test_the_c_fan_out_refuses_what_is_not_a_lane() -> None:
    assert _speedups.fan_out(([[], 1, False],), ("ev", b"x")) is None
    with pytest.raises(TypeError, match="lane"):
        _speedups.fan_out(([1, 2],), ("ev", b"x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple"):
        _speedups.fan_out([[[], 1, False]], ("ev", b"x"))  # type: ignore[arg-type]


@pytest.mark.skipif(_speedups is None, reason="localnet._speedups is not built")
def test_the_c_dispatch_runs_a_run_of_one_event_and_stops_where_python_must_look() -> None:
    class Catalog:
        by_event: dict = {}

    catalog = Catalog()
    table = catalog.by_event
    seen: list = []

    def handler(*args, **kwargs):
        seen.append((args, kwargs))
        if args == (3,):
            raise ValueError("three")
        if args == (5,):
            return "five"
        if args == (7,):
            catalog.by_event = {}  # it unsubscribed: the next event goes back to Python
        return None

    items = [("e", (1,), {}), ("e", (2,), {"k": 1}), ("e", (3,), {}), ("e", (4,), {}),
             ("e", (5,), {}), ("e", (6,), {}), ("other", (0,), {}), ("e", (7,), {}),
             ("e", (8,), {}), ["e", (9,), {}]]
    status, index, value = _speedups.dispatch(items, 0, "e", handler, catalog, table)
    assert (status, index, type(value), str(value)) == (2, 2, ValueError, "three")
    assert value.__traceback__ is not None
    assert _speedups.dispatch(items, 3, "e", handler, catalog, table) == (3, 4, "five")
    assert _speedups.dispatch(items, 5, "e", handler, catalog, table) == (1, 6, None)
    assert _speedups.dispatch(items, 7, "e", handler, catalog, table) == (1, 8, None)
    assert _speedups.dispatch(items, 9, "e", handler, catalog, catalog.by_event) == (1, 9, None)
    assert _speedups.dispatch(items, 10, "e", handler, catalog, catalog.by_event) == (0, 10, None)
    assert [args for args, _ in seen] == [(1,), (2,), (3,), (4,), (5,), (6,), (7,)]
    assert seen[1] == ((2,), {"k": 1})

    def interrupted(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _speedups.dispatch([("e", (1,), {})], 0, "e", interrupted, catalog, catalog.by_event)
    with pytest.raises(TypeError, match="list of events"):
        _speedups.dispatch((), 0, "e", handler, catalog, table)
