"""What happened to one subscriber's events, per event: the counts of an outbox.

An :class:`~localnet._events.Outbox` keeps one :class:`Tally` and calls it with
its lock held: events *delivered* (acknowledged after the subscriber's
handlers ran), *dropped* (refused because the outbox was full), *failed*
(sent but never acknowledged, or acknowledged as failed); and the events it
carries at all, since while that is one event an acknowledgement adds its
count once instead of looking at every entry.  Entries are the outbox's
``(event, frame, ...)`` tuples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

event_of = itemgetter(0)


class Tally:
    """The per-event counts of one outbox (see the module's docstring)."""

    __slots__ = ("delivered", "dropped", "events", "failed", "only")

    def __init__(self) -> None:
        self.delivered: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.dropped: dict[str, int] = {}
        self.events: set[str] = set()  # the events ever routed to the outbox
        self.only: str | None = None  # ... when that is one event

    def carry(self, events: set[str]) -> None:
        """Note events routed to the outbox (before any of them is queued)."""
        self.events |= events
        self.only = next(iter(self.events)) if len(self.events) == 1 else None

    def drop(self, event: str) -> None:
        self.dropped[event] = self.dropped.get(event, 0) + 1

    def lost(self, entries: Iterable[Any]) -> None:
        """Count ``entries`` failed: never acknowledged, and never will be."""
        self.failed.update(map(event_of, entries))

    def acknowledged(self, done: list[Any], n: int, ranges: list[tuple[int, int]] | None,
                     first: int) -> None:
        """Count ``n`` acknowledged events delivered, numbered from ``first``,
        but those in ``ranges`` failed.  ``done`` holds their entries; it may
        be empty when there is no range and the outbox carries one event."""
        if ranges:
            start = 0
            for low, high in ranges:
                self.delivered.update(map(event_of, done[start:low - first]))
                self.failed.update(map(event_of, done[low - first:high - first + 1]))
                start = high - first + 1
            self.delivered.update(map(event_of, done[start:]))
        elif self.only is not None:
            self.delivered[self.only] += n
        else:
            self.delivered.update(map(event_of, done))  # counted in C

    def totals(self, pending: Counter[str], closed: bool
               ) -> dict[str, tuple[int, int, int, int]]:
        """Per event: (sent, delivered, dropped, failed), with ``pending`` the
        entries queued or unacknowledged (failed, once the outbox is closed)."""
        failed = self.failed
        if closed:  # appended by a trigger that raced with close()
            failed, pending = failed + pending, Counter()
        events = set(pending) | set(self.delivered) | set(failed) | set(self.dropped)
        result = {}
        for event in events:
            delivered, lost = self.delivered[event], failed[event]
            result[event] = (delivered + lost + pending[event], delivered,
                             self.dropped.get(event, 0), lost)
        return result
