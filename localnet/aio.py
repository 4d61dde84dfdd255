"""localnet for asyncio: the same names as the thread API, awaited.

As with ``redis.asyncio``, ``httpx.AsyncClient`` or ``zmq.asyncio``, every
name takes the arguments of its thread-API original and returns an
awaitable; none of them blocks the running loop, and many concurrent
awaited calls wait on the loop's one thread (a connection each, as threads
have)::

    import localnet
    import localnet.aio

    @localnet.connect()
    async def render(frame): ...              # served and awaited

    async def main():
        async with localnet.aio.Peer(name="svc") as peer:
            print(await render.aio(7, peer="farm-2"))
            farm = await localnet.aio.peer("farm-2")
            await farm.call("render", 8, timeout=5)
            await frame_done.aio(7)           # awaits room if a queue is full
            await localnet.aio.flush(timeout=10)

======================================= ===============================================
thread API                              awaited twin
======================================= ===============================================
``with Peer(...) as peer``              ``async with aio.Peer(...) as peer``
``peer.start()`` / ``peer.close()``     ``await peer.start()`` / ``await peer.close()``
``render(7, peer="b")``                 ``await render.aio(7, peer="b")``
``render.on("b", timeout=5)(7)``        ``await render.aio.on("b", timeout=5)(7)``
``frame_done(7)``                       ``await frame_done.aio(7)``
``localnet.peers()`` / ``peer(name)``   ``await aio.peers()`` / ``await aio.peer(name)``
``remote.render(7)``, ``remote.call``   the same on the AsyncRemotePeer, awaited
``localnet.info(p)``                    ``await aio.info(p)``
``peer.flush(timeout)``                 ``await peer.flush(timeout)``, ``aio.flush``
======================================= ===============================================

Where coroutines run: a connection or handler written as ``async def`` is
awaited on the loop the peer was started in (``async with aio.Peer(...)``
or ``await peer.start()``), and on a loop localnet runs on a thread of its
own otherwise.  Sync connections and handlers still run on localnet's
threads unless a dispatcher says otherwise (:mod:`localnet.dispatch`).

Differences, since one thread waits for all: beyond ``max_calls`` calls in
flight to one peer an awaited call waits its turn (within its timeout)
instead of raising ``TooManyCalls``; cancelling an awaited call
(``asyncio.wait_for``, ``Task.cancel``) frees it at once and its connection
serves the next call once the late answer was read and dropped.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import _api
from ._atwins import AsyncRemotePeer, acurrent_peer, caller_for, to_thread
from ._atwins import flush as _flush
from ._atwins import publish as _publish
from ._peer import Peer as _Peer
from ._remote import RemotePeer

__all__ = ["AsyncRemotePeer", "Peer", "flush", "info", "peer", "peers"]


class Peer:
    """The awaited twin of :class:`localnet.Peer`; takes the same arguments.

    ``sync`` is the thread-API peer it drives (hand it to code that is not
    async); its attributes (``name``, ``state``, ``stats()``,
    ``subscribers()`` ...) are readable here too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sync = _Peer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.sync, name)

    def __repr__(self) -> str:
        return "<aio." + repr(self.sync)[1:]

    async def start(self, timeout: float = 10.0) -> Peer:
        """Start the peer (on a worker thread); its ``async def`` connections and
        handlers are then awaited on the running loop.  Returns the peer."""
        self.sync._receiver.loop = asyncio.get_running_loop()  # noqa: SLF001
        try:
            await to_thread(self.sync.start, timeout)
        except BaseException:
            self.sync._receiver.loop = None  # noqa: SLF001
            raise
        return self

    async def close(self) -> None:
        """Deliver what is queued (up to ``linger`` s), unregister and stop."""
        await to_thread(self.sync.close)

    async def __aenter__(self) -> Peer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Await ``connection(*args, **kwargs)`` in peer ``target``; as ``Peer.call``."""
        return await caller_for(self.sync).call(target, connection, args, kwargs, timeout)

    async def peers(self, group: str | None = None, hubs_only: bool = False
                    ) -> list[AsyncRemotePeer]:
        """The other live peers; as ``Peer.peers``."""
        found = await to_thread(self.sync.peers, group, hubs_only)
        return [AsyncRemotePeer(p.describe(), self.sync) for p in found]

    async def peer(self, name: str) -> AsyncRemotePeer:
        """The live peer called ``name``; raises PeerNotFound."""
        found = await to_thread(self.sync.peer, name)
        return AsyncRemotePeer(found.describe(), self.sync)

    async def publish(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send one event to every matching subscriber, awaiting room if a queue is full."""
        await _publish(self.sync, event, args, kwargs)

    async def flush(self, timeout: float | None = None) -> None:
        """Await every event triggered so far being handled; raises Timeout."""
        await _flush(self.sync, timeout)


async def peers(group: str | None = None, hubs_only: bool = False) -> list[AsyncRemotePeer]:
    """The other live peers, as AsyncRemotePeer objects sorted by name."""
    here = await acurrent_peer()
    found = await to_thread(here.peers, group, hubs_only)
    return [AsyncRemotePeer(p.describe(), here) for p in found]


async def peer(name: str) -> AsyncRemotePeer:
    """The live peer called ``name``.  Raises :class:`PeerNotFound` if none."""
    here = await acurrent_peer()
    found = await to_thread(here.peer, name)
    return AsyncRemotePeer(found.describe(), here)


async def info(peer: str | RemotePeer | Peer | _Peer | None = None) -> _api.PeerInfo:
    """Describe a peer (this process's current peer when None)."""
    await acurrent_peer()
    return await to_thread(_api.info, peer.sync if isinstance(peer, Peer) else peer)  # type: ignore[no-any-return]


async def flush(timeout: float | None = None) -> None:
    """Await every event this process's current peer triggered being handled."""
    await _flush(await acurrent_peer(), timeout)
