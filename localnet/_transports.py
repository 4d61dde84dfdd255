"""The transport boundary: the ways a peer reaches the others.

A peer has a list of transports, all with the interface of
:class:`Transport`, and treats them alike: it starts them, lists and looks
peers up through them, tells them when its subscriptions change, and lets
them go when it closes.

* The one-host transport (:class:`localnet._local.LocalTransport`), always
  first: the registry of the runtime directory for membership and
  discovery.  Calls and events between the peers of a host travel over
  their Unix sockets on the peer's own fast paths (:mod:`localnet._calls`,
  :mod:`localnet._publisher`), which ask it where a name lives.
* The transport to the other hosts' peers, with a NATS setting
  (:class:`localnet.nats._transport.NatsTransport`): presence messages for membership
  and discovery, NATS request/reply for calls (:meth:`Transport.call`), and
  a remote outbox that the publisher hands every event to.

A name is looked up on this host first, then on the other transports in
turn; a peer of another host is named ``name@host``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .errors import PeerNotFound

if TYPE_CHECKING:
    from ._catalog import Subscription
    from ._peer import Peer
    from .nats._link import NatsLink

JOIN_WAIT = 2.0  # seconds start() waits for the NATS server
CONFIRM_WAIT = 2.0  # ... and for the other hosts' peers to learn its subscriptions


class Transport(Protocol):
    """What a peer asks of each way of reaching the others."""

    def start(self, timeout: float) -> None:
        """Join; once it returns, the publishers it reaches know this peer's
        subscriptions."""

    def leave(self) -> None:
        """The peer closes: stop taking new work, say goodbye."""

    def close(self) -> None:
        """The peer's queued events are settled: let go of everything."""

    def subscriptions_changed(self, added: Subscription | None,
                              removed: list[Subscription]) -> None:
        """Tell the publishers it reaches; return once they know."""

    def catalog_updated(self) -> None:
        """The process's connections or events changed."""

    def peers(self) -> list[dict[str, Any]]:
        """The records of the live peers it reaches (not this peer)."""

    def lookup(self, name: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The record of peer ``name``, or None."""


class Carrier(Transport, Protocol):
    """A transport that carries calls itself (the one-host transport's go on
    the peer's fast path, over Unix sockets)."""

    def call(self, name: str, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], deadline: float | None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``name`` by ``deadline``
        (``time.monotonic()``); raises as a call on one host does."""

    async def acall(self, name: str, connection: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any], deadline: float | None) -> Any:
        """:meth:`call`, awaited."""


def configured(peer: Peer, nats: str | None) -> list[Carrier]:
    """The transports ``peer`` has beside the one-host one: the NATS transport
    when ``nats`` (else ``LOCALNET_NATS``) is set.

    Raises ConfigurationError (see :mod:`localnet.nats._config`).
    """
    if nats is None or (nats == "env" and not _env_set()):
        return []
    from .nats._config import from_settings

    config = from_settings(nats)
    if config is None:
        return []
    from .nats._transport import NatsTransport

    return [NatsTransport(peer, config)]


def _env_set() -> bool:
    import os

    return bool(os.environ.get("LOCALNET_NATS"))


def link(peer: Peer) -> NatsLink | None:
    """``peer``'s live link to the other hosts, if any (for tools and tests)."""
    for transport in peer._others:  # noqa: SLF001
        found = getattr(transport, "link", None)
        if found is not None:
            return found  # type: ignore[no-any-return]
    return None


def lookup(peer: Peer, name: str) -> dict[str, Any] | None:
    """The record of peer ``name`` on another transport than this host's, if known."""
    for transport in peer._others:  # noqa: SLF001
        info = transport.lookup(name)
        if info is not None:
            return info
    return None


def _carrier(peer: Peer, name: str, error: PeerNotFound) -> Carrier:
    for transport in peer._others:  # noqa: SLF001
        if transport.lookup(name) is not None:
            return transport
    raise error


def call(peer: Peer, name: str, connection: str, args: tuple[Any, ...],
         kwargs: dict[str, Any], deadline: float | None, error: PeerNotFound) -> Any:
    """Call ``name``, which this host's registry did not know, on the transport
    that knows it (``error``: what the one-host lookup raised, raised again
    when none does)."""
    return _carrier(peer, name, error).call(name, connection, args, kwargs, deadline)


async def acall(peer: Peer, name: str, connection: str, args: tuple[Any, ...],
                kwargs: dict[str, Any], deadline: float | None, error: PeerNotFound) -> Any:
    """:func:`call`, awaited (``deadline``: ``time.monotonic()``)."""
    return await _carrier(peer, name, error).acall(name, connection, args, kwargs, deadline)
