"""The callee's loop in C (localnet/_fastserve.c, ``_fastcall.serve_calls``) over real
socket pairs: what it runs itself, what it hands back to the Python loop, and the
bookkeeping the watchdog's hand-over relies on; then a hand-over from inside it, end
to end, against a real peer."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import localnet
from localnet import _serial, _wire
from localnet._wire import FrameReader, Kind, pack_header

try:
    from localnet import _fastcall
except ImportError:  # not built here
    _fastcall = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(_fastcall is None, reason="localnet._fastcall is not built")
MAX = _wire.DEFAULT_MAX_FRAME
CALL, REPLY, ERROR, TAKEN, TIMED_CALL = (int(Kind.CALL), int(Kind.REPLY), int(Kind.ERROR),
                                         int(Kind.TAKEN), int(Kind.TIMED_CALL))


def frame(kind: int, ident: int, body: bytes = b"", nfds: int = 0) -> bytes:
    return pack_header(kind, ident, len(body), nfds) + body


class Watchdog:
    """What serve_calls reads of the server's watchdog: its dict of busy connections,
    whether it is awake, and watch() (called only while it sleeps)."""

    def __init__(self, awake: bool = False) -> None:
        self._busy: dict[Any, None] = {}
        self._awake = awake
        self.watched = 0

    def watch(self, conn: Any) -> None:
        self._busy[conn] = None
        self.watched += 1
        self._awake = True


class Server:
    def __init__(self) -> None:
        self.stopping = False
        self.closing = False
        self.finished = 0

    def call_finished(self) -> None:
        self.finished += 1


class Conn:
    """The attributes of _server._CallConnection that serve_calls reads and writes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.generation = 0
        self.busy_since = 0.0
        self.closed = False


class Host:
    """A host whose calls all go through the run_call the test chooses
    (``plain_calls`` None: the C loop runs none itself; ``spin`` 0: it
    sleeps at once on a call connection that has nothing)."""

    plain_calls = None
    spin = 0.0

    def __init__(self, run_call: Any) -> None:
        self.run_call = run_call


class Loop:
    """serve_calls on ``ours``, for ``host``: a real Receiver, or a Host whose
    run_call the test chooses."""

    def __init__(self, ours: socket.socket, run_call: Any = None, host: Any = None) -> None:
        self.sock = ours
        self.buffer = bytearray(4096)
        self.conn, self.server, self.watchdog = Conn(), Server(), Watchdog()
        self.host = host if host is not None else Host(run_call)

    @property
    def run_call(self) -> Any:
        return self.host.run_call

    @run_call.setter
    def run_call(self, run_call: Any) -> None:
        self.host = Host(run_call)

    def serve(self) -> tuple[Any, Any, Any, Any]:
        return _fastcall.serve_calls(self.sock, self.buffer, MAX, self.conn,
                                     self.server, self.watchdog, self.host)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, theirs); serve_calls blocks on ``ours`` until something arrives, so a
    test that went wrong is ended by shutting ``theirs`` (serve_calls then returns)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.settimeout(30)  # the test's own reads are bounded
    bound = threading.Timer(60, lambda: theirs.shutdown(socket.SHUT_RDWR))
    bound.start()
    yield ours, theirs
    bound.cancel()
    ours.close()
    theirs.close()


def echo_calls(seen: list[tuple[bytes, list[int]]]) -> Any:
    def run_call(body: bytearray, fds: list[int]) -> tuple[int, bytes]:
        seen.append((bytes(body), fds))
        return REPLY, b"re:" + bytes(body)
    return run_call


def test_plain_calls_run_here_until_something_else_arrives(pair) -> None:
    ours, theirs = pair
    seen: list[tuple[bytes, list[int]]] = []
    loop = Loop(ours, echo_calls(seen))
    reader = FrameReader(theirs)

    def caller() -> None:
        for i in range(1, 51):  # one at a time, each answered before the next
            theirs.sendall(frame(CALL, i, b"call %d" % i))
            assert reader.read(30) == (REPLY, i, bytearray(b"re:call %d" % i), [])
        theirs.sendall(frame(TAKEN, 99))  # a control frame: for the Python loop
    thread = threading.Thread(target=caller)
    thread.start()
    assert loop.serve() == (TAKEN, 99, bytearray(), [])
    thread.join(30)
    assert [body for body, _ in seen] == [b"call %d" % i for i in range(1, 51)]
    assert all(fds == [] for _, fds in seen)
    assert loop.conn.busy_since == 0.0  # after each call: read on
    assert loop.watchdog.watched == 1 and loop.conn in loop.watchdog._busy
    assert not loop.conn.lock.locked() and not loop.conn.send_lock.locked()
    theirs.shutdown(socket.SHUT_WR)
    assert loop.serve() == (0, 0, [], None)  # the end of the stream, as recv_frame says it


def test_the_handler_runs_busy_and_the_watchdog_awake_is_not_called(pair) -> None:
    ours, theirs = pair
    during: list[float] = []
    loop = Loop(ours, lambda body, fds: (during.append(loop.conn.busy_since), (REPLY, b""))[1])
    loop.watchdog._awake = True
    before = time.monotonic()
    theirs.sendall(frame(CALL, 1, b"x"))
    threading.Thread(target=lambda: (FrameReader(theirs).read(30),
                                     theirs.shutdown(socket.SHUT_WR))).start()
    assert loop.serve() == (0, 0, [], None)
    assert len(during) == 1 and before <= during[0] <= time.monotonic()
    assert loop.watchdog.watched == 0 and loop.conn in loop.watchdog._busy


def test_a_timed_call_runs_without_its_deadline_unless_it_expired(pair) -> None:
    ours, theirs = pair
    seen: list[tuple[bytes, list[int]]] = []
    loop = Loop(ours, echo_calls(seen))
    live = struct.pack("<d", time.monotonic() + 60) + b"in time"
    expired = struct.pack("<d", time.monotonic() - 1) + b"too late"
    reply: list[object] = []

    def caller() -> None:
        theirs.sendall(frame(TIMED_CALL, 1, live))
        reply.append(FrameReader(theirs).read(30))
        theirs.sendall(frame(TIMED_CALL, 2, expired))
    thread = threading.Thread(target=caller)
    thread.start()
    assert loop.serve() == (TIMED_CALL, 2, bytearray(expired), [])  # the deadline kept
    thread.join(30)
    assert reply == [(REPLY, 1, bytearray(b"re:in time"), [])]
    assert [body for body, _ in seen] == [b"in time"]
    theirs.sendall(frame(TIMED_CALL, 3, b"short"))  # no room for a deadline: Python refuses it
    assert loop.serve() == (TIMED_CALL, 3, bytearray(b"short"), [])


def test_calls_while_stopping_are_left_to_the_python_loop(pair) -> None:
    ours, theirs = pair
    seen: list[tuple[bytes, list[int]]] = []
    loop = Loop(ours, echo_calls(seen))
    loop.server.stopping = True
    theirs.sendall(frame(CALL, 5, b"refuse me"))
    assert loop.serve() == (CALL, 5, bytearray(b"refuse me"), [])
    timed = struct.pack("<d", time.monotonic() + 60) + b"me too"
    theirs.sendall(frame(TIMED_CALL, 6, timed))
    assert loop.serve() == (TIMED_CALL, 6, bytearray(timed), [])
    assert seen == []


def test_pipelined_frames_and_descriptors_go_to_the_frame_reader(pair, tmp_path: Path) -> None:
    ours, theirs = pair
    seen: list[tuple[bytes, list[int]]] = []
    loop = Loop(ours, echo_calls(seen))
    two = frame(CALL, 1, b"first") + frame(CALL, 2, b"second")
    theirs.sendall(two)
    got = loop.serve()
    assert got == (0, len(two), [], None) and seen == []
    reader = FrameReader(ours)
    reader._buf[:len(two)] = loop.buffer[:len(two)]  # (the reader's own buffer, in the server)
    assert reader.read_on(got) == (CALL, 1, bytearray(b"first"), [])
    assert reader.read() == (CALL, 2, bytearray(b"second"), [])
    with open(tmp_path / "f", "wb") as file:
        socket.send_fds(theirs, [frame(CALL, 3, b"x", nfds=1)], [file.fileno()])
        zero, n, fds, _ = loop.serve()
    assert (zero, n, len(fds)) == (0, _wire.HEADER_SIZE + 1, 1)
    os.close(fds[0])


def test_the_role_moving_on_during_a_call_hands_back_after_the_reply(pair) -> None:
    ours, theirs = pair

    def run_call(body: bytearray, fds: list[int]) -> tuple[int, bytes]:
        with loop.conn.lock:  # what the watchdog's hand-over does
            loop.conn.generation += 1
            loop.conn.busy_since = 0.0
        return REPLY, b"done"
    loop = Loop(ours, run_call)
    theirs.sendall(frame(CALL, 8, b"long"))
    assert loop.serve() == (_fastcall.HANDED, 0, None, None)  # the generation it began with
    assert FrameReader(theirs).read(30) == (REPLY, 8, bytearray(b"done"), [])
    loop.conn.closed = True  # and a connection closed meanwhile: the same
    theirs.sendall(frame(CALL, 9, b"again"))
    assert loop.serve() == (_fastcall.HANDED, 1, None, None)
    assert FrameReader(theirs).read(30) == (REPLY, 9, bytearray(b"done"), [])


def test_a_result_in_shared_memory_is_sent_by_python(pair) -> None:
    ours, theirs = pair
    shared = object()  # anything but bytes: a Payload
    loop = Loop(ours, lambda body, fds: (REPLY, shared))
    loop.conn.generation = 4
    theirs.sendall(frame(CALL, 3, b"big"))
    assert loop.serve() == (_fastcall.SHARED, 3, (REPLY, shared), 4)
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing was sent
        theirs.recv(100)


def test_while_the_server_closes_each_call_tells_it(pair) -> None:
    ours, theirs = pair
    loop = Loop(ours, echo_calls([]))
    loop.server.closing = True
    theirs.sendall(frame(CALL, 1, b"a"))
    threading.Thread(target=lambda: (FrameReader(theirs).read(30),
                                     theirs.shutdown(socket.SHUT_WR))).start()
    assert loop.serve() == (0, 0, [], None)
    assert loop.server.finished == 1


def test_errors_propagate_with_both_locks_released(pair) -> None:
    ours, theirs = pair

    def run_call(body: bytearray, fds: list[int]) -> tuple[int, bytes]:
        raise RuntimeError("run_call itself failed")
    loop = Loop(ours, run_call)
    theirs.sendall(frame(CALL, 1, b"x"))
    with pytest.raises(RuntimeError, match="itself failed"):
        loop.serve()
    loop.run_call = lambda body, fds: (REPLY, "not a tuple of two")[:1]
    theirs.sendall(frame(CALL, 2, b"x"))
    with pytest.raises(TypeError, match=r"\(kind, payload\)"):
        loop.serve()
    loop.run_call = echo_calls([])
    theirs.sendall(frame(CALL, 3, b"x"))
    theirs.shutdown(socket.SHUT_RD)  # the reply cannot leave
    theirs.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # (and no SIGPIPE)
        loop.serve()
    assert not loop.conn.lock.locked() and not loop.conn.send_lock.locked()
    with pytest.raises(TypeError, match="takes 7 arguments"):
        _fastcall.serve_calls(ours, loop.buffer, MAX)  # type: ignore[call-arg]


def test_a_socket_closed_by_another_thread_of_the_connection_ends_the_loop(pair) -> None:
    # (as the Python reader: it asks the socket for its descriptor at each receive
    # and send, so a number given to a new socket meanwhile is never used)
    ours, theirs = pair

    def run_call(body: bytearray, fds: list[int]) -> tuple[int, bytes]:
        ours.close()  # another thread of the connection closed it while this call ran
        return REPLY, b"too late"
    loop = Loop(ours, run_call)
    theirs.sendall(frame(CALL, 1, b"x"))
    with pytest.raises(OSError) as raised:
        loop.serve()
    assert raised.value.errno == errno.EBADF
    assert not loop.conn.lock.locked() and not loop.conn.send_lock.locked()
    with pytest.raises(OSError) as raised:
        loop.serve()  # and at the receive
    assert raised.value.errno == errno.EBADF


# -- end to end: a hand-over from inside the C loop ----------------------------------------

def test_a_long_call_in_the_c_loop_hands_the_connection_on(spawn) -> None:
    # The role holder is inside serve_calls, running a handler that blocks; the
    # caller sends the next call on the same connection: the watchdog hands the
    # role to a new thread, which answers it while the first still runs.
    from helpers import raw_channel

    server = spawn("""
import threading
go = threading.Event()

@localnet.connect()
def block(tag):
    say("BLOCKING", tag)
    go.wait(60)
    return tag

@localnet.connect()
def echo(x):
    return x

@localnet.connect()
def unblock():
    go.set()
    return True

peer = localnet.Peer(name="server").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
""")
    with localnet.Peer(name="caller") as me:
        address = me.lookup("server")["address"]
        sock = raw_channel(address, "call")
        with sock:
            reader = FrameReader(sock)
            calls = [(1, ("echo", ("first",), {})), (2, ("block", ("c",), {})),
                     (3, ("echo", ("while blocked",), {}))]
            for ident, call in calls:
                payload = _serial.dumps_call(*call, "an argument of", None)
                assert isinstance(payload, bytes)
                _wire.send_frame(sock, Kind.CALL, ident, payload)
                if ident == 1:  # answered: the C loop holds the connection now
                    kind, got, body, _ = reader.read(30)
                    assert (kind, got, _serial.loads(body)) == (REPLY, 1, "first")
                if ident == 2:
                    server.expect("BLOCKING c")
            kind, got, body, _ = reader.read(30)  # echo, while block still runs
            assert (kind, got, _serial.loads(body)) == (REPLY, 3, "while blocked")
            assert me.call("server", "unblock", (), {}) is True
            kind, got, body, _ = reader.read(30)
            assert (kind, got, _serial.loads(body)) == (REPLY, 2, "c")
            for ident in range(4, 104):  # and the connection serves on
                payload = _serial.dumps_call("echo", (ident,), {}, "an argument of", None)
                _wire.send_frame(sock, Kind.CALL, ident, payload)  # type: ignore[arg-type]
                kind, got, body, _ = reader.read(30)
                assert (kind, got, _serial.loads(body)) == (REPLY, ident, ident)


# -- plain calls run in C, against a real Receiver ----------------------------------------

@localnet.connect("fastserve_add")
def fastserve_add(a, b=0):
    return a + b


@localnet.connect("fastserve_fail")
def fastserve_fail(message):
    raise ValueError(message)


@localnet.connect("fastserve_obj")
def fastserve_obj(n):
    return Path("/tmp") / str(n)  # not a plain value: pickled by finish()


@localnet.connect("fastserve_big")
def fastserve_big(n):
    return b"x" * n


@localnet.connect("fastserve_async")
async def fastserve_async(x):
    return ("awaited", x)


def receiver(max_frame: int = MAX, max_workers: int = 4) -> Any:
    """A real Receiver whose run_call notes the calls that reach it (``host.whole``)."""
    from localnet._receive import Receiver

    host = Receiver("fastserve", max_frame, max_workers, None)
    assert host.plain_calls is not None  # the extensions are built (the module's mark)
    host.whole = []
    run_call = host.run_call

    def noting(body: bytearray, fds: list[int]) -> Any:
        host.whole.append(_serial.loads(bytes(body))[0])
        return run_call(body, fds)
    host.run_call = noting
    return host


def serve_one(pair: tuple[socket.socket, socket.socket], loop: Loop, ident: int,
              name: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """One call through serve_calls; (reply kind, decoded body)."""
    ours, theirs = pair
    payload = _serial.dumps_call(name, args, kwargs, "an argument of", None)
    assert isinstance(payload, bytes)
    theirs.sendall(frame(CALL, ident, payload))
    got: list[Any] = []

    def caller() -> None:
        got.append(FrameReader(theirs).read(30))
        theirs.sendall(frame(TAKEN, 0))  # ends this serve_calls
    thread = threading.Thread(target=caller)
    thread.start()
    assert loop.serve() == (TAKEN, 0, bytearray(), [])
    thread.join(30)
    kind, got_ident, body, fds = got[0]
    assert (got_ident, fds) == (ident, [])
    if kind == REPLY:
        return kind, _serial.loads(body)
    return kind, _serial.loads_exception(body)


def test_a_plain_call_runs_in_c_as_run_call_would(pair) -> None:
    host = receiver()
    loop = Loop(pair[0], host=host)
    assert serve_one(pair, loop, 1, "fastserve_add", 2, b=5) == (REPLY, 7)
    assert serve_one(pair, loop, 2, "fastserve_add", [1], [2]) == (REPLY, [1, 2])
    assert host.counts == [2, 0] and len(host._slots) == 4
    assert host.whole == []  # neither went through run_call


def test_a_handler_that_raises_answers_its_error_with_the_users_traceback(pair) -> None:
    host = receiver()
    loop = Loop(pair[0], host=host)
    kind, exc = serve_one(pair, loop, 1, "fastserve_fail", "bad frame")
    assert kind == ERROR and isinstance(exc, ValueError) and str(exc) == "bad frame"
    text = exc.remote_traceback  # type: ignore[attr-defined]
    assert "fastserve_fail" in text and "raise ValueError(message)" in text
    assert "_server.py" not in text and "_receive.py" not in text
    assert host.counts == [1, 1] and len(host._slots) == 4 and host.whole == []


def test_results_that_are_not_plain_or_too_large_go_through_finish(pair) -> None:
    host = receiver(max_frame=4096)
    loop = Loop(pair[0], host=host)
    assert serve_one(pair, loop, 1, "fastserve_obj", 3) == (REPLY, Path("/tmp/3"))
    assert serve_one(pair, loop, 2, "fastserve_async", 9) == (REPLY, ("awaited", 9))
    kind, exc = serve_one(pair, loop, 3, "fastserve_big", 10_000)  # over max_frame
    assert kind == ERROR and isinstance(exc, localnet.SerializationError)
    assert "fastserve_big" in str(exc)
    assert serve_one(pair, loop, 4, "fastserve_big", 100) == (REPLY, b"x" * 100)
    assert host.counts == [4, 1] and len(host._slots) == 4 and host.whole == []


def test_calls_that_are_not_plain_go_to_run_call(pair) -> None:
    host = receiver(max_workers=1)
    loop = Loop(pair[0], host=host)
    kind, exc = serve_one(pair, loop, 1, "fastserve_missing")
    assert kind == ERROR and isinstance(exc, localnet.UnknownConnection)
    host._slots.pop()  # the one slot taken (by a call running elsewhere)
    kind, exc = serve_one(pair, loop, 2, "fastserve_add", 1)
    assert kind == ERROR and isinstance(exc, localnet.TooManyCalls)
    host._slots.append(None)
    ran: list[Any] = []

    class Dispatcher:  # what run_call asks of a peer's dispatcher
        def run(self, func: Any, args: Any, kwargs: Any) -> Any:
            ran.append(args)
            return func(*args, **kwargs)
    host.dispatcher = Dispatcher()
    assert serve_one(pair, loop, 3, "fastserve_add", 4, 4) == (REPLY, 8)
    assert ran == [(4, 4)]  # on the dispatcher, not in C
    assert host.counts == [3, 2] and len(host._slots) == 1
    assert host.whole == ["fastserve_missing", "fastserve_add", "fastserve_add"]
