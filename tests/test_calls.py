"""Remote calls: the three call forms, tags, payloads, errors, concurrency."""

from __future__ import annotations

import datetime
import threading

import pytest

import localnet

SERVER = """
import threading
release = threading.Event()

@localnet.connect()
def echo(x):
    return x

@localnet.connect()
def add(a, b=0):
    return a + b

@localnet.connect("versioned")
def render_v2(frame):
    return ("v2", frame)

@localnet.connect()
def fail(kind):
    if kind == "value":
        raise ValueError("bad frame 7")
    if kind == "custom":
        class Unrebuildable(Exception):
            def __init__(self, a, b):
                super().__init__(f"{a}/{b}")
        raise Unrebuildable(1, 2)
    if kind == "keyerror":
        return {}["missing"]

@localnet.connect()
def unpicklable_result():
    return threading.Lock()

@localnet.connect()
def block(token):
    say("BLOCKING", token)
    release.wait(30)
    return token

@localnet.connect()
def unblock():
    release.set()
    return True

@localnet.connect()
def apply(func, *args):
    return func(*args)

peer = localnet.Peer(name="server").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.connect()
def echo(x):  # the caller's side of the same connection name
    return ("local", x)


@localnet.connect()
def add(a, b=0):
    return a + b


@pytest.fixture
def server(spawn):
    return spawn(SERVER)


def test_plain_call_runs_locally(server) -> None:
    assert echo(3) == ("local", 3)  # no peer: no network, no default peer started
    from localnet import _current

    assert _current.default.peer is None


def test_three_forms_of_remote_call(server) -> None:
    with localnet.Peer(name="caller"):
        assert echo(3, peer="server") == 3
        assert add.on("server", timeout=5)(2, b=5) == 7
        remote = localnet.peer("server")
        assert remote.add(2, 3) == 5
        assert remote.call("add", 1, b=1, timeout=5) == 2
        assert echo(4, peer=remote) == 4
        assert "block" in dir(remote)


def test_tags_let_different_function_names_interoperate(server) -> None:
    @localnet.connect("versioned")
    def render_v1(frame):
        return ("v1", frame)

    assert render_v1(1) == ("v1", 1)
    with localnet.Peer(name="old-app"):
        assert render_v1(1, peer="server") == ("v2", 1)
        assert render_v1.name == "versioned"
        assert render_v1.__name__ == "render_v1"


def test_values_of_every_kind_round_trip(spawn) -> None:
    # The caller runs as a script so that its classes live in __main__.
    spawn(SERVER)
    caller = spawn("""
        import datetime, functools

        class Point:
            def __init__(self, x, y): self.x, self.y = x, y
            def __eq__(self, other): return (self.x, self.y) == (other.x, other.y)

        @localnet.connect()
        def echo(x): return x

        @localnet.connect()
        def apply(func, *args): return func(*args)

        factor = 3
        def closure(v): return v * factor

        values = {
            "set": {1, 2, 3}, "tuple": (1, "a", None), "frozenset": frozenset("ab"),
            "datetime": datetime.datetime(2026, 11, 25, 12, 30, tzinfo=datetime.timezone.utc),
            "exception": KeyError("k"), "bytes": bytes(range(256)) * 40000,
            "point": Point(1, 2), "nested": {"a": [1, {"b": (2, 3.5)}], 4: b"x"},
            "big-int": 2 ** 200, "complex": 3 + 4j,
        }
        with localnet.Peer(name="caller"):
            for key, value in values.items():
                back = echo(value, peer="server")
                same = (type(back) is type(value) and back.args == value.args) \\
                    if isinstance(value, Exception) else back == value
                say("RESULT", key, same, type(back).__name__)
            say("RESULT lambda", apply(lambda a, b: a * b, 6, 7, peer="server"))
            say("RESULT closure", apply(closure, 5, peer="server"))
            say("RESULT partial", apply(functools.partial(pow, 2), 10, peer="server"))
            p = echo(Point(3, 4), peer="server")
            say("RESULT main-class", type(p).__name__, p.x, p.y)
        say("DONE")
    """, ready=None)
    results = caller.collect("DONE", timeout=60)
    simple = [r.split() for r in results if r.split()[1] not in
              ("lambda", "closure", "partial", "main-class")]
    assert len(simple) == 10
    for _, key, same, type_name in simple:
        assert same == "True", f"{key} came back as {type_name}"
    assert "RESULT lambda 42" in results
    assert "RESULT closure 15" in results
    assert "RESULT partial 1024" in results
    assert "RESULT main-class Point 3 4" in results


def test_large_payloads_have_no_size_limit(server) -> None:
    blob = bytes(range(256)) * (12 * 4096)  # 12 MiB
    with localnet.Peer(name="caller"):
        assert echo(blob, peer="server") == blob
        moment = datetime.datetime.now()
        assert echo([blob, moment], peer="server") == [blob, moment]


def test_remote_exception_keeps_its_type_and_traceback(server) -> None:
    with localnet.Peer(name="caller"):
        with pytest.raises(ValueError, match="bad frame 7") as caught:
            localnet.peer("server").fail("value")
        assert ", in fail\nValueError: bad frame 7" in caught.value.remote_traceback
        assert any("Remote traceback" in note for note in caught.value.__notes__)
        with pytest.raises(KeyError):
            localnet.peer("server").fail("keyerror")
        assert echo("still fine", peer="server") == "still fine"


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(server) -> None:
    with localnet.Peer(name="caller"):
        with pytest.raises(localnet.RemoteError, match="Unrebuildable: 1/2") as caught:
            localnet.peer("server").fail("custom")
        assert caught.value.type_name.endswith("Unrebuildable")
        assert ", in fail\n" in caught.value.remote_traceback
        assert echo("still fine", peer="server") == "still fine"


def test_unknown_connection_lists_what_the_peer_offers(server) -> None:
    @localnet.connect()
    def missing():
        pass

    with localnet.Peer(name="caller"):
        with pytest.raises(localnet.UnknownConnection) as caught:
            missing(peer="server")
        assert "offers no connection 'missing'" in str(caught.value)
        assert {"echo", "add", "block", "versioned"} <= set(caught.value.offered)
        with pytest.raises(localnet.UnknownConnection, match="echo"):
            localnet.peer("server").nonexistent  # noqa: B018 - attribute access raises
        assert echo(1, peer="server") == 1


def test_unknown_peer_is_peer_not_found(server) -> None:
    with localnet.Peer(name="caller"):
        with pytest.raises(localnet.PeerNotFound, match="'ghost'.*live peers: server"):
            echo(1, peer="ghost")
        assert echo(1, peer="server") == 1


def test_timeout_then_both_peers_go_on(server) -> None:
    with localnet.Peer(name="caller"):
        remote = localnet.peer("server")
        with pytest.raises(localnet.Timeout) as caught:
            remote.call("block", "late", timeout=0.2)
        assert isinstance(caught.value, TimeoutError)
        assert remote.unblock() is True
        assert remote.echo("after") == "after"


def test_unpicklable_argument_fails_at_the_caller(server) -> None:
    with localnet.Peer(name="caller") as me:
        before = me.stats().calls_made
        with pytest.raises(localnet.SerializationError, match="an argument of 'echo'"):
            echo(threading.Lock(), peer="server")
        assert me.stats().calls_made == before  # nothing was sent
        assert echo(2, peer="server") == 2


def test_unpicklable_result_is_a_serialization_error(server) -> None:
    with localnet.Peer(name="caller"):
        with pytest.raises(localnet.SerializationError, match="result of 'unpicklable_result'"):
            localnet.peer("server").unpicklable_result()
        assert echo(3, peer="server") == 3


def test_peer_that_dies_during_a_call_raises_connection_lost(server) -> None:
    with localnet.Peer(name="caller"):
        remote = localnet.peer("server")
        assert remote.echo(1) == 1
        outcome: list[BaseException] = []

        def blocked() -> None:
            try:
                remote.block("x")
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        server.expect("BLOCKING x")  # the call is running in the server
        server.kill9()
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], localnet.ConnectionLost)
        with pytest.raises(localnet.PeerNotFound):
            echo(1, peer="server")


def test_concurrent_callers_use_a_bounded_number_of_connections(server) -> None:
    errors: list[BaseException] = []
    with localnet.Peer(name="caller") as me:

        def worker(n: int) -> None:
            try:
                for i in range(200):
                    assert add(n, i, peer="server") == n + i
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert list(me._caller._pools) == ["server"]
        # at most one connection per call in flight
        assert 1 <= len(me._caller.channels("server")) <= 12
        assert me.stats().calls_made == 12 * 200


def test_a_lone_thread_reuses_one_connection(server) -> None:
    with localnet.Peer(name="caller") as me:
        for i in range(50):
            assert add(i, 1, peer="server") == i + 1
        assert len(me._caller.channels("server")) == 1


def test_calls_beyond_max_calls_raise_too_many_calls(server) -> None:
    with localnet.Peer(name="caller", max_calls=2) as me:
        remote = localnet.peer("server")
        results: list[object] = []
        blocked = [threading.Thread(target=lambda n=n: results.append(remote.block(n)))
                   for n in range(2)]
        for t in blocked:  # one after the other: their lines must not interleave
            t.start()
            server.expect("BLOCKING")
        try:
            with pytest.raises(localnet.TooManyCalls, match=r"max_calls=\.\.\."):
                remote.echo(1)
        finally:  # another peer of this process, with calls to spare
            with localnet.Peer(name="helper") as helper:
                assert helper.call("server", "unblock", (), {}) is True
        for t in blocked:
            t.join(10)
        assert sorted(results) == [0, 1]  # type: ignore[type-var]
        assert remote.echo(2) == 2
        assert len(me._caller.channels("server")) == 2


def test_slow_handler_does_not_stall_other_callers(server) -> None:
    with localnet.Peer(name="caller"):
        remote = localnet.peer("server")
        result: list[object] = []
        slow = threading.Thread(target=lambda: result.append(remote.block("slow")))
        slow.start()
        try:
            # while "block" waits, the same connection serves other calls
            for i in range(50):
                assert remote.echo(i) == i
        finally:
            remote.unblock()
        slow.join(10)
        assert result == ["slow"]


def test_call_timeout_of_one_thread_leaves_others_working(server) -> None:
    with localnet.Peer(name="caller"):
        remote = localnet.peer("server")
        outcomes: list[object] = []

        def late() -> None:
            try:
                remote.call("block", "t", timeout=0.3)
            except localnet.Timeout as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=late) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(20):
            assert remote.echo(i) == i
        for t in threads:
            t.join(10)
        assert len(outcomes) == 3
        remote.unblock()
        assert remote.echo("end") == "end"


def test_calling_yourself_works(server) -> None:
    with localnet.Peer(name="selfish"):
        assert add(1, 2, peer="selfish") == 3


SMALL_FRAMES = """
@localnet.connect()
def echo(x):
    return x

@localnet.connect()
def blob(n):
    return b"x" * n

peer = localnet.Peer(name="small", max_frame=2 * 1024 * 1024, shm_threshold=None).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_different_max_frames_give_clear_errors(spawn) -> None:
    spawn(SMALL_FRAMES)
    with localnet.Peer(name="caller", max_frame=4 * 1024 * 1024) as me:
        # over the callee's limit: refused here, before sending, naming its limit
        with pytest.raises(localnet.SerializationError,
                           match=r"2097152-byte message limit of peer 'small'.*max_frame"):
            echo(b"x" * (3 * 1024 * 1024), peer="small")
        assert echo(b"ok", peer="small") == b"ok"
        # a reply over this peer's limit
        with localnet.Peer(name="picky", max_frame=1024 * 1024) as picky:
            assert len(picky.call("small", "blob", (1000 * 1000,), {})) == 1000 * 1000
            with pytest.raises(localnet.SerializationError,
                               match=r"answered with .* over this peer's 1048576-byte"):
                picky.call("small", "blob", (1536 * 1024,), {})  # within the callee's
            assert picky.call("small", "echo", (1,), {}) == 1
        assert echo(b"again", peer="small") == b"again"
        assert me.stats().calls_made >= 2


def test_closing_the_caller_fails_its_pending_call_with_peer_closed(server) -> None:
    me = localnet.Peer(name="caller").start()
    remote = me.peer("server")
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            remote.block("pending")
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    server.expect("BLOCKING pending")
    me.close()
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], localnet.PeerClosed), outcome
    assert "'caller' was closed" in str(outcome[0])
    with localnet.Peer(name="other") as other:  # the server is alive and well
        assert other.call("server", "unblock", (), {}) is True


def test_a_client_that_pipelines_on_one_connection_is_still_served(server) -> None:
    # localnet callers send one call at a time per connection; a hand-written
    # client may send the next while a handler runs: the watchdog hands on.
    from helpers import raw_channel

    from localnet import _serial, _wire

    with localnet.Peer(name="caller") as me:
        address = me.lookup("server")["address"]
    sock = raw_channel(address, "call")
    with sock:
        for ident, call in ((1, ("block", ("raw",), {})), (2, ("echo", (5,), {}))):
            payload = _serial.dumps_call(*call, "an argument of", None)
            assert isinstance(payload, bytes)
            _wire.send_frame(sock, _wire.Kind.CALL, ident, payload)
        server.expect("BLOCKING raw")
        reader = _wire.FrameReader(sock)
        kind, ident, body, _ = reader.read(10)  # echo, while block still runs
        assert (kind, ident, _serial.loads(body, "the result of")) == (_wire.Kind.REPLY, 2, 5)
        with localnet.Peer(name="helper") as helper:
            assert helper.call("server", "unblock", (), {}) is True
        kind, ident, body, _ = reader.read(10)
        assert (kind, ident, _serial.loads(body, "the result of")) == (_wire.Kind.REPLY, 1, "raw")
