"""The calling side of a peer: channels to other peers, calls and their results.

Each calling thread gets a connection of its own to a peer (the kernel then
wakes the right thread for each reply, with no hand-off), up to
``CHANNELS_PER_PEER`` per peer; more threads share them, multiplexed by
request id (see :class:`~localnet._remote.CallChannel`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import _deadlock, _serial
from ._current import RUNNING
from ._remote import CallChannel, NotSent, RemotePeer
from ._wire import Kind
from .errors import ConnectionLost, PeerNotFound, Timeout

if TYPE_CHECKING:
    from ._peer import Peer

_REPLY = int(Kind.REPLY)
CHANNELS_PER_PEER = 8  # connections to one peer before calling threads share them


class Caller:
    """Makes one peer's remote calls."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._lock = threading.Lock()
        self._channels: dict[str, list[CallChannel]] = {}
        self._local = threading.local()
        self._own: list[CallChannel] = []  # never shared: see _open_channel
        self.made = 0  # calls made (Stats.calls_made)

    def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``target``; return its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        SerializationError (before anything is sent).
        """
        peer = self._peer
        if peer.state is not RUNNING:
            peer.require_running()
        name = target if type(target) is str else target.name  # type: ignore[union-attr]
        try:
            channel = self._local.channels[name]
        except (AttributeError, KeyError):
            channel = None
        if channel is None or channel.broken is not None:
            channel = self._open_channel(name, target)
        payload = _serial.dumps_call(connection, args, kwargs, "an argument of",
                                     peer.shm_threshold)
        if len(payload) > peer.max_frame:
            _serial.refuse_oversize(payload, peer.max_frame, f"an argument of {connection!r}")
        self.made += 1
        if type(payload) is bytes:
            try:
                kind, body, fds, ident = channel.request(payload, timeout)
            except NotSent:
                # A stale connection (the peer restarted or died since this
                # thread last called it): nothing ran; look it up again.
                channel = self._open_channel(name, name)
                kind, body, fds, ident = channel.request(payload, timeout)
        else:
            assert isinstance(payload, _serial.Payload)
            try:
                kind, body, fds, ident = channel.request(payload.body, timeout, payload.fds)
            except Timeout:
                payload.abandon()  # the callee may read it later: never reuse
                raise
            except BaseException:
                payload.settle()
                raise
            payload.settle()  # answered: the callee holds what it still uses
        if kind == _REPLY:
            if not fds:
                return _serial.loads(body, "the result of", None, connection)
            try:
                return _serial.loads(body, "the result of", fds, connection)
            finally:
                channel.taken(ident)
        raise _serial.loads_exception(body)

    def _open_channel(self, name: str, target: str | RemotePeer) -> CallChannel:
        """This thread's channel to ``name``: a new one, or a shared one at the cap."""
        local = self._local.__dict__.setdefault("channels", {})
        peer = self._peer
        with self._lock:
            pool = []
            for old in self._channels.get(name, []):
                if old.broken is None:
                    pool.append(old)
                else:
                    old.close()
            self._channels[name] = pool
            # A thread running handlers for ``name``'s events says so, on a
            # channel of its own (see _deadlock).
            handling = _deadlock.handling_for(name)
            if len(pool) >= CHANNELS_PER_PEER and handling is None:
                channel = pool[threading.get_ident() % len(pool)]
                local[name] = channel
                return channel
            address = target.address if isinstance(target, RemotePeer) else None
            for attempt in range(2):
                if address is None:
                    info = peer.lookup(name)
                    address = str(info["address"])
                hello = {"role": "call", "name": peer.name, "pid": peer.pid}
                if handling is not None:
                    hello["handling"] = handling
                try:
                    channel = CallChannel(address, name, hello, peer.max_frame)
                    break
                except ConnectionLost:
                    if attempt:
                        raise PeerNotFound(name) from None
                    address = None  # the peer may have restarted: ask the registry again
            assert channel is not None
            if handling is None:
                pool.append(channel)
            else:
                for old in self._own:
                    if old.broken is not None:
                        old.close()
                self._own = [c for c in self._own if c.broken is None] + [channel]
            local[name] = channel
            return channel

    def channels(self, name: str) -> list[CallChannel]:
        """The open channels to peer ``name`` (for tests and diagnostics)."""
        with self._lock:
            return list(self._channels.get(name, []))

    def close(self) -> None:
        """Close every channel: calls still waiting get ConnectionLost."""
        with self._lock:
            channels = [c for pool in self._channels.values() for c in pool] + self._own
            self._channels.clear()
            self._own.clear()
        for channel in channels:
            channel.close()
