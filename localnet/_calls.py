"""The calling side of a peer: channels to other peers, calls and their results.

A call checks a channel (one connection, :class:`~localnet._remote.CallChannel`)
out of the pool of idle channels to its target peer, or opens a new one, and
puts it back once the reply is in.  So a peer has as many connections to
another as it has calls in flight to it, whatever the number of threads
making them, and each travels and runs at once.  A lone thread's calls
reuse the same channel with no lock: ``deque.pop`` and ``append`` are atomic.

Limits: at most ``max_calls`` calls in flight (hence connections) from this
peer to any one peer; beyond it a call raises :class:`TooManyCalls` at once,
since waiting could deadlock nested callbacks (each level of a callback
chain between two peers holds a channel on the way).  A call that ends
without its reply (timeout, KeyboardInterrupt, the peer went away) drops
its channel: a late reply could otherwise be read by the next call.

A call made on a thread that runs dispatched work (an application's main
thread, see :mod:`localnet._dispatch`) is made by a helper thread while
that thread goes on running its dispatched work, so a callback of the
callee onto it completes.

A call with a timeout ends by its deadline, counted from its start, in
every step: waiting (see below), looking the peer up in the registry,
connecting, sending and reading the reply.  The deadline travels with the
request, and a callee that reads it too late skips it (see _remote).

A stopped or badly overloaded callee reads nothing: what a timed-out call
sent stays in its socket queue, shared memory included, until it reads it
or exits; closing our end frees nothing.  So a dropped channel whose
request the callee has not read yet is kept (``_Pool.unread``, see
``CallChannel.abandon``), and further calls to that peer send nothing
until the callee has read it: they wait for that, within their own
timeout, then go on or raise Timeout.  What a stopped callee holds of
this peer's is thus at most the calls that were in flight to it when it
stopped (at most ``max_calls``).
"""

from __future__ import annotations

import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import _deadlock, _serial, _transports
from ._current import RUNNING
from ._deadlock import _local as _home
from ._dispatch import pump_while
from ._remote import CallChannel, NotSent, RemotePeer
from ._serial import ENCODE_MAX
from ._serial import encode_call as _encode_call
from ._timeouts import check_timeout
from ._wire import Kind
from .errors import (
    ConnectionLost,
    PeerClosed,
    PeerNotFound,
    RegistryUnavailable,
    SerializationError,
    Timeout,
    TooManyCalls,
)

if TYPE_CHECKING:
    from ._peer import Peer

_REPLY = int(Kind.REPLY)


class _Pool:
    """The channels to one remote peer: the idle ones, and every open one."""

    __slots__ = ("idle", "open", "opening", "unread", "address", "limit", "callee_limit")

    def __init__(self, limit: int) -> None:
        self.idle: deque[CallChannel] = deque()
        self.open: set[CallChannel] = set()
        self.opening = 0  # channels being opened (they count towards max_calls)
        # dropped channels whose request the peer has not read yet (abandoned)
        self.unread: list[CallChannel] = []
        self.address: str | None = None  # where the peer listens, once known
        self.limit = limit  # the largest inline request: this peer's max_frame, or the callee's
        self.callee_limit: int | None = None  # the callee's max_frame, once known


class Caller:
    """Makes one peer's remote calls."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self._closed = False
        self.made = 0  # calls made (Stats.calls_made)

    def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``target``; return its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        TooManyCalls, SerializationError (before anything is sent).
        """
        if _home.homes is not None:  # an application thread that runs dispatched work
            return pump_while(self.call, target, connection, args, kwargs, timeout)
        peer = self._peer
        if peer.state is not RUNNING:
            peer.require_running()
        deadline = None
        if timeout is not None:
            deadline = time.monotonic() + check_timeout(timeout)  # type: ignore[operator]
        if type(target) is str:
            name = target
        else:
            name = target.name  # type: ignore[union-attr]
            if target.host is not None:  # type: ignore[union-attr]  # another host's
                return _transports.call(peer, name, connection, args, kwargs, deadline,
                                        PeerNotFound(name))
        # A thread running handlers for ``name``'s events calls it on channels
        # that say so (see _deadlock), kept apart from the others.
        handling = None if _home.receiving is None else _deadlock.handling_for(name)
        key = name if handling is None else f"{name}\0{handling}"
        pool = self._pools.get(key)
        if pool is not None and pool.unread:
            self._await_unread(pool, name, deadline)
        try:
            channel = pool.idle.pop()  # type: ignore[union-attr]
        except (AttributeError, IndexError):
            if "@" in name and (pool is None or not pool.open) \
                    and _transports.lookup(peer, name) is not None:
                # name@host of another host's peer (and no channel of this host's is
                # open under that name): no registry lookup each call
                return _transports.call(peer, name, connection, args, kwargs, deadline,
                                        PeerNotFound(name))
            try:
                pool, channel = self._open(key, target, handling, deadline)
            except PeerNotFound as exc:  # not on this host: on another, if joined
                return _transports.call(peer, name, connection, args, kwargs, deadline, exc)
        assert pool is not None
        try:
            # dumps_call, its C encoder called here (one Python frame fewer)
            plain = None if _encode_call is None else _encode_call(connection, args, kwargs,
                                                                   ENCODE_MAX)
            payload = plain if plain is not None else _serial.pickle_call(
                connection, args, kwargs, "an argument of", peer.shm_threshold)
            if len(payload) > pool.limit:
                refuse(payload, peer.max_frame, pool.callee_limit, name, connection)
        except BaseException:
            pool.idle.append(channel)
            raise
        self.made += 1
        try:
            if type(payload) is bytes:
                kind, body, fds, ident = channel.request(payload, deadline)
            else:
                assert isinstance(payload, _serial.Payload)
                kind, body, fds, ident = self._request_shared(channel, payload, deadline)
        except NotSent:
            # A stale connection (the peer restarted or died since this
            # channel was opened): nothing ran; look the peer up again.
            pool, channel, answer = self._retry(pool, channel, key, payload, deadline,
                                                handling)
            kind, body, fds, ident = answer
        except BaseException:
            self._drop(pool, channel)
            raise
        if kind == _REPLY:
            if not fds:
                pool.idle.append(channel)
                return _serial.loads(body, "the result of", None, connection)
            try:
                return _serial.loads(body, "the result of", fds, connection)
            finally:
                channel.taken(ident)
                pool.idle.append(channel)
        pool.idle.append(channel)
        raise _serial.loads_exception(body)

    @staticmethod
    def _request_shared(channel: CallChannel, payload: _serial.Payload, deadline: float | None
                        ) -> tuple[int, bytes | bytearray, list[int], int]:
        """A request whose payload has buffers in shared memory."""
        try:
            answer = channel.request(payload.body, deadline, payload.fds)
        except NotSent:
            raise  # nothing left: the payload goes again
        except BaseException:
            payload.abandon()  # the callee may read it later: never reuse
            raise
        payload.settle()  # answered: the callee holds what it still uses
        return answer

    def _retry(self, pool: _Pool, channel: CallChannel, key: str,
               payload: bytes | _serial.Payload, deadline: float | None, handling: str | None
               ) -> tuple[_Pool, CallChannel, tuple[int, bytes | bytearray, list[int], int]]:
        """Send again on a fresh channel after NotSent; drop the idle (stale) ones."""
        self._drop(pool, channel)
        with self._lock:
            stale = list(pool.idle)
            pool.idle.clear()
            pool.address = None
        for old in stale:
            self._drop(pool, old)
        try:
            pool, channel = self._open(key, key.partition("\0")[0], handling, deadline)
        except BaseException:
            if isinstance(payload, _serial.Payload):
                payload.settle()
            raise
        try:
            if type(payload) is bytes:
                answer = channel.request(payload, deadline)
            else:
                assert isinstance(payload, _serial.Payload)
                answer = self._request_shared(channel, payload, deadline)
        except NotSent as exc:
            self._drop(pool, channel)
            if isinstance(payload, _serial.Payload):
                payload.settle()
            raise ConnectionLost(str(exc)) from None
        except BaseException:
            self._drop(pool, channel)
            raise
        return pool, channel, answer

    def _open(self, key: str, target: str | RemotePeer, handling: str | None = None,
              deadline: float | None = None) -> tuple[_Pool, CallChannel]:
        """An idle channel of pool ``key`` if one came back meanwhile, else a new one.

        The registry lookup and connect() happen outside the lock (either may
        wait, up to ``deadline``); a channel being opened counts towards
        ``max_calls`` already.
        """
        peer = self._peer
        name = target if isinstance(target, str) else target.name
        with self._lock:
            if self._closed:
                raise PeerClosed(f"peer {peer.name!r} is closed")
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _Pool(peer.max_frame)
            try:
                return pool, pool.idle.pop()
            except IndexError:
                pass
            if len(pool.open) + pool.opening >= peer.max_calls:
                raise TooManyCalls(
                    f"peer {peer.name!r} already has {len(pool.open) + pool.opening} calls in "
                    f"flight to peer {name!r}, its limit (max_calls); raise it with "
                    f"Peer(max_calls=...)")
            pool.opening += 1
        channel = None
        try:
            address = pool.address
            if address is None and isinstance(target, RemotePeer):
                address = learn(pool, target.describe(), peer.max_frame)
            hello = {"role": "call", "name": peer.name, "pid": peer.pid}
            if handling is not None:
                hello["handling"] = handling
            for attempt in range(2):
                if address is None:
                    address = learn(pool, self._lookup(name, deadline), peer.max_frame)
                try:
                    channel = CallChannel(address, name, hello, peer.max_frame, deadline,
                                          peer.spin)
                    break
                except ConnectionLost:
                    if attempt:
                        raise PeerNotFound(name) from None
                    # the peer may have restarted: ask the registry again
                    pool.address = address = None
        finally:
            with self._lock:
                pool.opening -= 1
                if channel is not None:
                    if self._closed:  # close() ran meanwhile and could not see it
                        channel.close()
                        raise PeerClosed(f"peer {peer.name!r} was closed while its call to "
                                         f"peer {name!r} connected")
                    pool.open.add(channel)
        assert channel is not None
        return pool, channel

    def _lookup(self, name: str, deadline: float | None) -> dict[str, Any]:
        """The registry's record of peer ``name``, by ``deadline`` when given."""
        if deadline is None:
            return self._peer.lookup(name)
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                return self._peer.lookup(name, remaining)
            except RegistryUnavailable:
                if time.monotonic() < deadline:
                    raise
        raise Timeout(f"the registry did not tell where peer {name!r} is within the "
                      "timeout (it is stopped or overloaded)")

    def _await_unread(self, pool: _Pool, name: str, deadline: float | None) -> None:
        """Wait until peer ``name`` has read every request it was sent on ``pool``'s
        abandoned channels (a stopped peer reads none), or raise Timeout at ``deadline``.

        A peer that resumes reads them (and answers, or closes): that wakes
        the wait; so does each period, since a peer may read a request
        without answering yet.
        """
        period = 0.005
        while True:
            with self._lock:
                waiting = []
                for channel in pool.unread:
                    if channel.unread():
                        waiting.append(channel)
                    else:
                        channel.close()
                pool.unread[:] = waiting
            if not waiting:
                return
            wait = period
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(
                        f"peer {name!r} has not yet read {len(waiting)} earlier call(s) that "
                        "ended without an answer (it is stopped or overloaded); this call "
                        "was not sent")
                wait = min(wait, remaining)
            poller = select.poll()
            for channel in waiting:
                fd = channel.fileno()
                if fd >= 0:  # (-1: closed by another thread meanwhile)
                    poller.register(fd, select.POLLIN)
            poller.poll(wait * 1000.0)
            period = min(period * 2, 0.1)

    def _drop(self, pool: _Pool, channel: CallChannel) -> None:
        """Let go of a channel that will carry no other call.

        It is closed, unless the peer has yet to read what was sent on it:
        then it waits in ``pool.unread`` (see the module docstring).
        """
        kept = channel.abandon()
        with self._lock:
            pool.open.discard(channel)
            if kept:
                if self._closed:
                    channel.close()
                else:
                    pool.unread.append(channel)

    def channels(self, name: str) -> list[CallChannel]:
        """The open channels to peer ``name`` (for tests and diagnostics)."""
        with self._lock:
            pool = self._pools.get(name)
            return list(pool.open) if pool is not None else []

    def close(self) -> None:
        """Close every channel: calls still waiting raise PeerClosed."""
        with self._lock:
            self._closed = True
            pools, self._pools = self._pools, {}
            unread = [c for pool in pools.values() for c in pool.unread]
        for name, pool in pools.items():
            for channel in list(pool.open):
                channel.close(PeerClosed(
                    f"peer {self._peer.name!r} was closed while its call to peer {name!r} "
                    "waited for the answer"))
        for channel in unread:
            channel.close()

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Drop the parent's channels (their sockets are the parent's) and locks."""
        channels = [c for pool in self._pools.values() for c in (*pool.open, *pool.unread)]
        self._lock = threading.Lock()
        self._pools = {}
        for channel in channels:
            channel._after_fork_in_child()


def learn(pool: Any, info: dict[str, Any], own_limit: int) -> str:
    """Take the address and the message limit from a registry record into ``pool``
    (a thread or an awaited calls' pool); the address."""
    address = pool.address = str(info["address"])
    callee = info.get("max_frame")
    pool.callee_limit = callee if isinstance(callee, int) else None
    pool.limit = min(own_limit, pool.callee_limit or own_limit)
    return address


def refuse(payload: bytes | _serial.Payload, own: int, callee_limit: int | None, name: str,
           connection: str) -> None:
    """Raise SerializationError for a request over this peer's or the callee's limit."""
    if len(payload) > own or callee_limit is None:
        _serial.refuse_oversize(payload, own, f"an argument of {connection!r}")
    if isinstance(payload, _serial.Payload):
        payload.settle()
    raise SerializationError(
        f"the arguments of {connection!r} are {len(payload)} bytes inline, over the "
        f"{callee_limit}-byte message limit of peer {name!r} (its max_frame); "
        "raise max_frame there, or send large data as NumPy arrays/bytearrays so it "
        "goes through shared memory")
