"""The awaitable twins of what can wait: calls, triggers, flush, the current peer.

Each twin takes the same arguments as its thread-API original and never
blocks the running loop: calls go through the loop's
:class:`~localnet._acalls.AsyncCaller`; a trigger whose subscriber has no
room awaits it (up to the peer's ``event_block``, then drops and counts as
the thread API does) instead of blocking; ``flush`` awaits the
acknowledgements; whatever must ask the registry, or start a peer, does so
on a worker thread.

* ``connection.aio(*args, peer=...)`` and ``connection.aio.on(peer,
  timeout=...)(*args)`` (:class:`AsyncConnection`);
* ``event.aio(*args)`` (:class:`AsyncEvent`);
* :class:`AsyncRemotePeer`: a RemotePeer whose connections are awaited.
"""

from __future__ import annotations

import asyncio
import functools
import os
import weakref
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

from ._acalls import AsyncCaller
from ._current import live as _live
from ._default import current_peer
from ._events import waiting
from ._peer import Peer
from ._remote import RemotePeer
from ._timeouts import check_timeout
from .errors import Timeout

if TYPE_CHECKING:
    from ._api import Connection, Event

#: Each peer's awaited-call makers, one per event loop.
_callers: weakref.WeakKeyDictionary[Peer, dict[asyncio.AbstractEventLoop, AsyncCaller]] = \
    weakref.WeakKeyDictionary()


def caller_for(peer: Peer) -> AsyncCaller:
    """The running loop's AsyncCaller for ``peer`` (made on first use; closed with the
    peer).  Those of loops that have closed since are let go of here."""
    loop = asyncio.get_running_loop()
    by_loop = _callers.get(peer)
    if by_loop is not None:
        caller = by_loop.get(loop)
        if caller is not None:
            return caller
    else:
        by_loop = _callers[peer] = {}
    for old in [old for old in by_loop if old.is_closed()]:
        by_loop.pop(old).abandon()
    caller = by_loop[loop] = AsyncCaller(peer, loop)
    peer._stoppers.append(caller.close)  # noqa: SLF001 - closed with the peer
    return caller


async def acurrent_peer() -> Peer:
    """:func:`~localnet._default.current_peer`, starting a default peer off the loop."""
    live = _live
    if live:
        try:
            return live[-1]
        except IndexError:
            pass
    return await asyncio.get_running_loop().run_in_executor(None, current_peer)


async def to_thread(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` on a worker thread, awaited (the loop's default executor)."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(func, *args))


# -- calls ------------------------------------------------------------------------------
class _Via:
    """What an AsyncRemotePeer calls through: the running loop's AsyncCaller."""

    __slots__ = ("peer",)

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def call(self, target: Any, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Awaitable[Any]:
        return caller_for(self.peer).call(target, connection, args, kwargs, timeout)


class AsyncRemotePeer(RemotePeer):
    """A live peer whose connections are awaited: the twin of :class:`RemotePeer`.

    ``await remote.render(7)``, ``await remote.fn.render(7)`` and
    ``await remote.call("render", 7, timeout=5)``; the attributes are
    RemotePeer's.  Made by ``await localnet.aio.peers()`` and
    ``await localnet.aio.peer(name)``.
    """

    def __init__(self, info: dict[str, Any], peer: Peer) -> None:
        super().__init__(info, _Via(peer))

    def __repr__(self) -> str:
        return "<Async" + super().__repr__()[1:]


class AsyncConnection:
    """``connection.aio``: the awaited twin of calling a :class:`~localnet.Connection`."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection[Any, Any]) -> None:
        self._connection = connection

    async def __call__(self, *args: Any, peer: str | RemotePeer | None = None,
                       **kwargs: Any) -> Any:
        """Run the connection in ``peer`` (here when None, awaiting an ``async def``)."""
        connection = self._connection
        if peer is None:
            result = connection.func(*args, **kwargs)
            return await result if isawaitable(result) else result
        here = await acurrent_peer()
        return await caller_for(here).call(peer, connection.name, args, kwargs, None)

    def on(self, peer: str | RemotePeer, timeout: float | None = None
           ) -> Callable[..., Awaitable[Any]]:
        """An async callable that runs the connection in ``peer``, with ``timeout``.

        Raises ConfigurationError at once for a bad ``timeout``.
        """
        timeout = check_timeout(timeout)
        name = self._connection.name

        async def remote(*args: Any, **kwargs: Any) -> Any:
            here = _live[-1] if _live else await acurrent_peer()
            return await caller_for(here).call(peer, name, args, kwargs, timeout)

        functools.update_wrapper(remote, self._connection.func)
        return remote

    def __repr__(self) -> str:
        return f"<awaited {self._connection!r}>"


# -- events -----------------------------------------------------------------------------
class AsyncEvent:
    """``event.aio``: the awaited twin of triggering an :class:`~localnet.Event`."""

    __slots__ = ("_event",)

    def __init__(self, event: Event[Any]) -> None:
        self._event = event

    async def __call__(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...],
                                                                  dict[str, Any]]:
        """Run the event function, then deliver ``(args, kwargs)``; returns them.

        When a subscriber's queue is full this awaits room (up to the
        peer's ``event_block``) rather than blocking the loop.
        """
        event = self._event
        out = event.func(*args, **kwargs)
        if type(out) is not tuple or len(out) != 2 or type(out[0]) is not tuple \
                or type(out[1]) is not dict:
            out = event._check(out)  # noqa: SLF001
        await publish(await acurrent_peer(), event.name, out[0], out[1])
        return out  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<awaited {self._event!r}>"


async def publish(peer: Peer, event: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
    """Publish once every subscriber of ``event`` has room, awaiting it (see AsyncEvent)."""
    publisher = peer._publisher  # noqa: SLF001
    if not publisher.has_room(event):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + peer.event_block
        pause = 0.0005
        while not publisher.has_room(event) and loop.time() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
    waiting.allowed = False  # (waited above: a full subscriber now drops and counts)
    try:
        peer.publish(event, args, kwargs)
    finally:
        waiting.allowed = True


async def flush(peer: Peer, timeout: float | None = None) -> None:
    """Await every event triggered so far being handled (the twin of ``flush``)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + check_timeout(timeout)  # type: ignore[operator]
    pause = 0.0005
    for outbox, seq in peer._publisher.marks():  # noqa: SLF001
        while outbox.acked < seq and not outbox.closed:
            if deadline is not None and loop.time() >= deadline:
                raise Timeout(f"subscriber {outbox.name!r} had not handled every event "
                              f"within {timeout:g} s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)


def _after_fork_in_child() -> None:
    """The parent's loops and connections are not the child's: let go of them."""
    callers = [c for by_loop in _callers.values() for c in by_loop.values()]
    _callers.clear()
    for caller in callers:
        caller.abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
