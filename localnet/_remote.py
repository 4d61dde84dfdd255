"""The calling side: one channel per remote peer, and the RemotePeer proxy.

A :class:`CallChannel` is one Unix-socket connection from this peer to
another, shared by every thread of this process that calls that peer;
requests carry an id and replies may come back in any order.

Why no reader thread: a background thread that reads replies and hands them
to the waiting callers costs a thread switch per call, as much as the whole
socket round trip on a small machine.  Instead the channel uses
leader/followers: a calling thread that finds nobody reading becomes the
reader ("leader") and reads until its own reply arrives, handing any other
reply to the thread that waits for it; when it leaves, it wakes one waiting
caller to take over.  A lone caller therefore sends and reads its reply on
its own thread, and concurrent callers still share one connection.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Any, Protocol

from . import _liveness
from ._timeouts import check_timeout
from ._wire import DEFAULT_MAX_FRAME, FrameReader, Kind, ProtocolError, encode_control, send_frame
from .errors import ConnectionLost, Timeout, UnknownConnection

_allocate_lock = threading.Lock
_CALL, _REPLY, _ERROR, _TAKEN = int(Kind.CALL), int(Kind.REPLY), int(Kind.ERROR), int(Kind.TAKEN)


class _Call:
    __slots__ = ("wake", "signaled", "done", "kind", "body", "fds", "error")

    def __init__(self) -> None:
        self.wake = _allocate_lock()
        self.wake.acquire()
        self.signaled = False
        self.done = False
        self.kind = 0
        self.body: bytes | bytearray = b""
        self.fds: list[int] = []
        self.error: BaseException | None = None


class NotSent(ConnectionLost):
    """The connection was found broken before the request left: safe to retry."""


class CallChannel:
    """A connection to one remote peer for calls; thread-safe."""

    def __init__(self, address: str, target: str, hello: dict[str, Any],
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            if not _liveness.same_user(sock):
                raise ConnectionLost(f"peer {target!r} runs as another user; refusing it")
            send_frame(sock, Kind.HELLO, 0, encode_control(hello))
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
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Call] = {}
        self._role = threading.Lock()  # held by the thread reading answers
        self._ids = itertools.count(1)
        self._closed = False
        self.broken: BaseException | None = None

    def __repr__(self) -> str:
        state = "BROKEN" if self.broken else "OPEN"
        return f"<CallChannel to {self.target!r} pending={len(self._pending)} [{state}]>"

    def request(self, payload: bytes, timeout: float | None,
                fds: list[int] | tuple[int, ...] = ()
                ) -> tuple[int, bytes | bytearray, list[int], int]:
        """Send one CALL and return the ``(kind, body, fds, id)`` of its answer.

        Raises:
            ConnectionLost: the connection broke or the peer went away.
            Timeout: no answer within ``timeout`` seconds.
        """
        if self.broken is not None:
            raise NotSent(f"the connection to peer {self.target!r} is closed")
        ident = next(self._ids)
        # The reading role is a lock taken without blocking.  A lone caller
        # takes it and nothing else; a caller that finds it taken registers
        # first and then tries it, while a leaving reader releases it first
        # and then looks for registered callers: one of the two always sees
        # the other.
        lead = self._role.acquire(False)
        call = None
        if not lead:
            call = _Call()
            self._pending[ident] = call
            lead = self._role.acquire(False)
        try:
            with self._send_lock:
                send_frame(self._sock, _CALL, ident, payload, fds)
        except OSError as exc:
            error = NotSent(f"peer {self.target!r} went away: {exc}")
            self._break(error)
            if lead:
                self._leave_reading()
            raise error from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        if lead:
            return self._lead(ident, deadline)
        assert call is not None
        lock = self._lock
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._give_up(ident, call)
            elif not call.done:
                got = call.wake.acquire(True, -1 if remaining is None else remaining)
                with lock:
                    if got or call.signaled:
                        if not got:
                            call.wake.acquire()
                        call.signaled = False
            if call.done:
                if call.error is not None:
                    raise call.error
                return call.kind, call.body, call.fds, ident
            if self._role.acquire(False):
                if call.done:  # answered while we took the role
                    self._leave_reading()
                    continue
                return self._lead(ident, deadline)

    def taken(self, ident: int) -> None:
        """Tell the callee we mapped the shared memory of answer ``ident``."""
        try:
            with self._send_lock:
                send_frame(self._sock, _TAKEN, ident)
        except OSError:
            pass  # the callee went away; it settles its segments itself

    def _give_up(self, ident: int, call: _Call) -> None:
        with self._lock:
            if call.done:
                return
            self._pending.pop(ident, None)
            call.done = True
            call.error = Timeout(f"peer {self.target!r} did not answer within the timeout")

    def _signal(self, call: _Call) -> None:
        # called with self._lock held
        if not call.signaled:
            call.signaled = True
            call.wake.release()

    def _lead(self, ident: int, deadline: float | None
              ) -> tuple[int, bytes | bytearray, list[int], int]:
        """Read answers until the one for ``ident``; pass the others to their callers."""
        reader, lock, pending = self._reader, self._lock, self._pending
        try:
            while True:
                if deadline is None:
                    kind, got, body, fds = reader.read()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        with lock:
                            pending.pop(ident, None)
                        raise Timeout(f"peer {self.target!r} did not answer within the timeout")
                    try:
                        kind, got, body, fds = reader.read(remaining)
                    except TimeoutError:
                        continue
                if kind != _REPLY and kind != _ERROR:
                    _close_fds(fds)
                    raise ProtocolError(f"unexpected {Kind(kind).name} frame on a call channel")
                if got == ident:
                    if pending:
                        pending.pop(ident, None)
                    return kind, body, fds, ident
                with lock:
                    target = pending.pop(got, None)
                    if target is not None:
                        target.kind, target.body, target.fds = kind, body, fds
                        target.done = True
                        self._signal(target)
                if target is None and fds:  # the answer to a call that timed out
                    _close_fds(fds)
                    self.taken(got)
        except Timeout:
            raise  # a TimeoutError, hence an OSError: not a broken connection
        except EOFError:
            error: BaseException = ConnectionLost(f"peer {self.target!r} closed the connection")
        except (OSError, ProtocolError) as exc:
            error = ConnectionLost(f"peer {self.target!r} went away: {exc}")
        finally:
            self._leave_reading()
        self._break(error)
        raise error

    def _leave_reading(self) -> None:
        if self.broken is not None:
            self._close_socket()  # nobody will read again
        self._role.release()
        if self._pending:  # someone may be waiting for the role
            with self._lock:
                for other in list(self._pending.values()):
                    if not other.done:
                        self._signal(other)  # it takes over the reading
                        break

    def _break(self, error: BaseException) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = error
            calls = list(self._pending.values())
            self._pending.clear()
            for pending in calls:
                if not pending.done:
                    pending.done = True
                    pending.error = ConnectionLost(str(error))
                    self._signal(pending)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Fail pending calls and close the socket; idempotent."""
        self._break(ConnectionLost(f"the connection to peer {self.target!r} was closed"))
        if self._role.acquire(False):  # nobody reads: safe to close the socket now
            self._close_socket()
            self._role.release()

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
        self._pending = {}
        self._closed = True
        self._reader.close()
        self._sock.close()


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
    "since", "user", "executable", "address", "describe", "call", "fn"})


class RemotePeer:
    """Another live peer, as the registry described it.

    Its connections, three ways:

    - ``remote.fn.render(7)`` reaches every connection, whatever its name;
    - ``remote.call("render", 7, timeout=5)`` too, with an optional timeout
      (so ``timeout=`` is not passed on to the connection);
    - ``remote.render(7)``, a shortcut, reaches connections whose names are
      not RemotePeer's own attributes (:data:`RESERVED`: ``name``, ``pid``,
      ``group``, ``hub``, ``connections``, ``events``, ``subscriptions``,
      ``started``, ``since``, ``user``, ``executable``, ``address``,
      ``describe``, ``call``, ``fn``).  For those names the attribute keeps
      its meaning; ``describe()`` given arguments and ``call()`` given a
      first argument that is not a name raise a ``TypeError`` that points to
      ``remote.fn``, rather than guessing.

    Attributes: ``name``, ``pid``, ``group``, ``hub``, ``connections``,
    ``events``, ``subscriptions``, ``started`` (when its process began, epoch
    seconds), ``since`` (when the peer went live), ``user``, ``executable``.

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
