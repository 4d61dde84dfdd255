"""The trigger's lock-free hand-off of an event to its subscribers' outboxes.

Each outbox keeps what a trigger reads in one list, its *lane*: ``[queue,
room, courier idle]`` (see :class:`~localnet._events.Outbox`).  :func:`take`
appends one entry to the queue of every lane with room, without a lock
(``list.append`` is atomic), in C where the extension is built
(``localnet._speedups.fan_out``: about 11 ns a lane, against 77 in Python).
"""

from __future__ import annotations

from typing import Any

try:  # the C fan-out (optional, see localnet/_speedups.c)
    from . import _speedups
except ImportError:  # built without a C compiler
    _speedups = None  # type: ignore[assignment]
c_fan_out = None if _speedups is None else _speedups.fan_out
c_ring_fan_out = None if _speedups is None else _speedups.ring_fan_out
c_ring_run = None if _speedups is None else _speedups.ring_run
c_ring_frames = getattr(_speedups, "ring_frames", None)  # (None: an older build)

Rest = tuple[list[int], list[int]]


def take(entry: tuple[Any, ...], lanes: tuple[list[Any], ...]) -> Rest | None:
    """Append ``entry`` to the queue of every lane with room; None when all took it
    and the courier was not idle, else ``(idle, full)``: the indices of the lanes whose
    courier waits (to wake) and of those without room (for the locked path)."""
    if c_fan_out is not None:  # the same in C: no lookups, a few ns a lane
        return c_fan_out(lanes, entry)
    idle, full = [], []
    for i, lane in enumerate(lanes):
        queue = lane[0]
        if len(queue) < lane[1]:
            queue.append(entry)
            if lane[2]:  # (appended first, then looked: see Outbox._write_loop)
                idle.append(i)
        else:
            full.append(i)
    return (idle, full) if idle or full else None
