"""The publishing side of a peer: who subscribes to it, and its triggers.

The registry pushes, for every subscription matching this peer, an
``add``/``remove`` change naming the subscriber; :class:`Publisher` keeps
them as *routes* (event name -> outboxes).  A subscriber gets an
:class:`~localnet._events.Outbox` (a connection and a bounded queue) only
once this peer first triggers one of its events, so a hundred peers
subscribed to everything do not open ten thousand idle channels between
them.  Counts of outboxes that closed are folded into ``settled`` so
``stats()`` stays exact without keeping the outboxes.

A route stays as long as the registry lists the subscription: when a live
subscriber cannot be reached (its socket file was removed, it dropped the
channel), its outbox closes, counting what it held as failed, and a new
one takes its place, connecting after a pause that grows with each
failure in a row (``RETRY_DELAYS``).  So every event triggered for it is
counted (delivered, dropped or failed), and delivery resumes by itself
once the subscriber is reachable again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _deadlock, _liveness, _ring, _serial
from ._courier import Courier
from ._current import RUNNING
from ._dispatch import is_home, pump_while
from ._events import Outbox
from ._fastpath import make_trigger, table_entry
from ._lanes import c_fan_out as _c_fan_out
from ._lanes import c_ring_fan_out
from ._routes import EventGroup, Route, fan_out, finish_fan_out, put_all, regroup
from ._stats import add_into
from .errors import SerializationError, Timeout, WouldDeadlock, translate_os_error

if TYPE_CHECKING:
    from ._peer import Peer

logger = logging.getLogger("localnet.peer")

# Seconds a new outbox waits before connecting, after 1, 2, 3 ... failures in a row.
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0)

_encode_item = _serial.encode_item


class Publisher:
    """Routes one peer's events to its subscribers."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self._lock = threading.RLock()
        self._item_max = min(_serial.ITEM_MAX, peer.max_frame)
        self._outboxes: dict[str, Outbox] = {}
        self._routes: dict[str, Route] = {}
        self._wanted: dict[str, set[str]] = {}  # subscriber name -> events it wants from us
        self._entries: dict[str, dict[str, Any]] = {}  # subscriber name -> where it listens
        self._published: set[str] = set()  # events this peer has triggered
        self._retired: list[Outbox] = []  # closing outboxes, until their counts are final
        self._settled: dict[tuple[str, str], list[int]] = {}  # (event, subscriber) -> counts
        self._unreachable: dict[str, int] = {}  # subscriber name -> failures in a row
        self._remote: Any = None  # the other hosts' subscribers (see remote)
        # Small events are written once for all subscribers (localnet._ring): made
        # with the first route of two outboxes or more, where there is shared memory.
        self._ring: _ring.EventRing | None = None
        self._ring_wanted = _ring.available() and peer.shm_threshold is not None
        self._courier: Courier | None = None  # sends to every outbox (localnet._courier)
        # Outboxes that take the same events share one lane (localnet._routes).
        self._groups: dict[frozenset[Outbox], EventGroup] = {}
        self._closed = False
        # What the peer's publish() is: the C trigger (localnet._fastpath), which
        # comes here for all but the common case, or else publish() itself.
        self._trigger = make_trigger(peer, self.publish, self._finish, self._item_max)
        self.trigger: Any = self._trigger if self._trigger is not None else self.publish

    @property
    def remote(self) -> Any:
        """The other hosts' subscribers (localnet.nats._events.RemoteEvents), if joined."""
        return self._remote

    @remote.setter
    def remote(self, remote: Any) -> None:
        self._remote = remote
        self._set_routes(self._routes)  # (the trigger's table holds no route for them)

    def _set_routes(self, routes: dict[str, Route]) -> None:
        """Take ``routes``; the trigger's table starts over (see _table_add)."""
        self._routes = routes
        if self._trigger is not None:
            self._trigger.routes = {}

    # -- the registry's pushes: who subscribes to us --------------------------
    def apply_push(self, changes: list[Any]) -> None:
        """Apply the registry's subscription changes, in order.

        Outboxes that leave the routes retire only once the new routes are in
        place: until then triggers still queue events to them (see
        ``hand_over`` in _registry: one subscriber's routes may pass to another).
        """
        leaving: list[Outbox] = []
        with self._lock:
            for change in changes:
                if not (isinstance(change, list) and len(change) == 3):
                    continue
                action, event, target = change
                if action == "add" and isinstance(target, dict):
                    self._add_route(str(event), target, leaving)
                elif action == "remove":
                    self._remove_route(str(event), str(target), leaving)
            self._rebuild_routes()
            for outbox in leaving:
                outbox.retire()

    def _add_route(self, event: str, entry: dict[str, Any], leaving: list[Outbox]) -> None:
        name = str(entry["name"])
        outbox = self._outboxes.get(name)
        key = (name, int(entry["pid"]), float(entry["started"]), str(entry["address"]))
        if outbox is not None and (outbox.key != key or outbox.closed or outbox.retiring):
            self._retire(outbox, leaving)
        self._entries[name] = entry
        self._wanted.setdefault(name, set()).add(event)

    def _remove_route(self, event: str, name: str, leaving: list[Outbox]) -> None:
        events = self._wanted.get(name)
        if events is None:
            return
        events.discard(event)
        if not events:
            del self._wanted[name]
            self._entries.pop(name, None)
            self._unreachable.pop(name, None)
            outbox = self._outboxes.pop(name, None)
            if outbox is not None:
                self._retire(outbox, leaving)

    def _retire(self, outbox: Outbox, leaving: list[Outbox]) -> None:
        leaving.append(outbox)  # (retired by apply_push, once the routes changed)
        self._fold_retired()
        self._retired.append(outbox)
        if self._outboxes.get(outbox.name) is outbox:
            del self._outboxes[outbox.name]

    def _rebuild_routes(self, published: set[str] | None = None) -> None:
        """Routes for the events this peer has published (or ``published``, which
        then replaces that set once the routes are in place); their outboxes are made here.
        """
        if published is None:
            published = self._published
        routes: dict[str, list[Outbox]] = {}
        peer = self._peer
        for name, events in self._wanted.items():
            wanted = events & published
            if not wanted:
                continue
            outbox = self._outboxes.get(name)
            if outbox is None:
                hello = {"role": "events", **peer.identity}
                failures = self._unreachable.get(name, 0)
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1] if failures else 0.0
                outbox = Outbox(self._entries[name], hello, self._start_courier, peer.event_queue,
                                peer.event_block, peer.event_bytes, self._outbox_died,
                                delay, self._ring)
                self._outboxes[name] = outbox
            outbox.carry(wanted)
            for event in wanted:
                routes.setdefault(event, []).append(outbox)
        if self._ring is None and self._ring_wanted and any(
                len(boxes) > 1 for boxes in routes.values()):
            self._make_ring()
        groups = self._regroup(routes)
        self._set_routes({event: Route(boxes, groups.get(frozenset(boxes)))
                          for event, boxes in routes.items()})
        self._published = published

    def _regroup(self, routes: dict[str, list[Outbox]]) -> dict[frozenset[Outbox], EventGroup]:
        """The groups of ``routes`` (see localnet._routes.regroup)."""
        ring = self._ring if c_ring_fan_out is not None else None
        groups = regroup(routes, self._outboxes.values(), self._groups, ring)
        if set(groups.values()) - set(self._groups.values()) and self._courier is not None:
            self._courier.relane()  # (it marks the new groups' lanes idle before it sleeps)
        self._groups = groups
        return groups

    def _start_courier(self) -> Courier:
        """The thread that sends to every outbox (see localnet._courier); started
        by the first outbox that connects."""
        with self._lock:
            if self._courier is None:
                if self._closed:
                    raise OSError("the publisher closed")
                self._courier = Courier()
            return self._courier

    def _make_ring(self) -> None:
        """Make the event ring; every outbox takes its entries from now on."""
        try:
            self._ring = _ring.EventRing(_ring.RING_BYTES)
            for outbox in self._outboxes.values():
                outbox.ring = self._ring
        except OSError as exc:  # no memory or descriptors for it: events go the plain way
            logger.info("no event ring for %r (%s); events go through each subscriber's "
                        "socket", self._peer.name, exc)
            self._ring_wanted = False

    def _outbox_died(self, outbox: Outbox, reason: str) -> None:
        alive = _liveness.is_alive(outbox.pid, outbox.started, outbox.ticks)
        leaving = outbox.retiring or self._peer.state is not RUNNING
        if alive and leaving:
            logger.debug("subscriber %r left: %s", outbox.name, reason)
        elif alive:
            logger.warning("subscriber %r (pid %d) dropped its event channel: %s",
                           outbox.name, outbox.pid, reason)
        else:
            logger.info("subscriber %r (pid %d) died; pruned", outbox.name, outbox.pid)
        with self._lock:
            if self._outboxes.get(outbox.name) is outbox:
                del self._outboxes[outbox.name]
                self._retired.append(outbox)
                if alive and not leaving:
                    # Still subscribed as far as the registry says: a new outbox
                    # takes its events and tries again (see the module docstring).
                    # (An outbox that delivered was a healthy channel: start over.)
                    self._unreachable[outbox.name] = \
                        0 if outbox.acked else self._unreachable.get(outbox.name, 0) + 1
                else:
                    self._wanted.pop(outbox.name, None)
                    self._entries.pop(outbox.name, None)
                    self._unreachable.pop(outbox.name, None)
                self._rebuild_routes()

    # -- publishing -------------------------------------------------------------
    def publish(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send one event to every matching subscriber; never waits for them.

        Raises :class:`SerializationError` (nothing is sent) when an argument
        does not pickle, :class:`OutOfResources` when there are no descriptors
        or memory left for shared memory.
        """
        peer = self._peer
        if peer.state is not RUNNING:
            peer.require_running()
        table = self._trigger.routes if self._trigger is not None else None
        remote = self._remote
        if remote is not None:  # subscribers on other hosts (localnet.nats)
            remote.publish(event, args, kwargs)
        targets = self._routes.get(event)
        if targets is None and event not in self._published:
            targets = self._first_trigger(event)
        if _encode_item is not None:
            item = _encode_item(event, args, kwargs, self._item_max)
            if item is not None:  # the common case: an item of plain values
                if table is not None and remote is None:
                    self._table_add(table, event, targets)
                if not targets:
                    return
                ring = targets.ring
                rest: Any
                if ring is None and _c_fan_out is not None:  # take's C part, inlined
                    rest = _c_fan_out(targets.lanes, (event, item))
                elif ring is not None and targets.joined and c_ring_fan_out is not None:
                    rest = c_ring_fan_out(ring.state, ring.map, targets.lanes, event, item)
                else:
                    self._fan_out(targets, event, item)
                    return
                if rest is not None:
                    self._finish(targets, event, item, rest)
                return
        try:
            payload = _serial.dumps_event(event, args, kwargs, peer.shm_threshold)
        except OSError as exc:  # no shared memory for its buffers (nothing was sent)
            raise translate_os_error(
                exc, f"cannot put the large buffers of event {event!r} in shared memory "
                "(each one a subscriber has not acknowledged yet holds a descriptor; a "
                "smaller event_bytes holds fewer)", SerializationError) from exc
        if len(payload) > peer.max_frame:
            _serial.refuse_oversize(payload, peer.max_frame, f"an argument of event {event!r}")
        if type(payload) is bytes:  # pickled once; the outboxes frame it, in batches
            if not targets:
                return
            if payload[0] != 0x80:  # an item
                self._fan_out(targets, event, payload)
            elif put_all(targets, event, payload):
                self._reroute(targets, event, payload)
            return
        assert isinstance(payload, _serial.Payload)
        if targets:
            payload.hold(len(targets))  # one per outbox; the buffers are written once
            if put_all(targets, event, payload):
                self._reroute(targets, event, payload)
        payload.settle()

    def _finish(self, targets: Route, event: str, item: bytes, rest: Any) -> None:
        """What an item's C fan-out left to do: ``rest`` is False when the ring had no
        room (then the locked way), else the lanes to wake and those without room."""
        if rest is False:  # (see ring.fan_out)
            self._fan_out(targets, event, item)
        elif finish_fan_out(targets, event, item, rest):
            self._reroute(targets, event, item)

    def _table_add(self, table: dict[str, tuple[Any, ...]], event: str,
                   targets: Route | None) -> None:
        """Let the C trigger take ``event`` from now on (see localnet/_trigger.c), if
        ``targets`` are still its routes: ``table`` was read before them, so a table
        that replaced it meanwhile never gets an older route."""
        if event in table or self._routes.get(event) is not targets \
                or self._peer.state is not RUNNING:
            return
        entry = table_entry(targets)
        if entry is not None:
            table[event] = entry

    def _fan_out(self, targets: Route, event: str, item: bytes) -> None:
        """Queue an item for every outbox of ``targets`` (see ``_events.fan_out``)."""
        if fan_out(targets, event, item):
            self._reroute(targets, event, item)

    def _reroute(self, targets: tuple[Outbox, ...], event: str,
                 frame: bytes | _serial.Payload) -> None:
        """An outbox of ``targets`` (the routes this trigger looked up) retired and
        closed before it took the event: the outboxes that have joined the routes
        since (a subscriber that took the subscriptions over, see ``hand_over`` in
        _registry) get it instead, so the event is neither lost nor sent twice."""
        for outbox in self._routes.get(event, ()):
            if outbox not in targets:
                if type(frame) is not bytes:
                    frame.hold()  # type: ignore[union-attr]
                outbox.put(event, frame)

    def _first_trigger(self, event: str) -> Route | None:
        """Route an event triggered here for the first time; its outboxes are made now.

        The event joins the published set only once its routes are in place: a
        trigger on another thread meanwhile comes here too and waits for them.
        """
        with self._lock:
            if event not in self._published:
                self._rebuild_routes(self._published | {event})
            return self._routes.get(event)

    def has_room(self, event: str) -> bool:
        """True when triggering ``event`` now would not wait for a subscriber's room."""
        return all(outbox.has_room() for outbox in self._routes.get(event, ())) and \
            (self.remote is None or self.remote.has_room(event))

    def subscribers(self, event: str | None = None) -> list[str]:
        """Names of the live peers this peer's events (or ``event``) now go to."""
        with self._lock:
            return sorted(name for name, events in self._wanted.items()
                          if event is None or event in events)

    def flush(self, timeout: float | None = None, *, skip_blocked: bool = False) -> None:
        """Wait until every event triggered so far was handled by its subscribers.

        A subscriber whose acknowledgement waits for this very thread (see
        :mod:`localnet._deadlock`) makes it raise at once, or with
        ``skip_blocked``, is not waited for.

        Raises:
            Timeout: some subscriber had not acknowledged within ``timeout``.
            WouldDeadlock: waiting would wait for this thread.
        """
        if is_home():  # (a handler that acknowledges may need this thread: see _dispatch)
            pump_while(lambda: self.flush(timeout, skip_blocked=skip_blocked))
            return
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        for outbox, seq in self.marks(skip_blocked):
            if not outbox.wait_delivered(seq, deadline):
                raise Timeout(f"subscriber {outbox.name!r} had not handled every event "
                              f"within {timeout:g} s")

    def marks(self, skip_blocked: bool = False) -> list[tuple[Outbox, int]]:
        """Each outbox with the sequence of its last event so far: what flush waits for.

        Raises WouldDeadlock as :meth:`flush` does.
        """
        with self._lock:
            marks = [(outbox, outbox.mark()) for outbox in self._outboxes.values()]
        peer = self._peer
        blocked = _deadlock.blocked(peer.name, peer.pid)
        if blocked:
            stuck = [outbox.name for outbox, seq in marks
                     if (outbox.name, outbox.pid) in blocked and seq > outbox.acked]
            if stuck and not skip_blocked:
                raise WouldDeadlock(
                    f"{peer.name!r}.flush() would wait forever: subscriber {stuck[0]!r} "
                    f"acknowledges {peer.name!r}'s events only once its handler returns, and "
                    f"that handler is running on this thread, or waiting for the call this "
                    f"thread serves; flush from another thread, or after the handler returned")
            marks = [(outbox, seq) for outbox, seq in marks if outbox.name not in stuck]
        if self.remote is not None:
            marks += self.remote.marks()
        return marks

    def close(self) -> None:
        """Close every outbox (after ``flush``); their counts stay in ``delivery()``."""
        with self._lock:
            outboxes = list(self._outboxes.values())
            self._retired.extend(outboxes)
            self._outboxes.clear()
            self._set_routes({})
            ring, self._ring, self._ring_wanted = self._ring, None, False
            courier, self._courier, self._closed = self._courier, None, True
            for group in self._groups.values():
                group.close()
            self._groups = {}
        for outbox in outboxes:
            outbox.close()
        if courier is not None:
            courier.close()
        if ring is not None:
            ring.close()

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Drop the parent's outboxes: their connections and queues are the parent's."""
        outboxes = list(self._outboxes.values()) + self._retired
        self._lock = threading.RLock()
        self._outboxes, self._retired, self._groups = {}, [], {}
        self._set_routes({})
        for outbox in outboxes:
            outbox._after_fork_in_child()
        if self._ring is not None:
            self._ring.after_fork_in_child()
            self._ring = None
        if self._courier is not None:
            self._courier.after_fork_in_child()
            self._courier = None

    # -- statistics -------------------------------------------------------------
    def _fold_retired(self) -> None:
        """Keep only the counts of closed outboxes, not the outboxes (called with the lock)."""
        still = []
        for outbox in self._retired:
            if not outbox.closed:
                still.append(outbox)
                continue
            for event, counts in outbox.totals().items():
                add_into(self._settled.setdefault((event, outbox.name), [0, 0, 0, 0]), counts)
        self._retired = still

    def delivery(self) -> Iterator[tuple[str, str, list[int]]]:
        """``(event, subscriber, [sent, delivered, dropped, failed])`` rows, for stats."""
        with self._lock:
            self._fold_retired()
            outboxes = list(self._outboxes.values()) + self._retired
            rows = [(event, name, list(counts))
                    for (event, name), counts in self._settled.items()]
        yield from rows
        for outbox in outboxes:
            for event, counts in outbox.totals().items():
                yield event, outbox.name, list(counts)
        if self.remote is not None:
            yield from self.remote.totals()
