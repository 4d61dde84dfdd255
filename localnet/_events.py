"""The publishing side: one outbox per subscriber peer.

A trigger pickles its event once and appends the bytes to the outbox of
every subscriber whose subscription matches this publisher, without a lock
(:func:`fan_out`); it never waits for the network.  The publisher's
courier (:mod:`localnet._courier`, one thread for all its outboxes) sends
whatever has queued up, packed into frames of up to ``EVENT_BATCH`` bytes
each (a burst of events costs a few system calls and a few frame headers,
not one each), and reads the acknowledgements, which the outbox counts.

Bounds (per subscriber): at most ``limit`` events, and ``max_bytes`` bytes
(:mod:`localnet._budget`), may be queued or in flight unacknowledged.  When
an outbox is full, a trigger waits up to ``block`` seconds for room, then
drops the event for that subscriber only, logs it, counts it, and marks the
outbox *congested*: further events for it are dropped at once, without
waiting, until it has drained to half of both limits.
A stopped or slow subscriber therefore delays a trigger by at most
``block`` seconds once, and never blocks the other subscribers.

Counts, per event and per subscriber (:mod:`localnet._tally`): ``sent``
(accepted into the outbox), ``delivered`` (acknowledged after the
subscriber's handlers ran), ``dropped`` (refused because the outbox was
full) and ``failed`` (sent but never acknowledged: the subscriber died or
left first; or acknowledged as failed: the subscriber could not rebuild it,
or a handler raised).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _liveness
from ._budget import Budget, size_of
from ._ring import EventRing
from ._serial import ITEM_MAX, Payload
from ._signals import spawn_thread
from ._tally import Tally, event_of
from ._wire import Kind, ProtocolError, encode_control, send_frame, unpack_ack

if TYPE_CHECKING:
    from ._courier import Courier
    from ._routes import EventGroup

logger = logging.getLogger("localnet.events")


class _Waiting(threading.local):
    # False on a thread whose triggers must not wait for room (an awaited
    # trigger waited on its loop already, see localnet._atwins).
    allowed = True


waiting = _Waiting()


class Outbox:
    """Events queued for, and in flight to, one subscriber peer.

    ``_queue`` lists the events queued or unacknowledged, oldest first, as
    ``(event, frame)`` pairs; its first ``_written`` entries were handed to
    the socket.  A frame is an item or a whole pickle (bytes), which the
    courier packs into batch frames, or a :class:`Payload` (shared memory),
    sent alone.  Each outbox numbers its channel's events 1, 2, 3 ...: the
    entry at index i is event ``_base + i + 1``, and an acknowledgement
    (cumulative) cuts its events from the front.

    The trigger side appends items to ``_queue`` without the lock while it
    is shorter than ``room`` (:func:`fan_out`; ``list.append`` is atomic;
    ``room`` keeps both bounds, see :class:`~localnet._budget.Budget`, and is
    0 once the outbox no longer accepts): the
    courier's :meth:`take` and :meth:`acknowledge`, which hold the lock, only cut
    from the front and read below the length they saw, so an append never
    moves what they index.  Everything else -
    shared-memory payloads, whole pickles, a full, retiring or closed
    outbox - goes through :meth:`put`, under the lock.  (Two threads
    triggering at once may each see room for one more event: the bound is
    ``limit`` plus at most one event per such thread.)

    What the trigger side reads is kept in one list, ``lane``: ``[_queue,
    room, courier idle]``, so that the C fan-out (``localnet._speedups``)
    reads it without an attribute lookup.

    An outbox of an event group (:mod:`localnet._routes`) has more events
    than its queue shows: before them, ``_virtual`` events sent straight from
    the log of ``_vgroup`` and not acknowledged yet (so the entry at index i
    is event ``_base + _virtual + i + 1``, and an acknowledgement counts the
    virtual ones down first); after them, what its group's log holds that it
    has not taken yet.  ``room`` counts the virtual events too.
    """

    def __init__(self, entry: dict[str, Any], hello: dict[str, Any],
                 courier: Callable[[], Courier], limit: int, block: float, max_bytes: int,
                 on_dead: Callable[[Outbox, str], None],
                 delay: float = 0.0, ring: EventRing | None = None) -> None:
        self.name = str(entry["name"])
        self.pid = int(entry["pid"])
        self.started = float(entry["started"])
        ticks = entry.get("ticks")
        self.ticks = ticks if type(ticks) is int else None
        self.address = str(entry["address"])
        self.key = (self.name, self.pid, self.started, self.address)
        self._hello = hello
        self.limit = limit
        self.block = block
        self._budget = Budget(max_bytes, limit, ITEM_MAX)
        # fan_out appends while the queue is shorter than lane[1] (room); lane[2]:
        # the courier waits for work (a trigger wakes it)
        self.lane: list[Any] = [None, self._budget.room(), False]
        self._on_dead = on_dead
        lock = self._lock = threading.Lock()
        self._has_work = threading.Condition(lock)
        self._has_room = threading.Condition(lock)
        self._queue: list[tuple[str, bytes | Payload]] = []
        self.lane[0] = self._queue
        self._base = 0  # the last event cut from the queue (acknowledged)
        self._written = 0  # entries of _queue handed to the socket
        self._payloads = 0  # shared-memory payloads in _queue
        self._mixed = False  # unwritten entries hold more than items
        self.accepting = True  # neither closed nor retiring: fan_out may append
        self._congested = False
        self.closed = False
        self.retiring = False
        self._tally = Tally()  # the counts per event
        self._sock: socket.socket | None = None
        self._delay = delay  # before connecting: the subscriber was unreachable a moment ago
        # The publisher's event ring (localnet._ring), once it has one: entries
        # of 4 come from it, and a run of only those goes as RING frames.
        self.ring = ring
        self.ring_sent = False  # the ring's descriptor went to the subscriber
        self._courier_of = courier  # the publisher's courier (started on first use)
        self._courier: Courier | None = None  # ... once it serves this outbox
        # The group this outbox shares a lane with (localnet._routes), if any: its
        # log holds events of this outbox that are not in the queue yet.
        self.group: EventGroup | None = None
        # Events sent straight from a group's log (EventGroup.take): the oldest
        # ``_virtual`` events not yet acknowledged are there, not in the queue.
        self._virtual = 0
        self._vgroup: EventGroup | None = None
        spawn_thread(self._connect_loop, name="localnet-connect")

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "CONGESTED" if self._congested else "OPEN"
        pending = self._virtual + len(self._queue)
        return (f"<Outbox to {self.name!r} queued={self._base + pending} "
                f"acked={self._base} pending={pending} [{state}]>")

    @property
    def courier(self) -> Courier | None:
        """The publisher's courier, once it serves this outbox."""
        return self._courier

    @property
    def acked(self) -> int:
        """The number of events this subscriber has acknowledged."""
        return self._base

    # -- the trigger side ---------------------------------------------------
    def put(self, event: str, frame: bytes | Payload) -> bool:
        """Queue one event's frame; False when it was dropped (full or closed).

        An outbox that retired and closed (it left the routes) does not count
        the event dropped: it no longer subscribes to it (the trigger sends it
        to whichever outbox replaced this one, see ``Publisher._reroute``).

        ``frame`` is the event's item or whole pickle (``dumps_event``), or
        for shared memory a :class:`Payload` held once for this outbox,
        which the outbox settles when the event is acknowledged, or at once
        when it is dropped.
        """
        size = size_of(frame)
        with self._lock:
            group = self.group
            if group is not None:  # (what its log holds for us came first)
                group.move(self)
            budget = self._budget
            # A retiring outbox still takes the events of triggers that found
            # it in the routes before it left them: its subscriber handles them
            # before it closes, and no other outbox got them.
            if self.closed or (not budget.fits(self._queue, size, self._virtual)
                               and not self._wait_for_room(size)):
                if not (self.closed and self.retiring):  # (else: no longer its event)
                    self._tally.drop(event)
                if type(frame) is not bytes:
                    frame.settle()  # type: ignore[union-attr]
                return False
            self._queue.append((event, frame))
            kind = kind_of(frame)
            if kind != ITEM:
                self._mixed = True
                budget.add(frame)
                if kind == PAYLOAD:
                    self._payloads += 1
            if self.accepting:
                self.lane[1] = budget.room() - self._virtual
            if group is not None:
                group.refresh()
            self._notify_courier()
            return True

    def wake(self) -> None:
        """Wake the courier if it waits for work (fan_out saw it idle)."""
        courier = self._courier
        if courier is not None:
            courier.wake()

    def _notify_courier(self) -> None:
        if self.lane[2]:
            self.wake()

    def carry(self, events: set[str]) -> None:
        """Note the events routed to this outbox (before any of them is queued).

        While it only ever carried one event, an acknowledgement counts its
        events delivered with one addition instead of one count per event.
        """
        with self._lock:
            self._tally.carry(events)

    def ring_hold(self) -> int | None:
        """The ring position of the oldest ring entry queued here (None: there is none)."""
        with self._lock:
            for entry in self._queue:
                if len(entry) == 4:
                    return int(entry[2])
        return None

    def mark(self) -> int:
        """The sequence of the last event queued here."""
        with self._lock:
            return self._base + self._virtual + len(self._queue) + self._untaken()

    def _wait_for_room(self, size: int) -> bool:
        # called with the lock held and no room for ``size`` bytes
        budget, queue = self._budget, self._queue
        if not self._congested and self.block > 0 and waiting.allowed:
            deadline = time.monotonic() + self.block
            while not self.closed and not budget.fits(queue, size, self._virtual):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._has_room.wait(remaining)
            else:
                return not self.closed
        self._congest()
        return False

    def _congest(self) -> None:
        # with the lock held: drop this subscriber's events without waiting until it catches up
        if not self._congested:
            self._congested = True
            self._budget.count(self._queue)
            logger.warning("subscriber %r is not keeping up (%d events, %d bytes "
                           "unacknowledged); dropping its events until it catches up",
                           self.name, len(self._queue) + self._virtual, self._budget.held)

    def congest(self) -> None:
        """A trigger waited for room here in vain (on its group, see
        ``EventGroup.wait_for_room``): drop without waiting until it catches up."""
        with self._lock:
            if not self.closed:
                self._congest()

    def would_wait(self) -> bool:
        """True when a trigger that finds no room here would wait for it (no lock)."""
        return not self._congested and self.block > 0 and waiting.allowed and not self.closed

    def has_room(self) -> bool:
        """True when a trigger would not wait for room here now (a small event fits,
        or the outbox drops without waiting)."""
        with self._lock:
            return self.closed or self._congested or self.block <= 0 \
                or self._budget.fits(self._queue, 0, self._virtual + self._untaken())

    def wait_delivered(self, seq: int, deadline: float) -> bool:
        """Wait until event ``seq`` (see :meth:`mark`) was acknowledged (or can never be)."""
        with self._lock:
            while self._base < seq and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._has_room.wait(remaining)
            return True

    # -- the network side (the publisher's courier, see localnet._courier) ----
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
            if not _liveness.same_user(sock):
                raise ProtocolError("the subscriber runs as another user")
            send_frame(sock, Kind.HELLO, 0, encode_control(self._hello))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_loop(self) -> None:
        """Connect (after ``delay``), then hand the socket to the courier."""
        if self._delay:  # events queue meanwhile, and go once connected
            deadline = time.monotonic() + self._delay
            with self._lock:
                while not self.closed and time.monotonic() < deadline:
                    self._has_work.wait(deadline - time.monotonic())
        try:
            courier = self._courier_of()
            sock = self._connect()
        except Exception as exc:  # whatever the address or the peer, never die silently
            self.fail(f"cannot connect: {exc}")
            return
        with self._lock:
            if not self.closed:
                self._sock, self._courier = sock, courier
        if self._sock is not sock or not courier.attach(self, sock):
            sock.close()
            self.fail("the publisher closed")

    def unwritten(self) -> bool:
        """True when events were queued since the courier last took them."""
        group = self.group
        return len(self._queue) > self._written or (group is not None and group.behind(self))

    def virtual_in(self, group: EventGroup) -> int:
        """How many of this outbox's virtual events ``group``'s log holds (no lock)."""
        return self._virtual if self._vgroup is group else 0

    def _untaken(self) -> int:
        """How many events the group's log holds for this outbox past its queue."""
        group = self.group
        return 0 if group is None else group.untaken_count(self)

    def take(self) -> tuple[list[Any], int, bool, Any] | None:
        """The entries queued since the last time, the number of the first, whether
        they hold more than items, and what is known of them: True, a run of the
        event ring (see ``_ring.is_ring_run``); ``CHUNKS``, they were sent straight
        from the group's log (virtual events, see ``EventGroup.take``) and the
        entries are the chunks that carry them; else None.  None when there are none."""
        ring = self.ring
        # (the ring's descriptor for the first frame: dup() takes the ring's lock,
        # which a trigger holds while it asks the outboxes what they hold)
        spare: list[int] = []
        group = self.group
        if ring is not None and group is not None and not self.ring_sent and not self._queue \
                and group.behind(self):
            try:
                spare.append(ring.dup())
            except OSError:  # (the ring closed: the queue's way, as chunks_of says)
                pass
        try:
            with self._lock:
                if self.closed:
                    return None
                group, written = self.group, self._written
                if group is not None and ring is not None and (self.ring_sent or spare) \
                        and (not self._virtual or self._vgroup is group):
                    first = self._base + self._virtual + 1

                    def frames(log: list[Any], low: int, high: int) -> list[Any]:
                        fd = None if self.ring_sent else spare.pop()
                        self.ring_sent = True
                        return ring.chunks(log, first, fd, low, high)

                    sent = group.take(self, frames)  # (only while the queue is empty)
                    if sent is not None:
                        self._virtual += sent[0]
                        self._vgroup = group
                        if self.accepting:
                            self.lane[1] = self._budget.room() - self._virtual
                        return sent[1], first, False, CHUNKS
                return self._take_queue(group, written)
        finally:
            for fd in spare:  # (not needed after all)
                os.close(fd)

    def _take_queue(self, group: EventGroup | None, written: int
                    ) -> tuple[list[Any], int, bool, Any] | None:
        """The rest of :meth:`take`: the queue's entries (with the lock)."""
        queue = self._queue
        fresh = len(queue) == written
        moved = group.move(self) if group is not None else None
        end = len(queue)
        if end <= written:
            return None
        if fresh and moved is not None and len(moved) == end - written:
            entries, run = moved, is_log_run(moved) or None  # (from the log: no copy)
        else:
            entries, run = queue[written:end], None
        first = self._base + self._virtual + written + 1
        self._written = end
        mixed, self._mixed = self._mixed, False
        return entries, first, mixed, run

    def acknowledge(self, seq: int, body: bytes) -> bool:
        """The subscriber handled every event up to ``seq`` (``body``: the ranges
        of those that failed); True when this outbox retired and is now settled.

        Raises:
            ProtocolError: ``seq`` was never sent, or ``body`` is malformed.
        """
        queue = self._queue
        settle: list[Payload] = []
        with self._lock:
            n = seq - self._base
            virtual = self._virtual
            if n > virtual + self._written:
                raise ProtocolError(f"the subscriber acknowledged event {seq}, "
                                    f"which was never sent")
            failed = unpack_ack(body, self._base, seq) if body else None
            tally = self._tally
            simple = not failed and tally.only is not None and not self._budget.held \
                and not self._payloads  # the common case: nothing to look at in them
            v = min(max(n, 0), virtual)  # (the oldest events: the virtual ones first)
            q = n - v
            done: list[Any] = []
            if v:
                group = self._vgroup
                assert group is not None
                if not simple:
                    done = group.entries(self, v)
                self._virtual = virtual - v
                if self.accepting:  # (first: the group's room is worked out from it)
                    self.lane[1] = self._budget.room() - self._virtual
                group.release(self, v, self._virtual)
                if not self._virtual:
                    self._vgroup = None
            if n > 0 and simple:
                if q:
                    del queue[:q]
                tally.acknowledged(done, n, None, seq - n + 1)
                self._base = seq
                self._written -= q
            elif n > 0:
                part = queue[:q]
                del queue[:q]
                done += part
                # (failed: the ranges of those that could not be handled)
                tally.acknowledged(done, n, failed, self._base + 1)
                self._base = seq
                self._written -= q
                if self._budget.held:  # (0 while only uncounted items are queued)
                    self._budget.cut(part)
                    if self.accepting:
                        self.lane[1] = self._budget.room() - self._virtual
                if self._payloads:
                    settle = _payloads_in(part)
                    self._payloads -= len(settle)
            if self._congested and len(queue) + self._virtual <= self.limit // 2 \
                    and not self._budget.over(queue, 0.5):
                self._congested = False
                logger.info("subscriber %r caught up", self.name)
            self._has_room.notify_all()
            settled = self.retiring and not queue and not self._virtual
        for payload in settle:
            payload.settle()
        return settled

    def retire(self) -> None:
        """Close once the events queued so far are acknowledged.

        For a subscriber that unsubscribed, left, or handed its subscriptions
        over: what it was sent still reaches it (it drains its channels before
        closing).  Called once no route leads here any more; only a trigger
        that looked the routes up just before may still queue an event.
        """
        with self._lock:
            if self.closed:
                return
            self._leave_group()
            self.retiring = True
            self.accepting = False
            self.lane[1] = 0
            settled = not self._queue and not self._virtual
        if settled:
            self.close()

    def _give_up_virtual(self) -> None:
        """Count the virtual events failed, and let the log go of them (closing)."""
        group, n = self._vgroup, self._virtual
        if group is not None and n:
            self._tally.lost(group.entries(self, n))
            group.release(self, n, 0)
        self._virtual, self._vgroup = 0, None

    def _leave_group(self) -> None:
        """Close the group (its other members go their own ways until the routes
        are made again); this outbox's queue gets what the log held for it."""
        group = self.group
        if group is not None:
            group.close()

    def fail(self, reason: str) -> None:
        """Close, and tell the publisher why (its channel broke)."""
        if self.close():
            self._on_dead(self, reason)

    def close(self) -> bool:
        """Stop sending; count what was never acknowledged as failed.

        Returns True for the call that actually closed it.
        """
        with self._lock:
            if self.closed:
                return False
            self._leave_group()
            self.closed = True
            self.accepting = False
            self.lane[1] = 0
            entries = self._queue[:]
            del self._queue[:]  # (never replaced: fan_out may hold it)
            self._tally.lost(entries)
            self._give_up_virtual()
            payloads = _payloads_in(entries)
            self._payloads = 0
            self._budget.clear()
            self._has_work.notify_all()
            self._has_room.notify_all()
            sock = self._sock
        for payload in payloads:
            payload.abandon()  # its fate is unknown: never reuse its segments
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the courier sees it, and closes it
            except OSError:
                pass
        return True

    def totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Per event: (sent, delivered, dropped, failed)."""
        with self._lock:
            pending = Counter(map(event_of, self._queue))
            if self._virtual and self._vgroup is not None:
                pending.update(map(event_of, self._vgroup.entries(self, self._virtual)))
            if self.group is not None:
                pending.update(map(event_of, self.group.untaken(self)))
            return self._tally.totals(pending, self.closed)

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Close this process's copy of the parent's event channel: no shutdown()."""
        self.closed = True
        self.accepting = False
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


ITEM, WHOLE, PAYLOAD = range(3)
#: What ``Outbox.take`` says of events sent straight from a group's log: chunks.
CHUNKS = "chunks"


def is_log_run(entries: list[Any]) -> bool:
    """True when ``entries``, taken from a group's log in order (ring entries with
    growing numbers), are numbered one after the other: its ends tell."""
    return bool(entries[-1][3] - entries[0][3] == len(entries) - 1)


def kind_of(frame: bytes | Payload) -> int:
    """What a queued frame is: an item, a whole pickle, or a shared-memory payload."""
    if type(frame) is not bytes:
        return PAYLOAD
    return WHOLE if frame[0] == 0x80 else ITEM


def _payloads_in(entries: list[tuple[str, bytes | Payload]]) -> list[Payload]:
    """The shared-memory payloads among queued entries."""
    return [entry[1] for entry in entries if type(entry[1]) is not bytes]  # type: ignore[misc]
