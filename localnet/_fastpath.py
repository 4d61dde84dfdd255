"""A peer's ``publish`` for the common case, in C (``localnet/_trigger.c``).

With the extensions built, a peer's ``publish`` is a :class:`Trigger`: an event
of its table whose arguments make an item of plain values is encoded and
queued on the lanes the table gives without a Python call; the publisher's
Python (``Publisher.publish``) takes everything else, and ``Publisher._finish``
what the fan-out leaves to do (a courier to wake, a lane or a ring without
room).  The publisher fills the table after a trigger (:func:`table_entry`)
and replaces it, a new dict, whenever its routes or the other hosts it
reaches change, so an entry is never older than the routes it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._current import RUNNING
from ._lanes import c_fan_out, c_ring_fan_out
from ._serial import encode_item

try:  # (optional, see localnet/_trigger.c)
    from ._trigger import Trigger
except ImportError:  # built without a C compiler
    Trigger = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from ._routes import Route


def make_trigger(peer: Any, publish: Callable[..., None], finish: Callable[..., None],
                 item_max: int) -> Trigger | None:
    """The C trigger in front of ``publish`` (and ``finish``) for ``peer``; None
    where the extensions are not built."""
    if Trigger is None or encode_item is None or c_fan_out is None or c_ring_fan_out is None:
        return None
    return Trigger(peer, RUNNING, publish, finish, encode_item, c_fan_out, c_ring_fan_out,
                   item_max)


def table_entry(targets: Route | None) -> tuple[Any, ...] | None:
    """What the table holds for an event routed to ``targets``: ``()`` (no
    subscriber), ``(route, lanes)`` or ``(route, lanes, ring_state, ring)``; None
    while the route's ring does not know its outboxes yet (its first trigger
    joins them, in Python)."""
    if not targets:
        return ()
    ring = targets.ring
    if ring is None:
        return (targets, targets.lanes)
    if targets.joined:
        return (targets, targets.lanes, ring.state, ring.map)
    return None
