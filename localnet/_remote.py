"""The calling side: a channel to a remote peer, and the RemotePeer proxy.

A :class:`CallChannel` is one Unix-socket connection from this peer to
another that carries one call at a time: the calling thread sends its
request and reads the reply itself, on the same thread.  A peer keeps a
pool of them per remote peer and a call checks one out for its duration
(:mod:`localnet._calls`), so concurrent calls travel on connections of
their own and the callee runs them at once.

Why no reader thread: a background thread that reads replies and hands them
to the waiting callers costs a thread switch per call, as much as the whole
socket round trip on a small machine.  Why no sharing of a connection
between concurrent calls: the callee would then have to read the next
request while the previous one still runs, which costs it a thread hand-off
per call or a delay.  A connection per call in flight costs neither.

A call that ends without its reply (timeout, KeyboardInterrupt, a broken
connection) leaves its channel unusable (``broken``): a reply may still be
on its way, or half read.  The pool drops it; the next call takes another.

A call with a timeout has a deadline (``time.monotonic()``), from its start:
connecting, sending and waiting for the reply all end by it (the socket
stays blocking for calls without one: each send is made with MSG_DONTWAIT
and a full buffer waited on with poll(); connect() waits under
SO_SNDTIMEO).  The request carries the deadline (a ``TIMED_CALL`` frame), so
a callee that reads it too late does not run it.  A call that timed out
before the callee read all of it (a stopped callee) leaves its request, and
any shared memory sent with it, in the callee's socket queue: the kernel
keeps it there until the callee reads it or exits, whatever this side does.
So such a channel is not closed but kept :meth:`~CallChannel.abandon`-ed,
shut for writing, until the callee has read it (:meth:`~CallChannel.unread`
is 0); the caller sends nothing more to that peer meanwhile (see
:mod:`localnet._calls`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from typing import Any, Protocol

from . import _liveness
from ._timeouts import check_timeout
from ._wire import (
    DEFAULT_MAX_FRAME,
    CutShort,
    FrameReader,
    FrameTooLarge,
    Kind,
    ProtocolError,
    SendTimeout,
    encode_control,
    send_call_by,
    send_frame,
    send_frame_by,
)
from .errors import ConnectionLost, PeerClosed, SerializationError, Timeout, UnknownConnection

try:
    from . import _fastcall
except ImportError:  # built without a C compiler: the Python framing does it all
    _fastcall = None  # type: ignore[assignment]
# Set to None to use the Python framing (the tests run both).
_roundtrip = None if _fastcall is None else _fastcall.roundtrip

_CALL, _REPLY, _ERROR, _TAKEN = int(Kind.CALL), int(Kind.REPLY), int(Kind.ERROR), int(Kind.TAKEN)
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ on Linux: bytes the peer has not read
_INT = struct.Struct("i")


class _SendFailed(Exception):
    """The socket was broken while a request was sent (``error``: its OSError)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class NotSent(ConnectionLost):
    """The connection was found broken before the request left: safe to retry.

    Internal: the caller retries once on a fresh connection and reports a
    plain ConnectionLost if that fails too.
    """


class CallChannel:
    """A connection to one remote peer for calls, one call at a time.

    One thread uses it at a time (the pool checks it out); :meth:`close` may
    come from any thread and wakes a call waiting on it.
    """

    def __init__(self, address: str, target: str, hello: dict[str, Any],
                 max_frame: int = DEFAULT_MAX_FRAME, deadline: float | None = None,
                 spin: float = 0.0) -> None:
        """Connect and say HELLO, by ``deadline`` when given.  A call polls for
        its answer ``spin`` seconds before it sleeps (with the C extensions).

        Raises ConnectionLost, or Timeout when the deadline passed first (a
        stopped peer whose queue of connections is full, say).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if deadline is None:
                sock.connect(address)
            else:
                _connect_by(sock, address, deadline)
            if not _liveness.same_user(sock):
                raise ConnectionLost(f"peer {target!r} runs as another user; refusing it")
            send_frame_by(sock, Kind.HELLO, 0, encode_control(hello), deadline)
        except (TimeoutError, BlockingIOError):  # (both OSErrors: first)
            sock.close()
            raise Timeout(f"peer {target!r} did not accept a connection within the timeout "
                          "(it is stopped or overloaded)") from None
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot connect to peer {target!r}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self.target = target
        self.address = address
        self._sock = sock
        self._reader = FrameReader(sock, max_frame)
        self._spin = spin
        self._next = 1  # the next request id
        self._busy = False  # a call is using the socket: only that call closes it
        self._closed = False
        self.broken: BaseException | None = None  # why it cannot carry another call

    def __repr__(self) -> str:
        state = "BROKEN" if self.broken is not None else "BUSY" if self._busy else "IDLE"
        return f"<CallChannel to {self.target!r} [{state}]>"

    def request(self, payload: bytes, deadline: float | None,
                fds: list[int] | tuple[int, ...] = ()
                ) -> tuple[int, bytes | bytearray, list[int], int]:
        """Send one call and return the ``(kind, body, fds, id)`` of its answer.

        With a ``deadline`` (``time.monotonic()``) the call goes as a
        TIMED_CALL, and sending and waiting both end by it.

        Raises:
            NotSent: the connection was found broken before the request left.
            ConnectionLost: the connection broke or the peer went away.
            PeerClosed: this peer closed the channel (see :meth:`close`).
            Timeout: no answer by ``deadline``.
        Any of these, or an exception such as KeyboardInterrupt on the way,
        leaves the channel ``broken``; after a timeout or an interruption its
        socket stays open until :meth:`abandon` or :meth:`close`.
        """
        if self.broken is not None:
            raise self._fail(NotSent(f"the connection to peer {self.target!r} is closed"))
        ident = self._next
        self._next = ident + 1
        self._busy = True
        # A failure is raised after its except block, with no local left
        # pointing at it: raised inside, it would carry the low-level error as
        # its context, whose traceback holds the frames (and the half-read
        # reply) for as long as anyone keeps the exception, and the frame
        # holding it would make a cycle only the garbage collector breaks.
        error: BaseException | None = None
        cause: BaseException | None = None
        try:
            if _roundtrip is not None and not fds:
                answer = _roundtrip(self._sock.fileno(), ident, payload, deadline,
                                    self._reader.max_frame, self._spin)
                if answer[0] < 0:
                    answer = self._finish(answer, deadline)
            else:
                self._send(ident, payload, fds, deadline)
                answer = self._reader.read(None if deadline is None
                                           else deadline - time.monotonic())
            kind, got, body, got_fds = answer
            if got != ident or (kind != _REPLY and kind != _ERROR):
                _close_fds(got_fds)
                raise ProtocolError(f"unexpected {Kind(kind).name} frame (id {got}, "
                                    f"expected {ident}) on a call channel")
        except SendTimeout:  # (a TimeoutError: first)
            error = self._fail(Timeout(f"peer {self.target!r} did not take the call within "
                                       "the timeout (it is stopped or overloaded)"), False)
        except _SendFailed as exc:
            error = self._fail(NotSent(f"peer {self.target!r} went away: {exc.error}"))
            cause = exc.error
        except TimeoutError:
            error = self._fail(Timeout(f"peer {self.target!r} did not answer within the "
                                       "timeout"), False)
        except EOFError:
            error = self._fail(ConnectionLost(f"peer {self.target!r} closed the "
                                              "connection"))
        except FrameTooLarge as exc:
            error = self._fail(SerializationError(
                f"peer {self.target!r} answered with {exc.length} bytes inline, over "
                f"this peer's {exc.limit}-byte message limit (its max_frame); raise "
                "max_frame here, or return large data as NumPy arrays/bytearrays so it "
                "goes through shared memory"))
        except (OSError, ProtocolError) as exc:
            error = self._fail(ConnectionLost(f"peer {self.target!r} went away: {exc}"))
            cause = exc
        except BaseException:
            self._reader.drop_partial()
            self._fail(ConnectionLost("a call was interrupted"), False)
            raise
        if error is not None:
            self._reader.drop_partial()  # the half reply, if any: nobody will read on
            try:
                raise error from cause
            finally:
                error = cause = None
        self._busy = False
        if self.broken is not None:  # closed meanwhile; the answer came anyway
            self._close_socket()
        return kind, body, got_fds, ident

    def _send(self, ident: int, payload: bytes, fds: list[int] | tuple[int, ...],
              deadline: float | None) -> None:
        """Send a request through the Python framing (descriptors, or no C extension).

        Raises SendTimeout, or _SendFailed around the OSError of a broken socket.
        """
        try:
            if deadline is None:
                send_frame(self._sock, _CALL, ident, payload, fds)
            else:
                send_call_by(self._sock, ident, payload, fds, deadline)
        except SendTimeout:
            raise
        except OSError as exc:
            raise _SendFailed(exc) from None

    def _finish(self, answer: tuple[Any, Any, Any, Any], deadline: float | None
                ) -> tuple[int, int, bytes | bytearray, list[int]]:
        """What the C round trip could not complete (see localnet/_fastcall.c): raise
        as the Python path would, or let the Python reader finish a large reply."""
        status, first, second, third = answer
        assert _fastcall is not None
        if status == _fastcall.LARGE:
            kind, ident, nfds, length = first
            self._reader.resume(kind, ident, nfds, length, second, third)
            return self._reader.read(None if deadline is None else deadline - time.monotonic())
        if status == _fastcall.SEND_TIMEOUT:
            raise SendTimeout(first)
        if status == _fastcall.SEND_FAILED:
            raise _SendFailed(first)
        if status == _fastcall.RECV_TIMEOUT:
            raise TimeoutError("timed out waiting for a frame")
        if status == _fastcall.EOF:
            raise EOFError("connection closed")
        if status == _fastcall.CUT_SHORT:
            raise CutShort("connection closed in the middle of a frame")
        if status == _fastcall.BAD_HEADER:
            self._reader.reject(*first)
        raise ProtocolError(str(first))

    def taken(self, ident: int) -> None:
        """Tell the callee we mapped the shared memory of answer ``ident``."""
        try:
            send_frame(self._sock, _TAKEN, ident)
        except OSError:
            pass  # the callee went away; it settles its segments itself

    def _fail(self, error: BaseException, close: bool = True) -> BaseException:
        """Mark the channel broken and close it (``close``, or when this peer closed it);
        what the failed call raises."""
        local = self.broken
        if local is None:
            self.broken = error
        self._busy = False
        if close or local is not None:
            self._close_socket()
        if isinstance(local, PeerClosed):  # this peer closed it: say so
            return PeerClosed(str(local))
        return error

    def abandon(self) -> bool:
        """After a call that ended without its reply: close, unless the peer has yet to
        read the request.

        Returns True when the channel is kept: its socket shut for writing
        (the peer reads the request, then the end), so that what the peer has
        not read stays known (:meth:`unread`) until it has; then
        :meth:`close` it.
        """
        if self.broken is None:
            self.broken = ConnectionLost(f"the connection to peer {self.target!r} was closed")
        if self.unread():
            try:
                self._sock.shutdown(socket.SHUT_WR)
                return True
            except OSError:
                pass
        self.close()
        return False

    def unread(self) -> int:
        """Bytes sent on this channel that the peer has not read yet (0 once closed)."""
        if self._closed or _OUTQ is None:
            return 0
        try:
            return int(_INT.unpack(fcntl.ioctl(self._sock.fileno(), _OUTQ, b"\0" * 4))[0])
        except OSError:
            return 0

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed), to poll an abandoned channel."""
        return -1 if self._closed else self._sock.fileno()

    def close(self, error: BaseException | None = None) -> None:
        """Close the channel; idempotent.

        A call waiting on it fails with ``error`` when that is a
        :class:`PeerClosed` (this peer is closing), else with the reason it
        would have had anyway.
        """
        if self.broken is None:
            self.broken = error or ConnectionLost(
                f"the connection to peer {self.target!r} was closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a call blocked on it
        except OSError:
            pass
        if not self._busy:  # else the call closes it when it wakes
            self._close_socket()

    def _close_socket(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.close()
            self._sock.close()

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Close this process's copy of the socket only: no shutdown(), no reads.

        The parent goes on using the connection; every reply on it is for a
        call of the parent's.
        """
        self.broken = ConnectionLost(f"the connection to peer {self.target!r} was the "
                                     "parent process's")
        self._closed = True
        self._reader.close()
        self._sock.close()


def _connect_by(sock: socket.socket, address: str, deadline: float) -> None:
    """connect() by ``deadline``.

    A Unix socket's connect() waits while the listener's backlog is full
    (its peer stopped or overloaded) for as long as SO_SNDTIMEO allows, then
    fails with EAGAIN (BlockingIOError); a non-blocking one would fail at
    once, with nothing to poll for.  The timeout is cleared afterwards.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the deadline passed before connecting")
    seconds, micros = divmod(max(1, int(remaining * 1e6)), 1_000_000)  # (0, 0): no limit
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
    sock.connect(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Caller(Protocol):
    """What a RemotePeer needs from the local peer that made it."""

    def call(self, target: Any, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        ...


class RemoteConnections:
    """``remote.fn``: every connection of a peer by attribute, whatever its name.

    ``remote.fn.describe(7)`` calls the peer's connection ``describe`` even
    though ``remote.describe`` is a RemotePeer method; this namespace has no
    attributes of its own to hide a connection.

    Raises (on attribute access): :class:`UnknownConnection` when the peer
    does not offer that connection.
    """

    __slots__ = ("_remote",)

    def __init__(self, remote: RemotePeer) -> None:
        self._remote = remote

    def __getattr__(self, connection: str) -> Any:
        if connection.startswith("__"):
            raise AttributeError(connection)
        remote = self._remote
        if connection not in remote._info.get("connections", []):  # noqa: SLF001
            raise UnknownConnection(connection, remote.name, remote.connections)
        via = remote._via  # noqa: SLF001

        def call(*args: Any, **kwargs: Any) -> Any:
            return via.call(remote, connection, args, kwargs, None)

        call.__name__ = connection
        call.__qualname__ = f"{remote.name}.{connection}"
        return call

    def __dir__(self) -> list[str]:
        return sorted(self._remote.connections)

    def __repr__(self) -> str:
        return f"<connections of peer {self._remote.name!r}: {', '.join(self.__dir__())}>"


#: RemotePeer's own attributes: ``remote.<one of these>`` is never a connection.
RESERVED = frozenset({
    "name", "pid", "group", "hub", "connections", "events", "subscriptions", "started",
    "since", "user", "executable", "address", "host", "describe", "call", "fn"})


class RemotePeer:
    """Another live peer, as the registry described it.

    Its connections, three ways:

    - ``remote.fn.render(7)`` reaches every connection, whatever its name;
    - ``remote.call("render", 7, timeout=5)`` too, with an optional timeout
      (so ``timeout=`` is not passed on to the connection);
    - ``remote.render(7)``, a shortcut, reaches connections whose names are
      not RemotePeer's own attributes (:data:`RESERVED`: ``name``, ``pid``,
      ``group``, ``hub``, ``connections``, ``events``, ``subscriptions``,
      ``started``, ``since``, ``user``, ``executable``, ``address``, ``host``,
      ``describe``, ``call``, ``fn``).  For those names the attribute keeps
      its meaning; ``describe()`` given arguments and ``call()`` given a
      first argument that is not a name raise a ``TypeError`` that points to
      ``remote.fn``, rather than guessing.

    Attributes: ``name``, ``pid``, ``group``, ``hub``, ``connections``,
    ``events``, ``subscriptions``, ``started`` (when its process began, epoch
    seconds), ``since`` (when the peer went live), ``user``, ``executable``,
    ``host`` (None on this host; for another host's peer, joined through
    NATS, its host, and ``name`` is ``name@host``).

    Raises (on attribute access): :class:`UnknownConnection` when the peer
    does not offer that connection.
    """

    def __init__(self, info: dict[str, Any], via: Caller) -> None:
        self._info = info
        self._via = via

    name = property(lambda self: str(self._info["name"]))
    pid = property(lambda self: int(self._info["pid"]))
    group = property(lambda self: self._info.get("group"))
    hub = property(lambda self: bool(self._info.get("hub")))
    connections = property(lambda self: list(self._info.get("connections", [])))
    events = property(lambda self: list(self._info.get("events", [])))
    subscriptions = property(lambda self: [s["event"] for s in self._info.get("subscriptions", [])])
    started = property(lambda self: float(self._info["started"]))
    since = property(lambda self: float(self._info.get("since", self._info["started"])))
    user = property(lambda self: self._info.get("user"))
    executable = property(lambda self: self._info.get("executable"))
    address = property(lambda self: str(self._info["address"]))
    host = property(lambda self: self._info.get("host"))

    @property
    def fn(self) -> RemoteConnections:
        """Every connection of this peer by attribute: ``remote.fn.describe(7)``."""
        return RemoteConnections(self)

    def describe(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A copy of everything the registry knows about this peer.

        Raises TypeError when given arguments (``remote.fn.describe(...)``
        calls a connection named ``describe``).
        """
        if args or kwargs:
            raise TypeError(self._shadowed("describe", "takes no arguments"))
        return dict(self._info)

    def call(self, connection: str, /, *args: Any, timeout: float | None = None,
             **kwargs: Any) -> Any:
        """Call ``connection`` in this peer and return its result.

        Raises ConfigurationError, before anything is sent, when ``timeout``
        is not None or a positive number of seconds; TypeError when
        ``connection`` is not a name.
        """
        if type(connection) is not str:
            raise TypeError(self._shadowed(
                "call", f"takes the connection's name first, not {connection!r}, "
                "as in remote.call('render', 7)"))
        return self._via.call(self, connection, args, kwargs, check_timeout(timeout))

    def _shadowed(self, attribute: str, problem: str) -> str:
        text = f"RemotePeer.{attribute}() {problem}"
        if attribute in self._info.get("connections", []):
            text += (f"; peer {self.name!r} offers a connection named {attribute!r}: "
                     f"call it as remote.fn.{attribute}(...) or remote.call({attribute!r}, ...)")
        return text

    def __getattr__(self, connection: str) -> Any:
        if connection.startswith("__"):
            raise AttributeError(connection)
        return getattr(RemoteConnections(self), connection)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.connections))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemotePeer):
            return NotImplemented
        return (self.name, self.pid, self.started) == (other.name, other.pid, other.started)

    def __hash__(self) -> int:
        return hash((self.name, self.pid))

    def __repr__(self) -> str:
        extra = f" group={self.group!r}" if self.group else ""
        extra += " hub" if self.hub else ""
        return f"<RemotePeer {self.name!r} pid={self.pid}{extra}>"

    def __reduce__(self) -> Any:
        # A RemotePeer sent to another process arrives as its name.
        return (str, (self.name,))
