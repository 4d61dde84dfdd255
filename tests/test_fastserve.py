"""The callee's loop in C (localnet/_fastserve.c, ``_fastcall.serve_calls``) over real
socket pairs: what it runs itself, what it hands back to the Python loop, and the
bookkeeping the watchdog's hand-over relies on; then a hand-over from inside it, end
to end, against a real peer."""

from __future__ import annotations

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


class Loop:
    """serve_calls on ``ours``, with a run_call the test chooses."""

    def __init__(self, ours: socket.socket, run_call: Any) -> None:
        self.sock = ours
        self.buffer = bytearray(4096)
        self.conn, self.server, self.watchdog = Conn(), Server(), Watchdog()
        self.run_call = run_call

    def serve(self) -> tuple[Any, Any, Any, Any]:
        return _fastcall.serve_calls(self.sock.fileno(), self.buffer, MAX, self.conn,
                                     self.server, self.watchdog, self.run_call)


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
        _fastcall.serve_calls(ours.fileno(), loop.buffer, MAX)  # type: ignore[call-arg]


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
