"""The NATS transport: a peer's way to the other hosts' peers.

It has the interface of :class:`localnet._transports.Transport`; the peer
makes it when given a NATS setting and knows it through that interface
only.  Starting it opens a :class:`~localnet.nats._link.NatsLink` (presence,
the directory of the other hosts' peers, calls) and plugs the link's
remote outbox into the peer's publisher, so that every event also reaches
the other hosts' subscribers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._transports import CONFIRM_WAIT, JOIN_WAIT

if TYPE_CHECKING:
    from .._catalog import Subscription
    from .._peer import Peer
    from ._config import NatsConfig
    from ._link import NatsLink


class NatsTransport:
    """One peer's membership of the NATS namespace its setting names."""

    def __init__(self, peer: Peer, config: NatsConfig) -> None:
        self._peer = peer
        self.config = config
        self.link: NatsLink | None = None

    def start(self, timeout: float) -> None:
        """Connect in the background.  A server reached within ``JOIN_WAIT``
        learns this peer's subscriptions before this returns; one that cannot
        be reached delays start by that moment only (the peer joins later by
        itself)."""
        from ._link import NatsLink

        link = self.link = NatsLink(self._peer, self.config)
        self._peer._publisher.remote = link.events  # noqa: SLF001 - events reach other hosts too
        link.start()
        if link.wait_joined(min(JOIN_WAIT, timeout)):
            link.confirm(CONFIRM_WAIT)

    def leave(self) -> None:
        """Say goodbye to the other hosts and disconnect."""
        link, self.link = self.link, None
        if link is not None:
            self._peer._publisher.remote = None  # noqa: SLF001
            link.close()

    def close(self) -> None:
        """Nothing is left once :meth:`leave` ran."""

    def subscriptions_changed(self, added: Subscription | None,
                              removed: list[Subscription]) -> None:
        """Send the new record to the other hosts' peers; wait until they have it."""
        link = self.link
        if link is not None:
            link.confirm(CONFIRM_WAIT)

    def catalog_updated(self) -> None:
        """The next presence message carries the change."""

    def peers(self) -> list[dict[str, Any]]:
        link = self.link
        return link.peers() if link is not None else []

    def lookup(self, name: str, timeout: float = 10.0) -> dict[str, Any] | None:
        link = self.link
        return link.lookup(name) if link is not None else None

    def call(self, name: str, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], deadline: float | None) -> Any:
        """Run ``connection`` in ``name@host``; raises as a call on one host does."""
        link = self.link
        if link is None:
            from ..errors import PeerNotFound

            raise PeerNotFound(name)
        return link.calls.call(name, connection, args, kwargs, deadline)

    async def acall(self, name: str, connection: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any], deadline: float | None) -> Any:
        """:meth:`call`, awaited (``deadline``: ``time.monotonic()``)."""
        link = self.link
        if link is None:
            from ..errors import PeerNotFound

            raise PeerNotFound(name)
        return await link.calls.acall(name, connection, args, kwargs, deadline)
