"""localnet: find, call and publish events to Python processes on one machine.

::

    import localnet

    @localnet.connect()
    def render(frame): ...

    with localnet.Peer(name="farm-1"):
        render(7, peer="farm-2")

Public names are loaded on first use (PEP 562), so that ``import localnet``
and the registry process, which needs none of them, start quickly.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# The library never configures logging; applications (or LOCALNET_DEBUG) do.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigurationError",
    "Connection",
    "ConnectionLost",
    "Event",
    "EventContext",
    "EventCounts",
    "LocalnetError",
    "NameTaken",
    "OutOfResources",
    "Peer",
    "PeerClosed",
    "PeerInfo",
    "PeerNotFound",
    "PeerStopping",
    "ReceivedCounts",
    "RegistryUnavailable",
    "RemoteError",
    "RemotePeer",
    "SerializationError",
    "Stats",
    "Timeout",
    "TooManyCalls",
    "UnknownConnection",
    "WouldDeadlock",
    "connect",
    "current_event",
    "empty",
    "event",
    "info",
    "peer",
    "peers",
    "serve_forever",
    "subscribe",
    "unsubscribe",
    "zeros",
]

_WHERE = {
    **dict.fromkeys(["Connection", "Event", "PeerInfo", "connect", "event", "info", "peer",
                     "peers", "serve_forever", "subscribe", "unsubscribe"], "._api"),
    **dict.fromkeys(["EventContext", "EventCounts", "Peer", "ReceivedCounts", "Stats",
                     "current_event"], "._peer"),
    "RemotePeer": "._remote",
    "empty": "._shm",
    "zeros": "._shm",
    **dict.fromkeys(["ConfigurationError", "ConnectionLost", "LocalnetError", "NameTaken",
                     "OutOfResources", "PeerClosed", "PeerNotFound", "PeerStopping",
                     "RegistryUnavailable",
                     "RemoteError", "SerializationError", "Timeout", "TooManyCalls",
                     "UnknownConnection", "WouldDeadlock"],
                    ".errors"),
}


_SUBMODULES = frozenset({"aio", "dispatch"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # localnet.aio, localnet.dispatch without importing them first
        return importlib.import_module(f".{name}", __name__)
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'localnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    try:
        value.__module__ = __name__
    except (AttributeError, TypeError):
        pass
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


if TYPE_CHECKING:
    from ._api import (
        Connection,
        Event,
        PeerInfo,
        connect,
        event,
        info,
        peer,
        peers,
        serve_forever,
        subscribe,
        unsubscribe,
    )
    from ._peer import EventContext, EventCounts, Peer, ReceivedCounts, Stats, current_event
    from ._remote import RemotePeer
    from ._shm import empty, zeros
    from .errors import (
        ConfigurationError,
        ConnectionLost,
        LocalnetError,
        NameTaken,
        OutOfResources,
        PeerClosed,
        PeerNotFound,
        PeerStopping,
        RegistryUnavailable,
        RemoteError,
        SerializationError,
        Timeout,
        TooManyCalls,
        UnknownConnection,
        WouldDeadlock,
    )
