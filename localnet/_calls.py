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
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from . import _deadlock, _serial
from ._current import RUNNING
from ._remote import CallChannel, NotSent, RemotePeer
from ._timeouts import check_timeout
from ._wire import Kind
from .errors import ConnectionLost, PeerClosed, PeerNotFound, SerializationError, TooManyCalls

if TYPE_CHECKING:
    from ._peer import Peer

_REPLY = int(Kind.REPLY)


class _Pool:
    """The channels to one remote peer: the idle ones, and every open one."""

    __slots__ = ("idle", "open", "address", "limit", "callee_limit")

    def __init__(self, limit: int) -> None:
        self.idle: deque[CallChannel] = deque()
        self.open: set[CallChannel] = set()
        self.address: str | None = None  # where the peer listens, once known
        self.limit = limit  # the largest inline request: this peer's max_frame, or the callee's
        self.callee_limit: int | None = None  # the callee's max_frame, once known


class Caller:
    """Makes one peer's remote calls."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        self.made = 0  # calls made (Stats.calls_made)

    def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``target``; return its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        TooManyCalls, SerializationError (before anything is sent).
        """
        peer = self._peer
        if peer.state is not RUNNING:
            peer.require_running()
        if timeout is not None:
            timeout = check_timeout(timeout)
        name = target if type(target) is str else target.name  # type: ignore[union-attr]
        # A thread running handlers for ``name``'s events calls it on channels
        # that say so (see _deadlock), kept apart from the others.
        handling = _deadlock.handling_for(name)
        key = name if handling is None else f"{name}\0{handling}"
        pool = self._pools.get(key)
        try:
            channel = pool.idle.pop()  # type: ignore[union-attr]
        except (AttributeError, IndexError):
            pool, channel = self._open(key, target, handling)
        assert pool is not None
        try:
            payload = _serial.dumps_call(connection, args, kwargs, "an argument of",
                                         peer.shm_threshold)
            if len(payload) > pool.limit:
                self._refuse(payload, pool, name, connection)
        except BaseException:
            pool.idle.append(channel)
            raise
        self.made += 1
        try:
            if type(payload) is bytes:
                kind, body, fds, ident = channel.request(payload, timeout)
            else:
                assert isinstance(payload, _serial.Payload)
                kind, body, fds, ident = self._request_shared(channel, payload, timeout)
        except NotSent:
            # A stale connection (the peer restarted or died since this
            # channel was opened): nothing ran; look the peer up again.
            pool, channel, answer = self._retry(pool, channel, key, payload, timeout,
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
    def _request_shared(channel: CallChannel, payload: _serial.Payload, timeout: float | None
                        ) -> tuple[int, bytes | bytearray, list[int], int]:
        """A request whose payload has buffers in shared memory."""
        try:
            answer = channel.request(payload.body, timeout, payload.fds)
        except NotSent:
            raise  # nothing left: the payload goes again
        except BaseException:
            payload.abandon()  # the callee may read it later: never reuse
            raise
        payload.settle()  # answered: the callee holds what it still uses
        return answer

    def _retry(self, pool: _Pool, channel: CallChannel, key: str,
               payload: bytes | _serial.Payload, timeout: float | None, handling: str | None
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
            pool, channel = self._open(key, key.partition("\0")[0], handling)
        except BaseException:
            if isinstance(payload, _serial.Payload):
                payload.settle()
            raise
        try:
            if type(payload) is bytes:
                answer = channel.request(payload, timeout)
            else:
                assert isinstance(payload, _serial.Payload)
                answer = self._request_shared(channel, payload, timeout)
        except NotSent as exc:
            self._drop(pool, channel)
            if isinstance(payload, _serial.Payload):
                payload.settle()
            raise ConnectionLost(str(exc)) from None
        except BaseException:
            self._drop(pool, channel)
            raise
        return pool, channel, answer

    def _refuse(self, payload: bytes | _serial.Payload, pool: _Pool, name: str,
                connection: str) -> None:
        """Raise SerializationError for a request over this peer's or the callee's limit."""
        own = self._peer.max_frame
        if len(payload) > own or pool.callee_limit is None:
            _serial.refuse_oversize(payload, own, f"an argument of {connection!r}")
        if isinstance(payload, _serial.Payload):
            payload.settle()
        raise SerializationError(
            f"the arguments of {connection!r} are {len(payload)} bytes inline, over the "
            f"{pool.callee_limit}-byte message limit of peer {name!r} (its max_frame); "
            "raise max_frame there, or send large data as NumPy arrays/bytearrays so it "
            "goes through shared memory")

    def _open(self, key: str, target: str | RemotePeer,
              handling: str | None = None) -> tuple[_Pool, CallChannel]:
        """An idle channel of pool ``key`` if one came back meanwhile, else a new one."""
        peer = self._peer
        name = target if isinstance(target, str) else target.name
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = _Pool(peer.max_frame)
            try:
                return pool, pool.idle.pop()
            except IndexError:
                pass
            if len(pool.open) >= peer.max_calls:
                raise TooManyCalls(
                    f"peer {peer.name!r} already has {len(pool.open)} calls in flight to peer "
                    f"{name!r}, its limit (max_calls); raise it with "
                    f"Peer(max_calls=...)")
            if pool.address is None and isinstance(target, RemotePeer):
                self._learn(pool, target.describe())
            channel = None
            for attempt in range(2):
                if pool.address is None:
                    self._learn(pool, peer.lookup(name))
                assert pool.address is not None
                hello = {"role": "call", "name": peer.name, "pid": peer.pid}
                if handling is not None:
                    hello["handling"] = handling
                try:
                    channel = CallChannel(pool.address, name, hello, peer.max_frame)
                    break
                except ConnectionLost:
                    if attempt:
                        raise PeerNotFound(name) from None
                    pool.address = None  # the peer may have restarted: ask the registry again
            assert channel is not None
            pool.open.add(channel)
            return pool, channel

    def _learn(self, pool: _Pool, info: dict[str, Any]) -> None:
        """Take the address and the message limit from a registry record."""
        pool.address = str(info["address"])
        callee = info.get("max_frame")
        pool.callee_limit = callee if isinstance(callee, int) else None
        pool.limit = min(self._peer.max_frame, pool.callee_limit or self._peer.max_frame)

    def _drop(self, pool: _Pool, channel: CallChannel) -> None:
        """Close a channel that will carry no other call."""
        channel.close()
        with self._lock:
            pool.open.discard(channel)

    def channels(self, name: str) -> list[CallChannel]:
        """The open channels to peer ``name`` (for tests and diagnostics)."""
        with self._lock:
            pool = self._pools.get(name)
            return list(pool.open) if pool is not None else []

    def close(self) -> None:
        """Close every channel: calls still waiting raise PeerClosed."""
        with self._lock:
            pools, self._pools = self._pools, {}
        for name, pool in pools.items():
            for channel in list(pool.open):
                channel.close(PeerClosed(
                    f"peer {self._peer.name!r} was closed while its call to peer {name!r} "
                    "waited for the answer"))

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Drop the parent's channels (their sockets are the parent's) and locks."""
        channels = [c for pool in self._pools.values() for c in pool.open]
        self._lock = threading.Lock()
        self._pools = {}
        for channel in channels:
            channel._after_fork_in_child()
