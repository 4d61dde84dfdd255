"""Where a trigger puts an event: its route, and the group's shared lane.

A :class:`Route` is the tuple of outboxes (:mod:`localnet._events`) one
event goes to.  A trigger queues the event's entry on the *lanes* of the
route (see :mod:`localnet._lanes`): one per outbox, each with its own
queue, so the trigger's work grows with the number of subscribers.

Where subscribers take the same events from this publisher (every route
that leads to one of them leads to all of them, as when they subscribe to
the same events) and the event ring holds the items (:mod:`localnet._ring`),
they form an :class:`EventGroup`: the route has one lane, the group's, and
the trigger appends the entry once to the group's *log* whatever the number
of subscribers.  The courier sends a member whose queue is empty its new
entries straight from the log (:meth:`EventGroup.take`): RING frames made
from the log itself, the member keeping only a count of these *virtual*
events (``Outbox._virtual``), which its acknowledgements count down.  So
neither the trigger nor the courier does anything per event and member.
Once a member has entries of its own in its queue (a shared-memory payload,
a whole pickle, a spill, see below), the courier moves the log's entries
behind them (:meth:`EventGroup.move`, a copy of references per batch), so
the order stays the order of the triggers.  Entries are cut from the log
once no member needs them.

Bounds: the group's lane takes an entry while the log is shorter than its
*room*, the least room any member has left besides what the log holds for
it (:meth:`EventGroup.refresh`).  Entries moved but not yet cut count twice,
so the room errs low.  When the log is full, the trigger first waits for
room as it would for each member without a group (up to their
``event_block``, :meth:`EventGroup.wait_for_room`): the members' queues
stay empty, and the log takes the event.  When a member drops its events
without waiting (it is not keeping up, or the thread may not wait) or the
wait ends without room (a member is stopped), the trigger moves the log
into the members' queues (:meth:`EventGroup.spill`) and takes each member's
own lane, which waits, drops and counts per subscriber as without a group.

A group's members are fixed: when the routes change, a group whose members
no longer take the same events closes (what its log holds for each member
and was not sent goes to the member's queue, the virtual events stay until
acknowledged, and its lane takes nothing more: a trigger still holding the
old route goes each member's own way), and the new routes make new groups.  A member that
retires or closes closes its group the same way.  Groups need the C fan-out
(``localnet._speedups.ring_fan_out``), whose check and append are one step
for the other threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ._lanes import take

if TYPE_CHECKING:
    from ._events import Outbox
    from ._ring import EventRing

T = TypeVar("T")

#: Seconds between two looks at the room of a group a trigger waits on: the
#: acknowledgements that cut the log notify it, those of entries in the
#: members' own queues (after a spill) do not.
ROOM_POLL = 0.002


class EventGroup:
    """One log of ring entries for outboxes that take the same events.

    Per member, the group keeps two cursors into the log (counted from the
    start of the group, ``_base`` being the first entry still in it):
    ``_moved``, where the entries it has not taken yet begin, and
    ``_held``, where its *virtual* events begin (None: it has none): events
    it was sent straight from the log and has not acknowledged yet
    (:meth:`take`, see ``Outbox._virtual``).  Entries before every member's
    cursor (``_held``, or else ``_moved``) are cut from the log.
    """

    def __init__(self, outboxes: Iterable[Outbox]) -> None:
        self.members = tuple(outboxes)
        self.lock = threading.Lock()
        self.log: list[Any] = []
        # [log, room, courier idle]: a lane as the fan-out reads it (localnet._lanes);
        # idle stays False until the courier marks it (it is woken once the group is routed)
        self.lane: list[Any] = [self.log, 0, False]
        self._base = 0  # entries cut from the log's front
        self._moved = {outbox: 0 for outbox in self.members}
        self._held: dict[Outbox, int | None] = {outbox: None for outbox in self.members}
        self._lagging = len(self.members)  # members whose cursor is _base
        self.sealed = False  # takes no more entries (closed): a trigger goes the own ways
        self._room = threading.Condition(self.lock)  # (notified when the log has room)
        self._waiting = 0  # triggers in wait_for_room
        self._refresh()

    def __repr__(self) -> str:
        return (f"<EventGroup of {len(self.members)} log={len(self.log)} "
                f"room={self.lane[1]}{' SEALED' if self.sealed else ''}>")

    @property
    def closed(self) -> bool:
        """Sealed and holding nothing (what ``EventRing.reclaim`` asks of its members)."""
        return self.sealed and not self.log

    def behind(self, outbox: Outbox) -> bool:
        """True when the log holds entries ``outbox`` has not taken (no lock)."""
        moved = self._moved.get(outbox)
        return moved is not None and moved < self._base + len(self.log)

    def ring_hold(self) -> int | None:
        """The ring position of the oldest entry in the log (see ``EventRing.reclaim``)."""
        log = self.log
        try:
            return int(log[0][2])
        except IndexError:
            return None

    # -- cursors ------------------------------------------------------------------
    def _cursor(self, outbox: Outbox) -> int:
        held = self._held[outbox]
        return self._moved[outbox] if held is None else held

    def _advanced(self, old: int) -> None:
        """A member's cursor moved on from ``old`` (with the lock)."""
        if old == self._base:
            self._lagging -= 1
            if not self._lagging:
                self._cut()

    def _cut(self) -> None:
        """Cut the entries no member needs from the log (with the lock)."""
        low = min(self._cursor(outbox) for outbox in self.members)
        if low > self._base:
            self._refresh()  # first: the members' queues hold what the log is about to lose
            del self.log[:low - self._base]
            self._base = low
        self._lagging = sum(1 for outbox in self.members if self._cursor(outbox) == low)

    # -- the members' steps -----------------------------------------------------------
    def move(self, outbox: Outbox) -> list[Any] | None:
        """Append to ``outbox``'s queue the entries of the log it has not taken yet;
        those entries (None when there were none)."""
        with self.lock:
            return self._move(outbox)

    def _move(self, outbox: Outbox) -> list[Any] | None:
        moved = self._moved.get(outbox)
        if moved is None:
            return None
        entries = self.log[moved - self._base:]  # (one step: a trigger appends before or after)
        if not entries:
            return None
        old = self._cursor(outbox)
        outbox.lane[0].extend(entries)  # (list.extend is one step too, as fan_out's append)
        self._moved[outbox] = moved + len(entries)
        if old == moved:  # (no virtual events: its cursor moved on)
            self._advanced(old)
        return entries

    def take(self, outbox: Outbox, frames: Callable[[list[Any], int, int], T]
             ) -> tuple[int, T] | None:
        """Send ``outbox`` the entries it has not taken straight from the log: they
        become its virtual events.  Returns how many, and what ``frames(log, low,
        high)`` made of them (``log[low:high]``: under the lock, where the log is
        not cut meanwhile); None when there are none or they are not a run of the
        ring (then they are for :meth:`move`)."""
        with self.lock:
            moved = self._moved.get(outbox)
            # (its queue is looked at here, where spill() cannot move entries into it
            # meanwhile: its virtual events must be older than anything queued)
            if moved is None or outbox.lane[0]:
                return None
            log = self.log
            low, high = moved - self._base, len(log)
            if low >= high or log[high - 1][3] - log[low][3] != high - low - 1:
                return None
            made = frames(log, low, high)
            self._moved[outbox] = moved + high - low
            if self._held[outbox] is None:
                self._held[outbox] = moved  # (its cursor stays where it was)
            return high - low, made

    def entries(self, outbox: Outbox, n: int) -> list[Any]:
        """The first ``n`` of ``outbox``'s virtual events' entries."""
        with self.lock:
            held = self._held[outbox]
            assert held is not None
            return self.log[held - self._base:held - self._base + n]

    def untaken_count(self, outbox: Outbox) -> int:
        """How many entries of the log ``outbox`` has not taken yet (no lock)."""
        moved = self._moved.get(outbox)
        return 0 if moved is None else max(self._base + len(self.log) - moved, 0)

    def untaken(self, outbox: Outbox) -> list[Any]:
        """The entries of the log ``outbox`` has not taken yet."""
        with self.lock:
            moved = self._moved.get(outbox)
            return [] if moved is None else self.log[moved - self._base:]

    def release(self, outbox: Outbox, n: int, left: int) -> None:
        """``outbox``'s first ``n`` virtual events were acknowledged (or given up);
        ``left`` of them remain."""
        with self.lock:
            held = self._held[outbox]
            assert held is not None
            self._held[outbox] = held + n if left else None
            self._advanced(held)

    def refresh(self) -> None:
        """Let the log grow while each member's queue has room for all of it."""
        with self.lock:
            self._refresh()

    def _refresh(self) -> None:
        # A member's lane counts its virtual events against its room, and those of
        # this group are in the log too: counted once, with the log.
        if not self.sealed:
            self.lane[1] = min(map(self._room_of, self.members))
            if self._waiting and len(self.log) < self.lane[1]:
                self._room.notify_all()

    def wait_for_room(self) -> bool:
        """Wait until the log has room for one more entry, as long as a trigger would
        wait for each member's own room (``Outbox.would_wait``, up to the least
        ``block``); False when it would not, or no room came meanwhile: then the
        members without room drop their events until they catch up, as after a
        trigger's wait for their own room."""
        members = self.members
        if not all(outbox.would_wait() for outbox in members):
            return False
        deadline = time.monotonic() + min(outbox.block for outbox in members)
        with self.lock:
            self._waiting += 1
            try:
                while True:
                    if self.sealed:  # (the routes changed: the members' own ways, as they are)
                        return False
                    self._refresh()  # (the members' own queues are not watched: looked at here)
                    if len(self.log) < self.lane[1]:
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._room.wait(min(remaining, ROOM_POLL))
            finally:
                self._waiting -= 1
            full = [outbox for outbox in members  # (the log's untaken entries fill them)
                    if outbox.lane[1] - len(outbox.lane[0]) <= self.untaken_count(outbox)]
        for outbox in full:  # (not under the group's lock: an outbox's lock comes first)
            outbox.congest()
        return False

    def _room_of(self, outbox: Outbox) -> int:
        room: int = outbox.lane[1] - len(outbox.lane[0]) + outbox.virtual_in(self)
        return room

    def spill(self) -> None:
        """Move the whole log into every member's queue."""
        with self.lock:
            for outbox in self.members:
                self._move(outbox)

    def wake(self) -> None:
        """Wake the publisher's courier if it waits for work (a trigger saw it idle)."""
        for outbox in self.members:
            courier = outbox.courier
            if courier is not None:
                courier.wake()
                return

    def close(self) -> None:
        """Take nothing more; the members' queues get what the log holds for them
        (their virtual events stay in it until acknowledged)."""
        with self.lock:
            if self.sealed:
                return
            self.lane[1] = 0  # first: no trigger appends once the log is moved
            self.sealed = True
            self._room.notify_all()
            for outbox in self.members:
                self._move(outbox)


def regroup(routes: dict[str, list[Outbox]], outboxes: Iterable[Outbox],
            old: dict[frozenset[Outbox], EventGroup], ring: EventRing | None
            ) -> dict[frozenset[Outbox], EventGroup]:
    """The groups of ``routes`` (event -> outboxes): the ``old`` ones that still fit,
    new ones for the rest; the other old ones close before their members join new
    ones.  A group needs ``ring`` (None: no groups), two outboxes or more writing to
    it, and none of them in a route with other outboxes."""
    keys: dict[Outbox, frozenset[Outbox]] = {}
    mixed: set[Outbox] = set()  # outboxes of routes with other outboxes each
    for boxes in routes.values():
        key = frozenset(boxes)
        for outbox in boxes:
            if keys.setdefault(outbox, key) != key:
                mixed.add(outbox)
    groups: dict[frozenset[Outbox], EventGroup] = {}
    if ring is not None:
        for key in set(keys.values()):
            if len(key) > 1 and not (key & mixed) and all(
                    box.accepting and box.ring is ring for box in key):
                group = old.get(key)
                groups[key] = group if group is not None and not group.sealed \
                    else EventGroup(key)
    for key, group in old.items():
        if groups.get(key) is not group:
            group.close()
    for outbox in outboxes:
        found = keys.get(outbox)
        outbox.group = None if found is None else groups.get(found)
    return groups


class Route(tuple):  # type: ignore[type-arg]
    """The outboxes an event goes to.

    ``lanes`` are what a trigger queues on: the outboxes' own (``members``),
    or the one lane of their ``group``.  ``ring``: the event ring its items
    are written into (see :mod:`localnet._ring`), for a route of two outboxes
    or more (for one, the ring would only add a step).
    """

    lanes: tuple[list[Any], ...]
    members: tuple[list[Any], ...]
    group: EventGroup | None
    ring: EventRing | None
    joined: bool

    def __new__(cls, outboxes: list[Outbox], group: EventGroup | None = None) -> Route:
        route = super().__new__(cls, outboxes)
        route.members = tuple(outbox.lane for outbox in outboxes)
        route.group = group
        route.lanes = (group.lane,) if group is not None else route.members
        ring = outboxes[0].ring if len(outboxes) > 1 else None
        route.ring = ring if all(outbox.ring is ring for outbox in outboxes) else None
        route.joined = False  # (its outboxes are not yet known to the ring)
        return route


def fan_out(route: Route, event: str, item: bytes) -> bool:
    """Queue one event's item for every outbox of ``route``, without taking their
    locks (see :class:`~localnet._events.Outbox`); a full or closing outbox takes
    the locked path.  With a ring, the item is written once into it; when it has
    no room, every outbox takes the locked path.

    Returns True when a retiring outbox refused it (see ``Publisher._reroute``).
    """
    ring = route.ring
    if ring is None:
        rest = take((event, item), route.lanes)
    else:
        if not route.joined:  # its outboxes may hold the ring's entries from now on
            ring.join(route)
            if route.group is not None:
                ring.join((route.group,))
            route.joined = True
        rest = ring.fan_out(route.lanes, event, item)
        if rest is False:  # no room in the ring: each subscriber's own way
            return put_all(route, event, item)
    return rest is not None and finish_fan_out(route, event, item, rest)


def finish_fan_out(route: Route, event: str, item: bytes,
                   rest: tuple[list[int], list[int]]) -> bool:
    """After the lanes took ``item``: wake the courier of the idle lanes (``rest[0]``,
    indices into ``route.lanes``) and put it, locked, into the outboxes that had no
    room (``rest[1]``); True when a retiring one refused it.  A group whose log had
    no room spills, and the item goes each member's own way."""
    idle, full = rest
    group = route.group
    if group is not None:
        if idle:
            group.wake()
        if not full:
            return False
        if route.ring is not None and group.wait_for_room():  # (the courier runs meanwhile)
            again = route.ring.fan_out(route.lanes, event, item)
            if again is None:
                return False
            if again is not False and not again[1]:
                if again[0]:
                    group.wake()
                return False
            # (another trigger took the room first, or the ring is full: as below)
        group.spill()
        own = take_own(route, event, item)
        group.refresh()  # (for the next triggers: the room the members have now)
        if own is False:  # no room in the ring
            return put_all(route, event, item)
        if own is None:
            return False
        idle, full = own
    for i in idle:
        route[i].wake()
    moved = False
    for i in full:
        outbox = route[i]
        if not outbox.put(event, item) and outbox.retiring:  # drop, or wait for room
            moved = True
    return moved


def take_own(route: Route, event: str, item: bytes) -> Any:
    """Queue ``item`` on each outbox's own lane (through the ring, if the route has
    one): what ``take`` or ``EventRing.fan_out`` return."""
    if route.ring is None:
        return take((event, item), route.members)
    return route.ring.fan_out(route.members, event, item)


def put_all(outboxes: tuple[Outbox, ...], event: str, frame: Any) -> bool:
    """Queue one event for every outbox through :meth:`Outbox.put`; as :func:`fan_out`."""
    moved = False
    for outbox in outboxes:
        if not outbox.put(event, frame) and outbox.retiring:
            moved = True
    return moved
