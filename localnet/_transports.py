"""The transports beside the one-host one: what a peer adds to reach other hosts.

On one host a peer reaches the others through the registry and Unix sockets
(:mod:`localnet._registry_client`, :mod:`localnet._calls`).  A peer with a
NATS setting also has a link to the other hosts' peers
(:mod:`localnet.nats`); the peer knows it only through the few functions
here, so that it grows no code for it: :func:`settings` when it is made,
:func:`attach` and :func:`detach` when it starts and closes, :func:`peers`
and :func:`lookup` for discovery, and :func:`call` for a name the registry
does not know.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from .errors import PeerNotFound

if TYPE_CHECKING:
    from ._peer import Peer
    from .nats._config import NatsConfig
    from .nats._link import NatsLink

JOIN_WAIT = 2.0  # seconds start() waits for the server
CONFIRM_WAIT = 2.0  # ... and for the other hosts' peers to learn its subscriptions

_settings: weakref.WeakKeyDictionary[Peer, NatsConfig] = weakref.WeakKeyDictionary()
_links: weakref.WeakKeyDictionary[Peer, NatsLink] = weakref.WeakKeyDictionary()


def settings(peer: Peer, nats: str | None) -> None:
    """Read and check ``peer``'s NATS setting (``nats=``, else ``LOCALNET_NATS``).

    Raises ConfigurationError (see :mod:`localnet.nats._config`).
    """
    if nats is None or (nats == "env" and not _env_set()):
        return
    from .nats._config import from_settings

    config = from_settings(nats)
    if config is not None:
        _settings[peer] = config


def _env_set() -> bool:
    import os

    return bool(os.environ.get("LOCALNET_NATS"))


def attach(peer: Peer) -> None:
    """``peer`` started: open its link to the other hosts, if it has a setting."""
    config = _settings.get(peer)
    if config is None:
        return
    from .nats._link import NatsLink

    link = _links[peer] = NatsLink(peer, config)
    peer._publisher.remote = link.events  # noqa: SLF001 - its events reach other hosts too
    link.start()
    # Joined within a moment: the other hosts' publishers know this peer's
    # subscriptions before start() returns.  (A server that cannot be reached
    # delays start by that moment only; the peer joins later by itself.)
    if link.wait_joined(JOIN_WAIT):
        link.confirm(CONFIRM_WAIT)


def changed(peer: Peer) -> None:
    """``peer``'s subscriptions changed: tell the other hosts' peers before returning."""
    link = _links.get(peer)
    if link is not None:
        link.confirm(CONFIRM_WAIT)


def detach(peer: Peer) -> None:
    """``peer`` closes: say goodbye to the other hosts."""
    link = _links.pop(peer, None)
    if link is not None:
        peer._publisher.remote = None  # noqa: SLF001
        link.close()


def link(peer: Peer) -> NatsLink | None:
    """``peer``'s link to the other hosts, if any."""
    return _links.get(peer)


def peers(peer: Peer) -> list[dict[str, Any]]:
    """The records of the other hosts' peers ``peer`` knows of (named ``name@host``)."""
    found = _links.get(peer)
    return found.peers() if found is not None else []


def lookup(peer: Peer, name: str) -> dict[str, Any] | None:
    """The record of another host's peer ``name`` (``name@host``), if known."""
    found = _links.get(peer)
    return found.lookup(name) if found is not None else None


def call(peer: Peer, name: str, connection: str, args: tuple[Any, ...],
         kwargs: dict[str, Any], deadline: float | None, error: PeerNotFound) -> Any:
    """Call ``name`` on another host, which the registry did not know (``error``:
    what the one-host lookup raised, raised again when no other host has it)."""
    found = _links.get(peer)
    if found is None or found.lookup(name) is None:
        raise error
    return found.calls.call(name, connection, args, kwargs, deadline)


async def acall(peer: Peer, name: str, connection: str, args: tuple[Any, ...],
                kwargs: dict[str, Any], deadline: float | None, error: PeerNotFound) -> Any:
    """:func:`call`, awaited (``deadline``: ``time.monotonic()``)."""
    found = _links.get(peer)
    if found is None or found.lookup(name) is None:
        raise error
    return await found.calls.acall(name, connection, args, kwargs, deadline)
