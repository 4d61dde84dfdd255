"""localnet: find, call and publish events to Python processes on one machine.

::

    import localnet

    @localnet.connect()
    def render(frame): ...

    with localnet.Peer(name="farm-1"):
        render(7, peer="farm-2")
"""

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
    PeerClosed,
    PeerNotFound,
    RegistryUnavailable,
    RemoteError,
    SerializationError,
    Timeout,
    UnknownConnection,
)

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
    "Peer",
    "PeerClosed",
    "PeerInfo",
    "PeerNotFound",
    "ReceivedCounts",
    "RegistryUnavailable",
    "RemoteError",
    "RemotePeer",
    "SerializationError",
    "Stats",
    "Timeout",
    "UnknownConnection",
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

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = "localnet"
        except (AttributeError, TypeError):
            pass
del _name, _obj
