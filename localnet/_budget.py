"""The bytes an outbox holds for its subscriber, and their bound (``event_bytes``).

Every event a subscriber has not acknowledged stays in its publisher: the
inline bytes (an item, a whole pickle, the body of a shared-memory payload)
and the shared memory its buffers occupy.  A stopped or slow subscriber
would otherwise let a publisher of large arrays grow without limit, so each
outbox bounds these bytes as it bounds the number of events
(``event_queue``), with the same rule: a trigger that finds no room waits up
to ``event_block`` seconds, then drops the event for that subscriber and
counts it.  A payload's segments count for every subscriber that holds them.

One event larger than the whole bound still goes to a subscriber that holds
nothing else (it has acknowledged everything): a publisher holds at most
``max(event_bytes, one event)`` per subscriber.

Counting costs the common path nothing.  A trigger of small events appends
an item to the queue without a lock and counts nothing (``fan_out`` in
localnet._events); items are at most ``item_max`` bytes, so as long as the
queue is shorter than :meth:`Budget.room` another item fits whatever the
uncounted ones weigh.  Only past that are the items counted, each once,
under the outbox's lock.  With the defaults (10,000 events of at most 16 KiB
against 256 MiB) small events never get there.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Any

try:  # the sums in C (about 3 ns an entry, against 0.3-0.5 µs): optional, see _speedups.c
    from ._speedups import sizes as _c_sizes
except ImportError:  # built without a C compiler
    _c_sizes = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._serial import Payload

#: The default bound on the bytes held for one subscriber (``Peer(event_bytes=)``):
#: above what 10,000 small events can hold (at most 16 KiB each, 156 MiB), so
#: small events meet only the event bound and are never counted; as large as
#: the largest inline message (``max_frame``); 15 arrays of 16 MiB, or 255 of
#: 1 MiB (the shared-memory threshold), so also at most about 256 descriptors.
DEFAULT_EVENT_BYTES = 256 * 1024 * 1024

#: (event, frame), or for an item in the event ring (event, item, position, number).
Entry = tuple[Any, ...]


def size_of(frame: bytes | Payload) -> int:
    """The bytes a queued frame holds: its length, or a payload's ``nbytes``."""
    return len(frame) if type(frame) is bytes else frame.nbytes  # type: ignore[union-attr]


def _heavy_size(frame: bytes | Payload) -> int:
    """The size of a frame that is not an item (counted when queued), else 0."""
    if type(frame) is bytes:
        return len(frame) if frame[0] == 0x80 else 0
    return frame.nbytes  # type: ignore[union-attr]


def _item_size(frame: bytes | Payload) -> int:
    """The size of an item (counted late, see :class:`Budget`), else 0."""
    return len(frame) if type(frame) is bytes and frame[0] != 0x80 else 0


#: What :func:`sizes` counts: the items, the rest, or both.
ITEMS, HEAVY, ALL = range(3)
_SIZE_OF = (_item_size, _heavy_size, size_of)


def sizes(entries: list[Entry], start: int, end: int, mode: int) -> int:
    """The bytes the frames of ``entries[start:end]`` hold, as ``mode`` counts them."""
    if _c_sizes is not None:
        return _c_sizes(entries, start, end, mode)
    size = _SIZE_OF[mode]
    return sum(size(entry[1]) for entry in islice(entries, start, end))


class Budget:
    """The bytes held by one outbox's queue; used under the outbox's lock.

    ``held`` counts every entry that is not an item (whole pickles, payloads:
    :meth:`add` when queued) and the items among the first ``counted``
    entries; the items past those were appended without a lock and are not
    counted yet, but each is at most ``item_max`` bytes.
    """

    __slots__ = ("limit", "held", "counted", "_events", "_item_max")

    def __init__(self, limit: int, events: int, item_max: int) -> None:
        self.limit = limit
        self.held = 0
        self.counted = 0
        self._events = events  # the bound on entries (event_queue)
        self._item_max = item_max

    def __repr__(self) -> str:
        return f"<Budget held={self.held} of {self.limit} counted={self.counted}>"

    def room(self) -> int:
        """The queue length below which one more item fits, uncounted (and the
        event bound allows it): what a lock-free trigger compares against."""
        spare = max(self.limit - self.held, 0) // self._item_max
        return min(self._events, self.counted + spare)

    def fits(self, queue: list[Entry], size: int, extra: int = 0) -> bool:
        """Whether an event of ``size`` bytes may join ``queue`` now (``extra``: items
        held besides the queue, uncounted: see ``Outbox._virtual``)."""
        n = len(queue) + extra
        if n >= self._events:
            return False
        if not n:
            return True  # one event of any size, for a subscriber that holds nothing
        if self.held + (n - self.counted) * self._item_max + size <= self.limit:
            return True  # whatever the uncounted items weigh
        self.count(queue)
        return self.held + extra * self._item_max + size <= self.limit

    def over(self, queue: list[Entry], fraction: float) -> bool:
        """Whether ``queue`` holds more than ``fraction`` of the limit (counting it)."""
        self.count(queue)
        return self.held > self.limit * fraction

    def count(self, queue: list[Entry]) -> None:
        """Count the items queued since the last count."""
        end = len(queue)  # (triggers may append meanwhile: those wait for the next count)
        if end > self.counted:
            self.held += sizes(queue, self.counted, end, ITEMS)
            self.counted = end

    def add(self, frame: bytes | Payload) -> None:
        """A frame that is not an item was queued (its size is counted at once)."""
        self.held += _heavy_size(frame)

    def cut(self, done: list[Entry]) -> None:
        """``done`` left the front of the queue (acknowledged); only needed while ``held``."""
        counted, n = self.counted, len(done)
        if counted >= n:
            self.held -= sizes(done, 0, n, ALL)
            self.counted = counted - n
        else:
            self.held -= sizes(done, 0, counted, ALL) + sizes(done, counted, n, HEAVY)
            self.counted = 0

    def clear(self) -> None:
        """The queue was emptied (the outbox closed)."""
        self.held = self.counted = 0
