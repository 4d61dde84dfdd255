"""What this process offers: connections, events and subscriptions.

The decorators in :mod:`localnet._api` record intent here and do nothing
else.  Every live :class:`~localnet.Peer` in the process serves this
catalog; the ones already running are told about later additions (so a
subscription made after start reaches the registry before ``subscribe``
returns).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Subscription:
    """One ``@subscribe``: an event name, a handler and the publishers it accepts."""

    id: str
    event: str
    handler: Callable[..., Any]
    peers: frozenset[str] | None
    group: str | None
    hubs_only: bool
    dispatcher: Any = None  # a localnet.dispatch.Dispatcher of its own, or None

    def accepts(self, name: str, group: str | None, hub: bool) -> bool:
        """True when an event from publisher ``name`` should reach this handler."""
        if self.peers is not None and name not in self.peers:
            return False
        if self.group is not None and group != self.group:
            return False
        return not self.hubs_only or hub

    def describe(self) -> dict[str, Any]:
        """The registry's view: no handler, JSON types only."""
        return {"id": self.id, "event": self.event,
                "peers": sorted(self.peers) if self.peers is not None else None,
                "group": self.group, "hubs_only": self.hubs_only}


class Listener(Protocol):
    def catalog_changed(self, added: Subscription | None, removed: list[Subscription]) -> None:
        ...


class Catalog:
    """The process-wide table of connections, events and subscriptions."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.connections: dict[str, Callable[..., Any]] = {}
        self.events: set[str] = set()
        self._subs: dict[str, Subscription] = {}
        # event name -> subscriptions, rebuilt on change, read without the lock
        self.by_event: dict[str, tuple[Subscription, ...]] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def add_connection(self, name: str, func: Callable[..., Any]) -> None:
        with self._lock:
            self.connections[name] = func
            listeners = list(self._listeners)
        for listener in listeners:
            listener.catalog_changed(None, [])

    def add_event(self, name: str) -> None:
        with self._lock:
            if name in self.events:
                return
            self.events.add(name)
            listeners = list(self._listeners)
        for listener in listeners:
            listener.catalog_changed(None, [])

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    def add_subscription(self, event: str, handler: Callable[..., Any],
                         peers: frozenset[str] | None, group: str | None,
                         hubs_only: bool, dispatcher: Any = None) -> Subscription:
        sub = Subscription(f"{os.getpid()}-{next(self._ids)}", event, handler, peers, group,
                           hubs_only, dispatcher)
        with self._lock:
            self._subs[sub.id] = sub
            self._rebuild()
            listeners = list(self._listeners)
        told = []
        try:
            for listener in listeners:
                listener.catalog_changed(sub, [])
                told.append(listener)
        except BaseException:
            # Failed (the registry did not confirm in time): it must have no
            # effect, now or later, so a retry does not run the handler twice.
            with self._lock:
                self._subs.pop(sub.id, None)
                self._rebuild()
            for listener in told:
                try:
                    listener.catalog_changed(None, [sub])
                except Exception:
                    pass
            raise
        return sub

    def remove_subscriptions(self, match: Callable[[Subscription], bool]) -> list[Subscription]:
        with self._lock:
            removed = [s for s in self._subs.values() if match(s)]
            for sub in removed:
                del self._subs[sub.id]
            self._rebuild()
            listeners = list(self._listeners)
        if removed:
            for listener in listeners:
                listener.catalog_changed(None, removed)
        return removed

    def _rebuild(self) -> None:
        table: dict[str, list[Subscription]] = {}
        for sub in self._subs.values():
            table.setdefault(sub.event, []).append(sub)
        self.by_event = {event: tuple(subs) for event, subs in table.items()}

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """A fresh lock (another thread may have held it), and no parent's peer listening."""
        self._lock = threading.RLock()
        self._listeners = []


CATALOG = Catalog()
