"""Counters and the frozen records ``peer.stats()`` returns.

The counters themselves live where they are bumped, in plain lists for
speed: the calling side's ``[made]``, the serving side's ``[served,
errors]`` and per-event ``[received, handled, failed]``, and each outbox's
per-event ``[sent, delivered, dropped, failed]``.  :func:`snapshot` turns
them into these records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EventCounts:
    """Delivery counts for one event or one subscriber, as seen by the publisher.

    ``sent``: accepted for delivery; ``delivered``: acknowledged after the
    subscriber's handlers ran; ``dropped``: refused because the subscriber's
    queue was full; ``failed``: sent but never acknowledged (the subscriber
    died or left first), or acknowledged as not handled (the subscriber could
    not rebuild it, or one of its handlers raised or returned an awaitable).
    Events still on their way are the difference ``sent - delivered - failed``.
    """

    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    failed: int = 0


@dataclass(frozen=True)
class ReceivedCounts:
    """What this peer's handlers did with one event: ``received``, ``handled``, ``failed``."""

    received: int = 0
    handled: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Stats:
    """A snapshot of a peer's counters (``peer.stats()``)."""

    calls_made: int
    calls_served: int
    call_errors: int
    published: Mapping[str, EventCounts] = field(default_factory=dict)
    subscribers: Mapping[str, EventCounts] = field(default_factory=dict)
    received: Mapping[str, ReceivedCounts] = field(default_factory=dict)
    registry_recoveries: int = 0


def add_into(row: list[int], counts: Iterable[int]) -> None:
    """Add ``counts`` to ``row``, position by position."""
    for i, n in enumerate(counts):
        row[i] += n


def snapshot(calls_made: int, calls_served: int, call_errors: int,
             delivery: Iterable[tuple[str, str, list[int]]],
             received: Mapping[str, list[int]], recoveries: int) -> Stats:
    """A :class:`Stats` from the raw counters.

    ``delivery`` holds ``(event, subscriber, [sent, delivered, dropped,
    failed])`` rows; they are summed per event and per subscriber.
    """
    published: dict[str, list[int]] = {}
    subscribers: dict[str, list[int]] = {}
    for event, name, counts in delivery:
        add_into(published.setdefault(event, [0, 0, 0, 0]), counts)
        add_into(subscribers.setdefault(name, [0, 0, 0, 0]), counts)
    return Stats(
        calls_made=calls_made, calls_served=calls_served, call_errors=call_errors,
        published={k: EventCounts(*v) for k, v in published.items()},
        subscribers={k: EventCounts(*v) for k, v in subscribers.items()},
        received={k: ReceivedCounts(*v) for k, v in list(received.items())},
        registry_recoveries=recoveries,
    )
