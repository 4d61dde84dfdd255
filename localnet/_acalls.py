"""Awaited calls: the asyncio twin of :mod:`localnet._calls`.

One :class:`AsyncCaller` per (peer, event loop) keeps that loop's
:class:`~localnet._achannel.AsyncChannel` pools, one per remote peer.  An
awaited call checks a channel out, sends, awaits the answer and puts the
channel back, as a thread's call does, so the callee runs concurrent calls
at once, each on its own connection; all of them wait on the loop's thread.

Differences from the thread API, all because one thread holds every call:

* beyond ``max_calls`` calls in flight to one peer, an awaited call waits
  for a channel to come back (first come, first served, within its
  timeout) instead of raising :class:`TooManyCalls`: a coroutine group of
  a thousand calls is the normal case here, not a runaway;
* a registry lookup (the first call to a peer, or after it restarted) runs
  on a worker thread, so it never blocks the loop;
* a cancelled call returns at once; its channel reads and drops the late
  answer and then serves the next call (see :mod:`localnet._achannel`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from . import _serial, _transports
from ._achannel import AsyncChannel, NotSentAsync, open_channel
from ._calls import learn, refuse
from ._current import RUNNING
from ._remote import RemotePeer
from ._timeouts import check_timeout
from ._wire import Kind
from .errors import ConnectionLost, PeerClosed, PeerNotFound, Timeout

if TYPE_CHECKING:
    from ._peer import Peer

_REPLY = int(Kind.REPLY)


class _Pool:
    """The channels of one loop to one remote peer."""

    __slots__ = ("idle", "count", "waiters", "address", "limit", "callee_limit", "looking")

    def __init__(self, limit: int) -> None:
        self.idle: deque[AsyncChannel] = deque()
        self.count = 0  # channels open or being opened (at most max_calls)
        self.waiters: deque[asyncio.Future[None]] = deque()  # calls waiting for a channel
        self.address: str | None = None
        self.limit = limit
        self.callee_limit: int | None = None
        self.looking: asyncio.Future[dict[str, Any]] | None = None  # a lookup under way


class AsyncCaller:
    """Makes one peer's awaited calls on one event loop."""

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self._peer = peer
        self._loop = loop
        self._pools: dict[str, _Pool] = {}
        self._channels: set[AsyncChannel] = set()  # every open one, for close()
        self._closed = False

    async def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Await ``connection(*args, **kwargs)`` in peer ``target``; its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        SerializationError (before anything is sent), PeerClosed.
        """
        peer = self._peer
        if peer.state is not RUNNING:
            peer.require_running()
        deadline = None
        if timeout is not None:
            deadline = self._loop.time() + check_timeout(timeout)  # type: ignore[operator]
        if type(target) is str:
            name = target
        else:
            name = target.name  # type: ignore[union-attr]
            if target.host is not None:  # type: ignore[union-attr]  # another host's
                return await _transports.acall(peer, name, connection, args, kwargs, deadline,
                                               PeerNotFound(name))
        pool = self._pools.get(name)
        if pool is None:
            if "@" in name and _transports.lookup(peer, name) is not None:  # another host's
                return await _transports.acall(peer, name, connection, args, kwargs, deadline,
                                               PeerNotFound(name))
            pool = self._pools[name] = _Pool(peer.max_frame)
        # An idle usable channel at once (the common case), else wait for one.
        channel = pool.idle.pop() if pool.idle else None
        if channel is None or not channel.usable:
            if channel is not None:
                self._checkin(pool, channel)
            try:
                channel = await self._checkout(pool, name, target, deadline)
            except PeerNotFound as exc:  # not on this host: on another, if joined
                return await _transports.acall(peer, name, connection, args, kwargs,
                                               deadline, exc)
        try:
            payload = _serial.dumps_call(connection, args, kwargs, "an argument of",
                                         peer.shm_threshold)
            if len(payload) > pool.limit:
                refuse(payload, peer.max_frame, pool.callee_limit, name, connection)
        except BaseException:
            self._checkin(pool, channel)
            raise
        peer._caller.made += 1  # noqa: SLF001 - one count of calls made, both APIs
        try:
            # A small call goes out at once (no coroutine of its own: the common case).
            future = channel.start_small(payload, deadline) if type(payload) is bytes \
                else None
            if future is not None:
                try:
                    answer = await future
                except BaseException as exc:
                    channel.failed(exc)
                    raise
                finally:
                    channel.answered()
            else:
                answer = await self._send(channel, payload, deadline)
        except NotSentAsync:
            # A stale connection (the peer restarted or died since it opened):
            # nothing ran; look the peer up again and send once more.
            self._lost(pool, channel)
            self._forget(pool)
            channel = await self._checkout(pool, name, name, deadline)
            try:
                answer = await self._send(channel, payload, deadline)
            except NotSentAsync as exc:
                self._lost(pool, channel)
                raise ConnectionLost(str(exc)) from None
            except BaseException:
                self._checkin(pool, channel)
                raise
        except BaseException:
            self._checkin(pool, channel)
            raise
        kind, body, fds, ident = answer
        try:
            if kind == _REPLY:
                if not fds:
                    return _serial.loads(body, "the result of", None, connection)
                try:
                    return _serial.loads(body, "the result of", fds, connection)
                finally:
                    channel.taken(ident)
            raise _serial.loads_exception(body)
        finally:
            self._checkin(pool, channel)

    @staticmethod
    async def _send(channel: AsyncChannel, payload: bytes | _serial.Payload,
                    deadline: float | None) -> tuple[int, bytearray, list[int], int]:
        if type(payload) is bytes:
            return await channel.request(payload, deadline)
        assert isinstance(payload, _serial.Payload)
        try:
            answer = await channel.request(payload.body, deadline, payload.fds)
        except NotSentAsync:
            raise  # nothing left: the payload goes again
        except BaseException:
            payload.abandon()  # the callee may read it later: never reuse
            raise
        payload.settle()
        return answer

    # -- the pool ------------------------------------------------------------------
    async def _checkout(self, pool: _Pool, name: str, target: str | RemotePeer,
                        deadline: float | None) -> AsyncChannel:
        """An idle usable channel, a new one within ``max_calls``, or the first to come
        back (by ``deadline``)."""
        while True:
            if self._closed:
                raise PeerClosed(f"peer {self._peer.name!r} is closed")
            while pool.idle:
                channel = pool.idle.pop()
                if channel.usable:
                    return channel
                if channel.broken is not None:
                    pool.count -= 1
            if pool.count < self._peer.max_calls:
                pool.count += 1
                try:
                    return await self._open(pool, name, target, deadline)
                except BaseException:
                    pool.count -= 1
                    self._wake(pool)
                    raise
            waiter: asyncio.Future[None] = self._loop.create_future()
            pool.waiters.append(waiter)
            try:
                remaining = None if deadline is None else deadline - self._loop.time()
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except BaseException as exc:
                if waiter in pool.waiters:
                    pool.waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake(pool)  # woken as it gave up: pass the turn on
                if isinstance(exc, asyncio.TimeoutError):
                    raise Timeout(f"{self._peer.max_calls} awaited calls to peer {name!r} "
                                  "were still in flight at the timeout (max_calls); this "
                                  "call was not sent") from None
                raise

    def _checkin(self, pool: _Pool, channel: AsyncChannel) -> None:
        if self._closed:
            channel.close(PeerClosed(f"peer {self._peer.name!r} is closed"))
        if channel.broken is not None:
            pool.count -= 1
            self._channels.discard(channel)
        elif not channel.usable:  # draining a cancelled call's answer: back when read
            channel.on_ready = lambda ch: self._ready(pool, ch)
            return
        else:
            pool.idle.append(channel)
        self._wake(pool)

    def _ready(self, pool: _Pool, channel: AsyncChannel) -> None:
        channel.on_ready = None
        pool.idle.append(channel)
        self._wake(pool)

    def _lost(self, pool: _Pool, channel: AsyncChannel) -> None:
        channel.close()
        self._channels.discard(channel)
        pool.count -= 1
        self._wake(pool)

    @staticmethod
    def _wake(pool: _Pool) -> None:
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _forget(self, pool: _Pool) -> None:
        """The peer may have restarted elsewhere: drop its address and idle channels."""
        pool.address = None
        while pool.idle:
            self._lost(pool, pool.idle.pop())

    async def _open(self, pool: _Pool, name: str, target: str | RemotePeer,
                    deadline: float | None) -> AsyncChannel:
        peer = self._peer
        hello = {"role": "call", "name": peer.name, "pid": peer.pid}
        address = pool.address
        if address is None and isinstance(target, RemotePeer):
            address = learn(pool, target.describe(), peer.max_frame)
        for attempt in range(2):
            if address is None:
                address = learn(pool, await self._lookup(pool, name, deadline),
                                peer.max_frame)
            try:
                channel = await open_channel(address, name, hello, peer.max_frame, deadline)
            except ConnectionLost:
                if attempt:
                    raise PeerNotFound(name) from None
                pool.address = address = None  # it may have restarted: ask again
                continue
            if self._closed:
                channel.close()
                raise PeerClosed(f"peer {peer.name!r} was closed while its call to peer "
                                 f"{name!r} connected")
            self._channels.add(channel)
            return channel
        raise AssertionError("unreachable")

    async def _lookup(self, pool: _Pool, name: str, deadline: float | None
                      ) -> dict[str, Any]:
        """The registry's record of ``name``, looked up on a worker thread (one lookup
        for all the calls that need it at once)."""
        if pool.looking is None or pool.looking.done():
            remaining = 10.0 if deadline is None else max(0.0, deadline - self._loop.time())
            pool.looking = asyncio.ensure_future(self._loop.run_in_executor(
                None, self._peer.lookup, name, remaining))
        try:
            return await asyncio.shield(pool.looking)
        except Timeout:
            raise
        except Exception as exc:
            if deadline is not None and self._loop.time() >= deadline \
                    and not isinstance(exc, PeerNotFound):
                raise Timeout(f"the registry did not tell where peer {name!r} is within the "
                              "timeout") from None
            raise

    def close(self) -> None:
        """Close every channel (any thread): calls still waiting raise PeerClosed."""
        self._closed = True
        error = PeerClosed(f"peer {self._peer.name!r} was closed while an awaited call "
                           "waited for its answer")
        self._pools = {}
        for channel in list(self._channels):
            channel.close_threadsafe(error)

    def abandon(self) -> None:
        """Let go of every channel without touching the loop: after fork() in the child
        (the loop's selector is the parent's too), or once the loop has closed.  Each
        socket is closed; nothing else."""
        self._closed = True
        for channel in self._channels:
            channel.forget()
        self._channels = set()
        self._pools = {}
