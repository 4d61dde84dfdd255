"""The one-host transport: the registry, for membership and discovery.

Every peer has it, first among its transports (see :mod:`localnet._transports`).
It registers the peer (name, pid, address, connections, subscriptions) with
the runtime directory's registry and keeps it registered across registry
restarts (:class:`~localnet._registry_client.RegistryClient`); the
registry's pushes (who subscribes to this peer's events) go to the peer's
:class:`~localnet._publisher.Publisher`.  Calls and events between the
peers of the host travel over their Unix sockets, on the peer's own fast
paths (:mod:`localnet._calls`, :mod:`localnet._publisher`): this transport
tells them where a name lives.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _current
from ._catalog import CATALOG, Subscription
from ._registry_client import RegistryClient
from .errors import LocalnetError, PeerNotFound, RegistryUnavailable, translate_os_error

if TYPE_CHECKING:
    from ._peer import Peer

logger = logging.getLogger("localnet.peer")


class LocalTransport:
    """A peer's membership of its host: its registry client."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self.registry: RegistryClient | None = None

    @property
    def recoveries(self) -> int:
        """Registry restarts this peer registered again through (Stats.registry_recoveries)."""
        registry = self.registry
        return registry.recoveries if registry is not None else 0

    # -- life cycle -------------------------------------------------------------
    def start(self, timeout: float) -> None:
        """Register (starting the registry if none runs); raises NameTaken or
        RegistryUnavailable."""
        peer = self._peer
        registry = RegistryClient(Path(peer.directory), self.registration,
                                  peer._publisher.apply_push)  # noqa: SLF001
        try:
            registry.start(timeout)
        except OSError as exc:
            raise translate_os_error(exc, f"cannot reach the registry in {peer.directory}",
                                     RegistryUnavailable) from exc
        self.registry = registry

    def leave(self) -> None:
        """Closing: hand this process's subscriptions to the oldest peer still
        running, if this peer held them (see :mod:`localnet._current`)."""
        peer, registry = self._peer, self.registry
        with _current.subscribing:
            heir = _current.next_receiving(peer)
            if heir is None or registry is None:
                return
            try:
                registry.request("hand_over", to=heir.name)
            except LocalnetError as exc:
                # The heir subscribes on its own: for a moment both may get an event.
                logger.warning("%r could not hand its subscriptions over to %r: %s", peer,
                               heir, exc)
                for sub in CATALOG.subscriptions():
                    heir.catalog_changed(sub, [])

    def close(self) -> None:
        """Unregister: publishers send this peer nothing new."""
        if self.registry is not None:
            self.registry.close()

    def registration(self) -> dict[str, Any]:
        """What the registry is told of this peer: its record and, if it receives
        this process's events, the subscriptions."""
        peer = self._peer
        identity = peer.identity
        info = {
            "name": peer.name, "pid": peer.pid, "started": identity["started"],
            "ticks": identity["ticks"],
            "since": peer.since, "uid": os.getuid(), "user": _user(),
            "executable": sys.executable, "argv": list(sys.argv), "group": peer.group,
            "hub": peer.hub, "address": peer.address, "max_frame": peer.max_frame,
            "connections": sorted(CATALOG.connections), "events": sorted(CATALOG.events),
        }
        receiving = _current.receiving.peer is peer  # (see _current: one peer a process)
        return {"info": info, "subs": [s.describe() for s in CATALOG.subscriptions()]
                if receiving else []}

    # -- what the peer offers changed -------------------------------------------
    def subscriptions_changed(self, added: Subscription | None,
                              removed: list[Subscription]) -> None:
        """Tell the registry; returns once the publishers applied the change."""
        registry = self.registry
        if registry is None:
            return
        with _current.subscribing:  # only the receiving peer registers subscriptions
            if _current.receiving.peer is not self._peer:
                return
            if added is not None:
                try:
                    registry.request("subscribe", sub=added.describe())
                except BaseException:
                    # The request may still be queued at a registry that is
                    # stopped, not dead: undo it behind it, so a subscribe
                    # that raised never takes effect later (the catalog
                    # forgets it too).
                    registry.request_nowait("unsubscribe", id=added.id)
                    raise
            for sub in removed:
                registry.request("unsubscribe", id=sub.id)

    def catalog_updated(self) -> None:
        """The process's connections or events changed: update the record."""
        if self.registry is not None:
            self.registry.request("update", connections=sorted(CATALOG.connections),
                                  events=sorted(CATALOG.events))

    # -- discovery --------------------------------------------------------------
    def peers(self) -> list[dict[str, Any]]:
        """The records of this host's other live peers."""
        assert self.registry is not None
        me = self._peer
        return [info for info in self.registry.request("list")
                if not (info.get("name") == me.name and info.get("pid") == me.pid)]

    def lookup(self, name: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The record of this host's peer ``name``, or None; RegistryUnavailable
        after ``timeout``."""
        assert self.registry is not None
        info = self.registry.request("lookup", timeout, name=name)
        return info if isinstance(info, dict) else None

    def find(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """:meth:`lookup`, raising :class:`PeerNotFound` (naming the live peers)."""
        deadline = time.monotonic() + timeout
        info = self.lookup(name, timeout)
        if info is None:
            assert self.registry is not None
            try:  # the others' names, for the message
                names = [str(i["name"]) for i in self.registry.request(
                    "list", max(0.001, deadline - time.monotonic()))
                    if i.get("name") != self._peer.name]
            except RegistryUnavailable:
                names = None
            raise PeerNotFound(name, names)
        return info


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
