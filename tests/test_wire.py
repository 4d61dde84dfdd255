"""Framing and hostile input: a bad connection is closed, everyone else is served."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

import localnet
from localnet import _wire
from localnet._wire import FrameReader, Kind, ProtocolError

SERVER = """
@localnet.connect()
def echo(x):
    return x

peer = localnet.Peer(name="server").start()
localnet.serve_forever(peer, ready=lambda: say("READY", peer.address))
"""


def raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def closed_by_other_side(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def hello(role: str = "call") -> bytes:
    body = _wire.encode_control({"role": role, "name": "raw", "pid": os.getpid()})
    return _wire.pack_header(Kind.HELLO, 0, len(body)) + body


def test_frames_round_trip_with_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        _wire.send_frame(a, Kind.CALL, 7, b"x" * 100, [r])
        big = threading.Thread(target=_wire.send_frame,
                               args=(a, Kind.REPLY, 8, b"y" * (3 * 1024 * 1024)))
        big.start()
        reader = FrameReader(b)
        kind, ident, body, fds = reader.read(5)
        assert (kind, ident, body) == (Kind.CALL, 7, b"x" * 100)
        assert len(fds) == 1
        os.write(w, b"!")
        assert os.read(fds[0], 1) == b"!"
        os.close(fds[0])
        kind, ident, body, fds = reader.read(5)
        assert (kind, ident, len(body), fds) == (Kind.REPLY, 8, 3 * 1024 * 1024, [])
        big.join(10)
        a.close()
        with pytest.raises(EOFError):
            reader.read(5)
    finally:
        for fd in (r, w):
            os.close(fd)
        b.close()


@pytest.mark.parametrize("header, why", [
    (struct.pack("<BBHIQ", 9, Kind.CALL, 0, 4, 1), "unsupported protocol version 9"),
    (struct.pack("<BBHIQ", 1, 200, 0, 4, 1), "unknown message kind 200"),
    (struct.pack("<BBHIQ", 1, Kind.CALL, 0, 2**32 - 1, 1), "exceeds the 1024-byte limit"),
    (struct.pack("<BBHIQ", 1, Kind.CALL, 500, 4, 1), "declares 500 descriptors"),
])
def test_reader_rejects_bad_headers_before_allocating(header: bytes, why: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header + b"abcd")
        with pytest.raises(ProtocolError, match=why):
            FrameReader(b, max_frame=1024).read(5)


def test_read_timeout_is_one_deadline_and_a_large_frame_resumes() -> None:
    a, b = socket.socketpair()
    with a, b:
        body = os.urandom(3 * 1024 * 1024)  # larger than the reader's buffer
        frame = _wire.pack_header(Kind.REPLY, 7, len(body)) + body
        reader = FrameReader(b)
        stop = threading.Event()
        sent = [len(frame) // 2]

        def trickle() -> None:  # half the frame, then a little every 50 ms
            a.sendall(frame[: sent[0]])
            while not stop.wait(0.05):
                a.sendall(frame[sent[0]: sent[0] + 10])
                sent[0] += 10

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                reader.read(0.5)  # each wait is short; the whole read is not
            assert time.monotonic() - start < 0.5 + 1.0
        finally:
            stop.set()
            sender.join(10)
        rest = threading.Thread(target=a.sendall, args=(frame[sent[0]:],))
        rest.start()
        kind, ident, got, fds = reader.read(10)  # goes on where it was
        rest.join(10)
        assert (kind, ident, fds, got == body) == (Kind.REPLY, 7, [], True)


def test_a_timed_call_carries_its_deadline_and_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        reader = FrameReader(b)
        for body, fds in ((b"x" * 100, []), (b"y" * (1024 * 1024), [r])):
            deadline = time.monotonic() + 5
            sender = threading.Thread(target=_wire.send_call_by, args=(a, 7, body, fds,
                                                                       deadline))
            sender.start()
            kind, ident, got, got_fds = reader.read(5)
            sender.join(10)
            assert (kind, ident, len(got_fds)) == (Kind.TIMED_CALL, 7, len(fds))
            assert _wire.take_deadline(got) == deadline  # (a f64, bit for bit)
            assert got == body
            for fd in got_fds:
                os.close(fd)
        with pytest.raises(ProtocolError, match="no deadline"):
            _wire.take_deadline(bytearray(b"short"))
    finally:
        for sock in (a, b):
            sock.close()
        for fd in (r, w):
            os.close(fd)


def test_sending_by_a_deadline_gives_up_when_nobody_reads() -> None:
    a, b = socket.socketpair()
    with a, b:
        started = time.monotonic()
        with pytest.raises(_wire.SendTimeout) as caught:  # more than a socket buffer
            _wire.send_call_by(a, 1, b"z" * (8 * 1024 * 1024), [], started + 0.3)
        assert time.monotonic() - started < 0.3 + 1.5
        assert 0 < caught.value.sent < 8 * 1024 * 1024  # the start of a frame left
        b.setblocking(False)
        while True:  # read what left, then the socket has room again
            try:
                b.recv(1024 * 1024)
            except BlockingIOError:
                break
        with pytest.raises(_wire.SendTimeout) as caught:  # a full buffer: nothing leaves
            while True:
                _wire.send_call_by(a, 2, b"w" * 1000, [], time.monotonic() + 0.1)
        assert caught.value.sent == 0


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(_wire.pack_header(Kind.CALL, 1, 100) + b"short")
        a.close()
        with pytest.raises(ProtocolError, match="middle of a frame"):
            FrameReader(b).read(5)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n",
    struct.pack("<BBHIQ", 1, Kind.CALL, 0, 2**31, 1),  # huge declared length
    struct.pack("<BBHIQ", 1, Kind.CALL, 0, 10, 1) + b"abc",  # truncated, then EOF
    hello() + _wire.pack_header(Kind.CALL, 1, 5) + b"\x80\x05junk",  # garbage payload
    hello() + _wire.pack_header(Kind.EVENT, 1, 0),  # wrong kind for the role
    hello("nonsense"),
    _wire.pack_header(Kind.HELLO, 0, 4) + b"[1,2",  # malformed JSON
    _wire.pack_header(Kind.CALL, 1, 0),  # no HELLO first
])
def test_bad_connection_is_closed_and_others_are_served(spawn, garbage: bytes) -> None:
    spawn(SERVER)
    with localnet.Peer(name="client"):
        address = localnet.peer("server").address
        bad = raw_connect(address)
        bad.sendall(garbage)
        if garbage.endswith(b"abc") or garbage == b"GET / HTTP/1.1\r\n\r\n":
            bad.shutdown(socket.SHUT_WR)
        if b"junk" in garbage:
            # a payload that cannot be unpickled is answered with an error,
            # and the connection stays usable
            reader = FrameReader(bad)
            kind, ident, body, _ = reader.read(10)
            assert (kind, ident) == (Kind.ERROR, 1)
            bad.close()
        else:
            assert closed_by_other_side(bad)
        assert localnet.peer("server").echo("still serving") == "still serving"


def test_unpickling_a_bad_payload_runs_nothing(spawn, tmp_path: Path) -> None:
    server = spawn(SERVER)
    marker = tmp_path / "should-not-exist"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.mkdir, (str(marker),))

    body = pickle.dumps(Evil(), 5)
    with localnet.Peer(name="client"):
        address = localnet.peer("server").address
        # a well-formed payload behind an unknown role is never unpickled
        bad = raw_connect(address)
        bad.sendall(hello("nonsense") + _wire.pack_header(Kind.CALL, 1, len(body)) + body)
        assert closed_by_other_side(bad)
        assert not marker.exists()
    assert server.proc.poll() is None


def test_registry_survives_garbage(runtime_dir: Path) -> None:
    with localnet.Peer(name="first"):
        address = str(runtime_dir / "registry.sock")
        for garbage in (b"\x00" * 64, struct.pack("<BBHIQ", 1, Kind.REQUEST, 0, 2**30, 1),
                        _wire.pack_header(Kind.REQUEST, 1, 3) + b"{{{",
                        _wire.pack_header(Kind.CALL, 1, 0)):
            bad = raw_connect(address)
            bad.sendall(garbage)
            bad.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = bad.recv(4096)
                if not chunk:
                    break
                got += chunk
            bad.close()
        # wrong types inside a well-formed request get an error reply
        sock = raw_connect(address)
        reader = FrameReader(sock)
        for request in (["register", {"info": {"name": 5}}], ["nope", {}], [1, 2],
                        ["subscribe", {"sub": {"id": 1}}], ["lookup", {"name": None}]):
            body = _wire.encode_control(request)
            _wire.send_frame(sock, Kind.REQUEST, 9, body)
            kind, ident, reply_body, _ = reader.read(10)
            reply = _wire.decode_control(reply_body)
            assert kind == Kind.RESPONSE and ident == 9
            assert isinstance(reply, dict)
            if request[0] != "lookup":
                assert reply["ok"] is False, request
        sock.close()
        with localnet.Peer(name="second"):
            assert [p.name for p in localnet.peers()] == ["first"]
