"""The serving side: a peer's listening socket and its incoming connections.

Each accepted connection is checked with SO_PEERCRED (another user's
process is dropped before a byte is read), then announces its role in a
``HELLO`` frame:

* ``call``: a caller's channel.  Served by leader/followers: the thread
  holding the reading role reads a request, runs the handler and writes
  the reply itself, with no hand-off between threads.  A request read
  after its deadline (a ``TIMED_CALL`` whose caller has given up: this
  peer was stopped, say) is not run; its answer is a Timeout error.  localnet callers
  send one call at a time on a connection (a connection per call in
  flight), so that is all it takes.  For a client that sends more while a
  handler runs, a watchdog passes the reading role to another thread of the
  connection (an idle one, or a new one up to ``max_workers``) once a
  handler has run for 10 ms and a request is waiting.  A peer runs at most
  ``max_workers`` calls at once in all (see ``Receiver.run_call``).
  Where ``localnet._fastcall`` is built, the reading role's loop is C
  (``serve_calls``, localnet/_fastserve.c) while the calls that arrive are
  plain, one whole frame per receive: it does what the Python loop does, in
  the same order and under the same locks, and hands back anything else
  (control frames, descriptors, pipelined frames, expired calls, calls while
  stopping, results in shared memory, a hand-over) to the Python loop.  It
  runs a plain call itself too, as ``Receiver.run_call`` would (see
  ``Receiver.plain_calls``).
* ``events``: a publisher's channel.  One thread reads events, runs the
  handlers in order and acknowledges the last one handled whenever it has
  nothing more buffered, so acknowledgements are batched under load and
  immediate otherwise.  An acknowledgement names the events among them
  that failed (see ``_wire.pack_ack``), if any.

A malformed or oversized frame, or a protocol violation, closes that one
connection (and is logged); everyone else is served on.

Winding down (``wind_down``, then ``close``): from the moment a peer starts
to close (SIGTERM in ``serve_forever``, ``close()``), a call read from any
connection is answered with :class:`~localnet.errors.PeerStopping` without
running, except calls from a subscriber's handler for this peer's events,
which the closing peer's ``flush()`` may be waiting on (until ``close``).  Calls already
running finish and send their replies (``close`` waits for them up to its
``drain``).  Then each call connection is shut for reading only: requests
already sent are still read and answered (refused), a caller that sends
later finds the connection closed before its request left (its call tries
again, and finds the peer gone), so no caller is left with a request that
went unanswered for no reason it can tell.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _deadlock, _liveness
from ._listen import ListeningSocket
from ._ring import RING_MARK, RingReader, translate
from ._serial import Payload, dumps_exception
from ._signals import current_mask, spawn_thread
from ._wire import (
    EVENT_BATCH,
    CutShort,
    Frame,
    FrameReader,
    Kind,
    ProtocolError,
    close_fds,
    decode_control,
    pack_ack,
    send_frame,
    take_deadline,
)
from .errors import PeerStopping

logger = logging.getLogger("localnet.server")

_HELLO_TIMEOUT = 10.0
HAND_OVER_AFTER = 0.01  # a handler running longer than this hands the connection on
_REFUSE_GRACE = 0.25  # how long close() lets connections answer refused calls past its drain
_CALL, _EVENT, _ACK = int(Kind.CALL), int(Kind.EVENT), int(Kind.ACK)
_TIMED_CALL, _ERROR = int(Kind.TIMED_CALL), int(Kind.ERROR)

# The plain calls' loop in C (localnet/_fastserve.c), None where it was not built.
_serve_calls: Callable[..., tuple[Any, Any, Any, Any]] | None
try:
    from ._fastcall import SHARED as _SHARED
    from ._fastcall import serve_calls as _serve_calls
except ImportError:  # built without a C compiler
    _serve_calls = None
    _SHARED = -2


class Host(Protocol):
    """What the server needs from its peer."""

    name: str
    max_frame: int
    max_workers: int

    def run_call(self, body: bytes | bytearray, fds: list[int]) -> tuple[int, bytes | Payload]:
        ...

    # The C loop (_fastserve.c) runs plain calls itself with these, and polls
    # a lone caller's connection this many seconds before it sleeps.
    plain_calls: tuple[Any, ...] | None
    spin: float

    def finish(self, result: Any, connection: str, plain: bytes | None = None,
               inline: bool = False) -> tuple[int, bytes | Payload]:
        ...

    def failed(self, exc: BaseException) -> tuple[int, bytes]:
        ...

    def expired_call(self, fds: list[int]) -> bytes:
        ...

    def event_receiver(self, publisher: dict[str, Any]
                       ) -> Callable[[list[Frame]], list[list[int]]]:
        ...


class Server:
    """Listens on ``address`` and serves connections for ``host``."""

    def __init__(self, host: Host, address: str) -> None:
        self.host = host
        self.address = address
        self._listening = ListeningSocket(address)  # (its file is made again if removed)
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._event_channels: list[threading.Event] = []
        self._calls: set[_CallConnection] = set()
        self._calls_done = threading.Condition(self._lock)  # notified while closing
        self._closed = False
        self.closing = False
        self.stopping = False  # winding down: new calls are refused (see wind_down)
        self.refusal = b""  # the ERROR body they get
        self._thread: threading.Thread | None = None
        self._watchdog = _Watchdog()
        self.watch = self._watchdog.watch
        # Created by the thread that starts the peer: the threads that run
        # handlers get its signal mask, not the accepting thread's.
        self.mask = current_mask()

    def start(self) -> None:
        self._thread = spawn_thread(self._listening.serve, self._take, self._shed_idle_calls,
                                    name="localnet-accept")

    def _take(self, sock: socket.socket) -> None:
        """A new connection: checked, then served on a thread of its own."""
        if not _liveness.same_user(sock):
            logger.warning("refused a connection from another user's process")
            sock.close()
            return
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._socks.add(sock)
        spawn_thread(self._serve, sock, name="localnet-conn", mask=self.mask)

    def _shed_idle_calls(self) -> None:
        """Out of descriptors: close the call connections that run nothing.

        Their callers keep them idle in their pools, and connections waiting
        to be accepted would wait for them forever.  Each is shut for reading
        only: a request already sent is still served, and a caller's next
        request on it fails before it leaves, so it goes on a new connection.
        """
        with self._lock:
            idle = [c for c in self._calls if not c.busy_since]
        if idle:
            logger.debug("out of descriptors: closing %d idle call connections", len(idle))
        for conn in idle:
            conn.shut_reading()

    def _serve(self, sock: socket.socket) -> None:
        reader = FrameReader(sock, self.host.max_frame)
        handed_over = False
        try:
            kind, _, body, fds = reader.read(_HELLO_TIMEOUT)
            if kind != Kind.HELLO or fds:
                raise ProtocolError("a connection must start with HELLO")
            hello = decode_control(body)
            if not isinstance(hello, dict) or not isinstance(hello.get("name"), str):
                raise ProtocolError("malformed HELLO")
            role = hello.get("role")
            if role == "call":
                handed_over = True
                conn = _CallConnection(self, sock, reader, _deadlock.caller_handling(hello))
                with self._lock:
                    self._calls.add(conn)
                    closing = self.closing
                if closing:
                    conn.shut_reading()
                conn.run()
            elif role == "events":
                reader.max_frame = max(reader.max_frame, EVENT_BATCH)
                self._receive_events(sock, reader, hello)
            else:
                raise ProtocolError(f"unknown role {role!r}")
        except EOFError:
            pass
        except (TimeoutError, ProtocolError, OSError) as exc:
            logger.warning("closing a connection to %s: %s", self.host.name, exc)
        except Exception:
            logger.exception("a connection to %s failed", self.host.name)
        finally:
            if not handed_over:
                self.drop(sock, reader)

    def call_finished(self) -> None:
        """A call ended while the server closes: close() may be waiting for it."""
        with self._lock:
            self._calls_done.notify_all()

    def drop(self, sock: socket.socket, reader: FrameReader,
             conn: _CallConnection | None = None) -> None:
        with self._lock:
            self._socks.discard(sock)
            if conn is not None:
                self._calls.discard(conn)
            self._calls_done.notify_all()
        reader.close()
        sock.close()

    def _receive_events(self, sock: socket.socket, reader: FrameReader,
                        publisher: dict[str, Any]) -> None:
        receive = self.host.event_receiver(publisher)
        done = threading.Event()
        with self._lock:
            self._event_channels = [e for e in self._event_channels if not e.is_set()]
            self._event_channels.append(done)
        try:
            self._receive_loop(sock, reader, receive)
        finally:
            done.set()

    @staticmethod
    def _receive_loop(sock: socket.socket, reader: FrameReader,
                      receive: Callable[[list[Frame]], list[list[int]]]) -> None:
        read, drain = reader.read, reader.drain
        ring = RingReader()  # the publisher's event ring, once it sends from it
        try:
            while True:
                batch = [read()]  # waits for the next event,
                batch += drain()  # takes what came with it,
                ringed = False
                for kind, _, body, _ in batch:
                    if kind != _EVENT:
                        for frame in batch:
                            close_fds(frame[3])
                        raise ProtocolError(
                            f"unexpected {Kind(kind).name} frame on an event channel")
                    ringed = ringed or bool(body and body[0] == RING_MARK)
                if ringed:  # events in the publisher's ring: read them there
                    try:
                        translate(batch, ring)
                    except BaseException:
                        for frame in batch:
                            close_fds(frame[3])
                        raise
                failed = receive(batch)  # handles it all,
                if failed:  # and acknowledges it at once, naming what failed
                    sock.sendall(pack_ack(batch[-1][1], failed))
                else:
                    send_frame(sock, _ACK, batch[-1][1])
        finally:
            ring.close()

    def wind_down(self) -> None:
        """Refuse new calls from now on with PeerStopping; running ones go on.  Idempotent."""
        if not self.stopping:
            self.refusal = dumps_exception(PeerStopping(
                f"peer {self.host.name!r} is stopping and refused the call; it did not run"), "")
            self.stopping = True

    def close(self, drain: float = 0.0) -> None:
        """Stop accepting, close every connection and remove the socket file.

        With ``drain``, first wait up to that many seconds for publishers to
        close their event channels: events already on their way are handled
        and acknowledged (publishers close once told this peer has left).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.closing = True
        self.wind_down()
        self._watchdog.close()
        self._listening.close()
        deadline = time.monotonic() + drain
        with self._lock:
            channels = list(self._event_channels)
        for done in channels:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                break
        with self._lock:  # calls already running finish and send their replies
            while any(c.busy_since for c in self._calls):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._calls_done.wait(remaining)
            calls = list(self._calls)
        # Requests already sent are refused; then each connection reads its
        # end and closes (see the module docstring).
        for conn in calls:
            conn.shut_reading()
        grace = time.monotonic() + _REFUSE_GRACE
        with self._lock:
            while any(not c.busy_since for c in self._calls):
                remaining = grace - time.monotonic()
                if remaining <= 0:
                    break
                self._calls_done.wait(remaining)
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Let go of the parent's sockets: close this process's copies, nothing more.

        No shutdown() (it acts on the connection, which the parent still
        serves) and no unlink (the socket file is the parent's).
        """
        self._lock = threading.Lock()
        self._calls_done = threading.Condition(self._lock)
        self._closed = self.closing = True
        self._watchdog._closed = True
        self._listening._after_fork_in_child()
        socks, self._socks = list(self._socks), set()
        calls, self._calls = list(self._calls), set()
        for conn in calls:
            conn.closed = True
            conn.reader.close()  # descriptors received and not yet handed out
        for sock in socks:
            sock.close()


class _CallConnection:
    """Leader/followers over one caller's connection (see the module docstring).

    The thread holding the reading role runs each request itself, so quick
    requests, even pipelined ones, cost no thread switch.  The role passes
    to another thread of the connection (an idle one, or a new one up to
    ``max_workers``) when the server's watchdog sees a handler running
    longer than ``HAND_OVER_AFTER``.  ``generation`` counts hand-overs: a thread that
    finds it changed after its handler knows the role went on without it.
    """

    def __init__(self, server: Server, sock: socket.socket, reader: FrameReader,
                 handling: tuple[int, str] | None = None) -> None:
        self.server = server
        # (the caller's pid, a subscriber): calls from the thread running that
        # subscriber's handlers for our events (see _deadlock)
        self.handling = handling
        self.sock = sock
        self.reader = reader
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.idle: list[Any] = []
        self.threads = 1
        self.generation = 0
        self.busy_since = 0.0  # when the role holder began its handler; 0 while it reads
        self.closed = False
        self.results: dict[int, Payload] = {}  # replies in shared memory, until TAKEN
        self._poll: select.poll | None = None  # the watchdog's look at the socket

    def run(self) -> None:
        """The body of every thread of this connection."""
        server = self.server
        host = server.host
        reader, sock, lock, watch = self.reader, self.sock, self.lock, server.watch
        monotonic = time.monotonic
        serve = _serve_calls
        if self.handling is not None:
            _deadlock.serving(host.name, self.handling)
        try:
            while True:
                # While nothing is buffered, the C loop serves the plain calls
                # (_fastserve.c) and hands back what it leaves to this one.
                got = None if serve is None or not reader.empty else serve(
                    sock, reader.buffer, reader.max_frame, self, server, server._watchdog, host)
                if got is None or got[0] >= 0:
                    if got is None:
                        kind, ident, body, fds = reader.read()
                    else:
                        kind, ident, body, fds = got if got[0] else reader.read_on(got)
                    if kind != _CALL:
                        if kind != _TIMED_CALL:
                            self._control(kind, ident, fds)
                            continue
                        if monotonic() >= take_deadline(body):  # type: ignore[arg-type]
                            # its caller gave up before we read it: never run it
                            with self.send_lock:
                                send_frame(sock, _ERROR, ident, host.expired_call(fds))
                            continue
                    if server.stopping and (self.handling is None or server.closing):
                        close_fds(fds)  # winding down: refused, nothing runs
                        with self.send_lock:
                            send_frame(sock, _ERROR, ident, server.refusal)
                        continue
                    # No lock: only the watchdog hands over, and only once
                    # busy_since is set, which happens after this read.
                    generation = self.generation
                    self.busy_since = monotonic()
                    watch(self)
                    reply_kind, payload = host.run_call(body, fds)
                elif got[0] == _SHARED:  # ran there; its result is in shared memory
                    _, ident, (reply_kind, payload), generation = got
                else:  # ran and answered there; the role moved on or the connection closed
                    generation, payload = got[1], None
                if type(payload) is bytes:
                    with self.send_lock:
                        send_frame(sock, reply_kind, ident, payload)
                elif payload is not None:
                    assert isinstance(payload, Payload)
                    with lock:
                        self.results[ident] = payload
                    with self.send_lock:
                        send_frame(sock, reply_kind, ident, payload.body, payload.fds)
                with lock:
                    if self.closed:
                        return
                    if self.generation == generation:
                        self.busy_since = 0.0  # still the reader: read on
                        if self.server.closing:
                            self.server.call_finished()
                        continue
                    wake = threading.Lock()
                    wake.acquire()
                    self.idle.append(wake)
                wake.acquire()  # until the role comes back to this thread
                if self.closed:
                    return
        except EOFError:
            pass
        except (BrokenPipeError, ConnectionResetError, CutShort) as exc:
            # the caller gave up (timeout, interrupt) and closed its channel,
            # maybe while it was sending
            logger.debug("a caller of %s left before its reply: %s", host.name, exc)
        except (ProtocolError, OSError) as exc:
            if not self.closed:
                logger.warning("closing a call connection to %s: %s", host.name, exc)
        except Exception:
            logger.exception("a call connection to %s failed", host.name)
        self._close()

    def shut_reading(self) -> None:
        """Read what the caller sent, then end (see the module docstring: winding down)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _control(self, kind: int, ident: int, fds: list[int]) -> None:
        if kind != Kind.TAKEN:
            close_fds(fds)
            raise ProtocolError(f"unexpected {Kind(kind).name} frame on a call channel")
        with self.lock:
            done = self.results.pop(ident, None)
        if done is not None:
            done.settle()

    def _hand_over(self) -> None:
        """Give the reading role to another thread; called with the lock held."""
        if self.idle:
            self.generation += 1
            self.busy_since = 0.0
            self.idle.pop().release()
        elif self.threads < self.server.host.max_workers:
            self.generation += 1
            self.busy_since = 0.0
            self.threads += 1
            spawn_thread(self.run, name="localnet-call", mask=self.server.mask)

    def overdue(self, now: float) -> bool:
        """Called by the watchdog: hand over if the handler runs long; True while busy."""
        with self.lock:
            since = self.busy_since
            if not since or self.closed:
                return False
            # (Not while closing: the connection reads as ready at its end, and a
            # new reader would close it under the running handler.)
            if now - since >= HAND_OVER_AFTER and not self.server.closing \
                    and self._request_waiting():
                self._hand_over()
            return True

    def _request_waiting(self) -> bool:
        """Whether the caller sent more while the handler runs; called with the lock held.

        (Nobody reads meanwhile: the reading role is in the handler.)
        """
        if self.reader.has_frame():
            return True
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock.fileno(), select.POLLIN)
        return bool(self._poll.poll(0))

    def _close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            idle, self.idle = self.idle, []
            results, self.results = list(self.results.values()), {}
        for wake in idle:
            wake.release()
        for result in results:
            result.abandon()  # the caller may still map it from its buffer: never reuse
        self.server.drop(self.sock, self.reader, self)


class _Watchdog:
    """One thread per server that hands the reading role on when a handler runs long.

    It sleeps on an event while nothing runs; while handlers run it looks
    every ``HAND_OVER_AFTER`` seconds, so quick calls never wake anyone.
    """

    def __init__(self) -> None:
        self._busy: dict[_CallConnection, None] = {}
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._awake = False  # mirrors _wake, read without a lock on every call
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, conn: _CallConnection) -> None:
        self._busy[conn] = None
        if not self._awake:
            with self._start_lock:
                if self._thread is None:
                    self._thread = spawn_thread(self._loop, name="localnet-watchdog")
            self._awake = True
            self._wake.set()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            quiet = 0
            while not self._closed and quiet < 50:
                time.sleep(HAND_OVER_AFTER)  # the watchdog's period, not synchronisation
                now = time.monotonic()
                busy = False
                for conn in list(self._busy):
                    if conn.overdue(now):
                        busy = True
                    else:
                        self._busy.pop(conn, None)
                quiet = 0 if busy else quiet + 1
            self._awake = False
            self._wake.clear()
            if self._busy:
                self._awake = True
                self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
