"""The optional C side of small calls (localnet/_fastcall.c), frame by frame over real
socket pairs, and calls with the C extensions left out on either side or both."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sysconfig
import threading
import time
from pathlib import Path

import pytest

import localnet
from localnet import _remote, _serial, _wire
from localnet._wire import HEADER_SIZE, FrameReader, Kind, pack_header

try:
    from localnet import _fastcall
except ImportError:  # not built here
    _fastcall = None  # type: ignore[assignment]

HAVE_COMPILER = shutil.which(str(sysconfig.get_config_var("CC") or "cc").split()[0]) is not None
needs_fastcall = pytest.mark.skipif(_fastcall is None, reason="localnet._fastcall is not built")
MAX = _wire.DEFAULT_MAX_FRAME
CALL, REPLY, ERROR, TIMED_CALL = (int(Kind.CALL), int(Kind.REPLY), int(Kind.ERROR),
                                  int(Kind.TIMED_CALL))


def frame(kind: int, ident: int, body: bytes = b"", nfds: int = 0) -> bytes:
    return pack_header(kind, ident, len(body), nfds) + body


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_the_extension_is_built_where_a_compiler_is() -> None:
    # setup.py builds it optionally: a silent build failure would only show as lost speed
    if not HAVE_COMPILER:
        pytest.skip("no C compiler here; localnet runs in pure Python")
    assert _fastcall is not None
    assert _remote._roundtrip is _fastcall.roundtrip
    assert _serial.encode_call is not None and _serial.encode_value is not None


# -- roundtrip -------------------------------------------------------------------------

@needs_fastcall
def test_roundtrip_sends_the_call_and_returns_the_answer(pair) -> None:
    ours, theirs = pair
    theirs.sendall(frame(REPLY, 7, b"the reply"))  # queued before the call: no thread needed
    assert _fastcall.roundtrip(ours.fileno(), 7, b"the call", None, MAX) == \
        (REPLY, 7, b"the reply", [])
    assert FrameReader(theirs).read(5) == (CALL, 7, b"the call", [])


@needs_fastcall
def test_roundtrip_with_a_deadline_sends_a_timed_call(pair) -> None:
    ours, theirs = pair
    deadline = time.monotonic() + 30
    theirs.sendall(frame(ERROR, 1 << 40, b"an error"))
    assert _fastcall.roundtrip(ours.fileno(), 1 << 40, b"xy", deadline, MAX) == \
        (ERROR, 1 << 40, b"an error", [])
    kind, ident, body, fds = FrameReader(theirs).read(5)
    assert (kind, ident, fds) == (TIMED_CALL, 1 << 40, [])
    assert isinstance(body, bytearray)
    assert _wire.take_deadline(body) == deadline and body == b"xy"


@needs_fastcall
def test_an_answer_already_there_is_taken_even_past_the_deadline(pair) -> None:
    ours, theirs = pair
    theirs.sendall(frame(REPLY, 3, b"late but here"))
    past = time.monotonic() - 1.0
    assert _fastcall.roundtrip(ours.fileno(), 3, b"", past, MAX)[2] == b"late but here"


@needs_fastcall
def test_no_answer_by_the_deadline(pair) -> None:
    ours, _ = pair
    start = time.monotonic()
    assert _fastcall.roundtrip(ours.fileno(), 1, b"x", start + 0.1, MAX) == \
        (_fastcall.RECV_TIMEOUT, None, None, None)
    assert time.monotonic() >= start + 0.1  # it waited for the deadline, not less


@needs_fastcall
@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("sent, status", [(b"", "EOF"),
                                          (frame(REPLY, 1, b"abcdef")[:10], "CUT_SHORT"),
                                          (frame(REPLY, 1, b"abcdef")[:-2], "CUT_SHORT")])
def test_the_other_side_closing_before_or_inside_the_answer(pair, sent, status, timed) -> None:
    ours, theirs = pair
    theirs.sendall(sent)
    theirs.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 30 if timed else None
    answer = _fastcall.roundtrip(ours.fileno(), 1, b"x", deadline, MAX)
    assert answer == (getattr(_fastcall, status), None, None, None)


@needs_fastcall
@pytest.mark.parametrize("header, fields", [
    (struct.pack("<BBHIQ", 9, REPLY, 0, 0, 1), (9, REPLY, 0, 0)),  # another version
    (struct.pack("<BBHIQ", 1, 99, 0, 0, 1), (1, 99, 0, 0)),  # unknown kind
    (struct.pack("<BBHIQ", 1, REPLY, 65, 0, 1), (1, REPLY, 65, 0)),  # too many descriptors
    (struct.pack("<BBHIQ", 1, REPLY, 0, 1001, 1), (1, REPLY, 0, 1001)),  # over max_frame
])
def test_a_bad_header_is_refused_before_its_body(pair, header, fields) -> None:
    ours, theirs = pair
    theirs.sendall(header)
    status, got, _, _ = _fastcall.roundtrip(ours.fileno(), 1, b"x", None, 1000)
    assert (status, got) == (_fastcall.BAD_HEADER, fields)
    # and the reader names the problem as it does for its own reads
    with pytest.raises(_wire.ProtocolError):
        FrameReader(ours, 1000).reject(*got)


@needs_fastcall
def test_more_than_one_frame_answering_a_call_is_refused(pair) -> None:
    ours, theirs = pair
    theirs.sendall(frame(REPLY, 1, b"one") + frame(REPLY, 2, b"two"))
    status, why, _, _ = _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX)
    assert status == _fastcall.BAD_FDS and "more data" in why


@needs_fastcall
def test_descriptors_arrive_with_their_reply(pair, tmp_path: Path) -> None:
    ours, theirs = pair
    with open(tmp_path / "f", "wb") as file:
        socket.send_fds(theirs, [frame(REPLY, 5, b"with a descriptor", nfds=1)], [file.fileno()])
        kind, ident, body, fds = _fastcall.roundtrip(ours.fileno(), 5, b"x", None, MAX)
        assert (kind, ident, body, len(fds)) == (REPLY, 5, b"with a descriptor", 1)
        assert os.fstat(fds[0]).st_ino == os.fstat(file.fileno()).st_ino
        os.close(fds[0])


@needs_fastcall
@pytest.mark.parametrize("nfds, sent", [(0, 1), (2, 1), (1, 0)])
def test_descriptors_that_do_not_match_their_frame_are_closed(pair, tmp_path: Path, nfds,
                                                              sent) -> None:
    ours, theirs = pair
    before = open_fds()
    with open(tmp_path / "f", "wb") as file:
        data = frame(REPLY, 5, b"body", nfds=nfds)
        if sent:
            socket.send_fds(theirs, [data], [file.fileno()])
        else:
            theirs.sendall(data)
        status, why, _, _ = _fastcall.roundtrip(ours.fileno(), 5, b"x", None, MAX)
    assert status == _fastcall.BAD_FDS and "descriptors" in why
    assert open_fds() == before


@needs_fastcall
def test_a_large_answer_is_finished_by_the_python_reader(pair) -> None:
    ours, theirs = pair
    body = os.urandom(_fastcall.SMALL_REPLY + 100_000)
    sender = threading.Thread(target=theirs.sendall, args=(frame(REPLY, 9, body),))
    sender.start()
    try:
        status, header, prefix, fds = _fastcall.roundtrip(ours.fileno(), 9, b"x", None, MAX)
        assert status == _fastcall.LARGE and header == (REPLY, 9, 0, len(body))
        assert body.startswith(prefix) and fds == []
        reader = FrameReader(ours)
        reader.resume(*header, prefix, fds)
        assert reader.read(30) == (REPLY, 9, body, [])
    finally:
        sender.join(30)


@needs_fastcall
def test_a_full_socket_buffer_ends_the_send_at_the_deadline(pair) -> None:
    ours, _ = pair
    ours.setblocking(False)
    try:
        while True:
            ours.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    ours.setblocking(True)
    status, sent, _, _ = _fastcall.roundtrip(ours.fileno(), 1, b"x" * 1000,
                                             time.monotonic() + 0.1, MAX)
    assert status == _fastcall.SEND_TIMEOUT and sent == 0


@needs_fastcall
def test_a_broken_connection_while_sending_is_told_not_raised(pair) -> None:
    ours, theirs = pair
    theirs.close()
    status, error, sent, _ = _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX)
    assert status == _fastcall.SEND_FAILED and sent == 0
    assert isinstance(error, (BrokenPipeError, ConnectionResetError))


@needs_fastcall
def test_other_threads_run_while_a_roundtrip_waits(pair) -> None:
    ours, _ = pair
    ticks = [0]
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        before = ticks[0]
        _fastcall.roundtrip(ours.fileno(), 1, b"x", time.monotonic() + 0.3, MAX)
        assert ticks[0] - before > 1000  # the GIL was free while the socket blocked
    finally:
        stop.set()
        thread.join(10)


@needs_fastcall
@pytest.mark.parametrize("timed", [False, True])
def test_a_signal_handler_that_raises_interrupts_a_roundtrip(pair, timed) -> None:
    ours, _ = pair

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            _fastcall.roundtrip(ours.fileno(), 1, b"x",
                                time.monotonic() + 30 if timed else None, MAX)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@needs_fastcall
def test_a_signal_whose_handler_returns_does_not_end_the_wait(pair) -> None:
    ours, theirs = pair
    seen = []
    old = signal.signal(signal.SIGALRM, lambda *_: seen.append(1))
    timer = threading.Timer(0.3, theirs.sendall, args=(frame(REPLY, 1, b"after"),))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        timer.start()
        assert _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX)[2] == b"after"
        assert seen == [1]
    finally:
        timer.join(10)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- recv_frame and send_frame (the callee's side) ------------------------------------------

@needs_fastcall
def test_recv_frame_returns_a_whole_frame_or_the_raw_bytes(pair, tmp_path: Path) -> None:
    ours, theirs = pair
    buf = bytearray(4096)
    theirs.sendall(frame(CALL, 4, b"one call"))
    kind, ident, body, fds = _fastcall.recv_frame(ours.fileno(), buf, MAX)
    assert (kind, ident, body, fds) == (CALL, 4, bytearray(b"one call"), [])
    assert isinstance(body, bytearray)
    two = frame(CALL, 5, b"first") + frame(CALL, 6, b"second")
    theirs.sendall(two)
    assert _fastcall.recv_frame(ours.fileno(), buf, MAX) == (0, len(two), [], None)
    assert buf[:len(two)] == two
    with open(tmp_path / "f", "wb") as file:
        socket.send_fds(theirs, [frame(CALL, 7, b"x", nfds=1)], [file.fileno()])
        zero, n, fds, _ = _fastcall.recv_frame(ours.fileno(), buf, MAX)
        assert (zero, n, len(fds)) == (0, HEADER_SIZE + 1, 1)
        os.close(fds[0])
    theirs.shutdown(socket.SHUT_WR)
    assert _fastcall.recv_frame(ours.fileno(), buf, MAX) == (0, 0, [], None)


@needs_fastcall
def test_frame_reader_reads_pipelined_frames_through_the_c_path(pair) -> None:
    ours, theirs = pair
    frames = [(CALL, i, bytearray(os.urandom(i * 37)), []) for i in range(1, 40)]
    theirs.sendall(b"".join(frame(k, i, bytes(b)) for k, i, b, _ in frames))
    reader = FrameReader(ours)
    assert [reader.read() for _ in frames] == frames


@needs_fastcall
def test_send_frame_sends_bodies_larger_than_the_socket_buffer(pair) -> None:
    ours, theirs = pair
    body = os.urandom(3 * 1024 * 1024)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(FrameReader(theirs).read(30)))
    reader.start()
    _fastcall.send_frame(ours.fileno(), REPLY, 11, body)
    reader.join(30)
    assert got == [(REPLY, 11, body, [])]
    theirs.close()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):  # (the first sends may still fit the buffer)
            _fastcall.send_frame(ours.fileno(), REPLY, 12, b"x" * 65536)


# -- calls with and without the extensions, end to end ------------------------------------

CALLEE = """
import sys
import localnet._remote, localnet._wire
if "{block}" == "yes":
    assert "localnet._fastcall" not in sys.modules or sys.modules["localnet._fastcall"] is None
    assert localnet._remote._roundtrip is None and localnet._wire._send_small is None

@localnet.connect()
def echo(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def blob(n):
    return b"b" * n

@localnet.connect()
def nap(seconds):
    time.sleep(seconds)
    return seconds

@localnet.connect()
def boom():
    raise ValueError("boom")

peer = localnet.Peer(name="{name}").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

CALLER = """
import numpy
import localnet._remote, localnet._serial
if "{block}" == "yes":
    assert localnet._remote._roundtrip is None and localnet._serial.encode_call is None
with localnet.Peer(name="caller") as me:
    for i in range(200):
        args = (i, "s", b"b", 1.5, None, [i], {{"k": (i,)}})
        assert me.call("{target}", "echo", args, {{"kw": i}}) == (args, {{"kw": i}})
        assert me.call("{target}", "echo", (i,), {{}}, timeout=10) == ((i,), {{}})
    for n in (0, 1, 65_536, 300_000, 5_000_000):  # inline, over the C path's small reply
        assert me.call("{target}", "blob", (n,), {{}}, timeout=30) == b"b" * n
    array = numpy.arange(1_000_000, dtype="float64")  # shared memory both ways
    back = me.call("{target}", "echo", (array,), {{}}, timeout=30)[0][0]
    assert (back == array).all()
    try:
        me.call("{target}", "boom", (), {{}})
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("no error")
    try:
        me.call("{target}", "nap", (2.0,), {{}}, timeout=0.2)
    except localnet.Timeout:
        pass
    else:
        raise AssertionError("no timeout")
    assert me.call("{target}", "echo", ("after",), {{}}, timeout=10) == (("after",), {{}})
say("CALLS OK")
"""


@pytest.mark.parametrize("caller_blocks, callee_blocks",
                         [("yes", "yes"), ("yes", "no"), ("no", "yes")])
def test_calls_with_the_extensions_left_out(spawn, tmp_path: Path, caller_blocks,
                                            callee_blocks) -> None:
    # Where they are not built: the Python framing and the pickler, against
    # either side.  (sitecustomize runs before the child's script imports localnet.)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.modules['localnet._fastcall'] = None  # as if they had not been built\n"
        "sys.modules['localnet._speedups'] = None\n"
        "sys.modules['localnet._trigger'] = None\n")
    path = spawn.env()["PYTHONPATH"]

    def env(block: str) -> dict[str, str]:
        return {"PYTHONPATH": os.pathsep.join([str(blocked), path])} if block == "yes" else {}

    spawn(CALLEE.format(block=callee_blocks, name="callee"), **env(callee_blocks))
    caller = spawn(CALLER.format(block=caller_blocks, target="callee"), ready=None,
                   **env(caller_blocks))
    caller.expect("CALLS OK", timeout=60)
    assert caller.wait_exit() == 0


def test_the_test_process_calls_a_callee_without_the_extensions(spawn, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['localnet._fastcall'] = None\n"
        "sys.modules['localnet._speedups'] = None\n"
        "sys.modules['localnet._trigger'] = None\n")
    spawn(CALLEE.format(block="yes", name="pure"),
          PYTHONPATH=os.pathsep.join([str(tmp_path), spawn.env()["PYTHONPATH"]]))
    with localnet.Peer(name="me") as me:
        for i in range(100):
            assert me.call("pure", "echo", (i,), {"k": [i]}) == ((i,), {"k": [i]})
        assert me.call("pure", "blob", (400_000,), {}, timeout=30) == b"b" * 400_000
        with pytest.raises(ValueError, match="boom"):
            me.call("pure", "boom", (), {})


@needs_fastcall
def test_send_now_and_recv_now_never_wait(pair) -> None:
    a, b = pair
    assert _fastcall.recv_now(b.fileno(), 100) is None  # nothing there yet
    assert _fastcall.send_now(a.fileno(), memoryview(b"hello world")[:5]) == 5
    assert _fastcall.recv_now(b.fileno(), 3) == b"hel"
    assert _fastcall.recv_now(b.fileno(), 100) == b"lo"
    sent = 0
    while True:  # until the socket's buffer is full: then 0, not a wait
        n = _fastcall.send_now(a.fileno(), b"x" * 65536)
        if n == 0:
            break
        sent += n
    assert sent > 0
    got = 0
    while (data := _fastcall.recv_now(b.fileno(), 1 << 20)) is not None:
        got += len(data)
    assert got == sent
    a.close()
    assert _fastcall.recv_now(b.fileno(), 100) == b""  # the end of the stream
    with pytest.raises(BrokenPipeError):  # (and no SIGPIPE)
        _fastcall.send_now(b.fileno(), b"x")
    with pytest.raises(ValueError, match="negative"):
        _fastcall.recv_now(b.fileno(), -1)
    with pytest.raises(OSError):
        _fastcall.recv_now(-1, 10)
