"""Events across hosts: a publisher's outboxes to other hosts' subscribers, and a
subscriber's inboxes from other hosts' publishers.

Publisher side (:class:`RemoteEvents`, one per link).  A trigger also goes to
every other host's peer whose subscriptions (in its presence record) accept
it: into that subscriber's :class:`RemoteOutbox`, which numbers its events
1, 2, 3 ... and keeps them until acknowledged.  A sender on the link's loop
publishes what queued up as one message (a list frame, as on one host) on
``<ns>.ev.<host>.<name>`` with headers naming the publisher, its *session*
(one per link: a restarted publisher starts a new numbering) and the first
event's number.  Acknowledgements come back on ``<ns>.ack.<host>.<name>``:
the last number handled and the ranges that failed.  What stays
unacknowledged for ``RESEND`` seconds, or when the connection to the server
comes back, is sent again from the first unacknowledged event.  Bounds are
the one-host ones: ``event_queue`` events per subscriber; a trigger waits up
to ``event_block`` for room, then drops the event for that subscriber and
counts it.

Subscriber side (:class:`Inboxes`).  Each (publisher, session) has its own
worker thread, so one publisher's events are handled one after another, in
order, by the same code as on one host (``Receiver.event_receiver``).  An
event numbered at or below the last one handled is a duplicate (a resend):
it is dropped and acknowledged again; a batch that starts past the next
expected number is dropped until the resend fills the gap.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pickle
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from .. import _serial
from .._events import waiting
from .._wire import ITEMS_HEAD, ITEMS_MARK, ITEMS_TAIL, Kind
from ..errors import SerializationError

if TYPE_CHECKING:
    from ._link import NatsLink

logger = logging.getLogger("localnet.nats")

RESEND = 1.0  # seconds without progress before unacknowledged events go again
_encode_item = _serial.encode_item  # (the C item encoder; None where not built)
_ITEM_MAX = _serial.ITEM_MAX
_BATCH_BYTES = 256 * 1024  # at most this much of events per message
_EVENT = int(Kind.EVENT)


def accepts(sub: dict[str, Any], event: str, publisher: str, group: Any, hub: bool) -> bool:
    """Whether a subscription record (``Subscription.describe()``) takes this event."""
    if sub.get("event") != event:
        return False
    peers = sub.get("peers")
    if peers is not None and publisher not in peers:
        return False
    if sub.get("group") is not None and sub.get("group") != group:
        return False
    return not sub.get("hubs_only") or hub


class RemoteOutbox:
    """Events for one subscriber on another host, kept until acknowledged."""

    def __init__(self, link: NatsLink, name: str, pid: int, subject: str, limit: int,
                 block: float) -> None:
        self.name = name  # name@host
        self.pid = pid  # the subscriber's process (a new one gets a new outbox)
        self.subject = subject
        self._link = link
        self.limit = limit
        self.block = block
        self._cond = threading.Condition()
        self._queue: list[tuple[str, bytes]] = []  # events _base + 1, ...
        self._base = 0
        self._sent = 0  # entries of _queue sent at least once since the last resend
        self._scheduled = False
        self._progress = time.monotonic()
        self.closed = False
        self._delivered: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self.resent = 0  # times unacknowledged events went again

    @property
    def acked(self) -> int:
        return self._base

    def mark(self) -> int:
        with self._cond:
            return self._base + len(self._queue)

    def has_room(self) -> bool:
        return self.closed or len(self._queue) < self.limit

    def put(self, event: str, item: bytes) -> None:
        with self._cond:
            if len(self._queue) >= self.limit:
                # (an awaited trigger waited for room on its loop already)
                deadline = time.monotonic() + (self.block if waiting.allowed else 0.0)
                while len(self._queue) >= self.limit and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if len(self._queue) >= self.limit or self.closed:
                    self._dropped[event] += 1
                    return
            if not self._queue:
                self._progress = time.monotonic()
            self._queue.append((event, item))
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule()

    def _schedule(self) -> None:
        if not self._link.soon(self.send):  # not connected: the resend after it sends
            with self._cond:
                self._scheduled = False

    async def send(self) -> None:
        """Publish what is queued and not sent yet (on the link's loop)."""
        with self._cond:
            self._scheduled = False
            entries = self._queue[self._sent:]
            first = self._base + self._sent + 1
            self._sent = len(self._queue)
        start = 0
        while start < len(entries):
            end, size = start, 0
            while end < len(entries) and (end == start or size + len(entries[end][1])
                                          <= _BATCH_BYTES):
                size += len(entries[end][1])
                end += 1
            body = ITEMS_HEAD + b"".join(item for _, item in entries[start:end]) + ITEMS_TAIL
            await self._link.parts.push(self.name, self.subject, body, {
                "p": self._link.qualified, "s": self._link.session,
                "f": str(first + start), "n": str(end - start)})
            start = end

    def ack(self, upto: int, failed: list[list[int]]) -> None:
        with self._cond:
            n = min(upto - self._base, len(self._queue))
            if n <= 0:
                return
            done = self._queue[:n]
            del self._queue[:n]
            failed_seqs = {seq for low, high in failed for seq in range(low, high + 1)}
            for offset, (event, _) in enumerate(done, self._base + 1):
                (self._failed if offset in failed_seqs else self._delivered)[event] += 1
            self._base += n
            self._sent = max(0, self._sent - n)
            self._progress = time.monotonic()
            self._cond.notify_all()

    def stale(self, now: float) -> bool:
        """Unacknowledged events and no progress for ``RESEND`` seconds."""
        with self._cond:
            return bool(self._queue) and now - self._progress >= RESEND

    def resend(self) -> None:
        """Send everything unacknowledged again (the subscriber drops duplicates)."""
        with self._cond:
            if self._queue:
                self.resent += 1
            self._sent = 0
            self._progress = time.monotonic()
            if not self._queue or self._scheduled:
                return  # (a send on its way starts from the first unacknowledged now)
            self._scheduled = True
        self._schedule()

    def wait_delivered(self, seq: int, deadline: float) -> bool:
        with self._cond:
            while self._base < seq and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.25))
            return True

    def close(self) -> None:
        """The subscriber left: what it did not acknowledge counts as failed."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            for event, _ in self._queue:
                self._failed[event] += 1
            self._queue.clear()
            self._cond.notify_all()

    def totals(self) -> dict[str, tuple[int, int, int, int]]:
        with self._cond:
            pending = Counter(event for event, _ in self._queue)
            events = set(pending) | set(self._delivered) | set(self._failed) | set(self._dropped)
            return {event: (self._delivered[event] + self._failed[event] + pending[event],
                            self._delivered[event], self._dropped[event], self._failed[event])
                    for event in events}


class RemoteEvents:
    """A publisher's outboxes to the subscribers of other hosts."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._outboxes: dict[str, RemoteOutbox] = {}
        self._retired: list[RemoteOutbox] = []  # (their counts stay in the statistics)
        self._routes: dict[str, list[tuple[str, int]]] = {}  # event -> (subscriber, pid)
        self._version = -1  # the directory's version the routes were made from

    def publish(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Queue ``event`` for every other host's subscriber that takes it."""
        link = self._link
        if self._version != link.version:  # a peer came, went or changed: route again
            self._version = link.version
            self._routes = {}
        targets = self._routes.get(event)
        if targets is None:
            peer = link.peer
            targets = self._routes[event] = [
                (key, int(record.get("pid") or 0)) for key, record in link.records()
                if any(accepts(sub, event, peer.name, peer.group, peer.hub)
                       for sub in record.get("subs") or ())]
        if not targets:
            return
        item = None if _encode_item is None else _encode_item(event, args, kwargs, _ITEM_MAX)
        if item is None:
            whole = _serial.dumps_event(event, args, kwargs, None)
            if not isinstance(whole, bytes):
                raise TypeError("an inline event was expected")
            item = whole[2:-1] if whole[:1] == b"\x80" else whole  # as an item
        limit = link.peer.max_frame - 64  # (the list frame around it)
        if len(item) > limit:
            raise SerializationError(
                f"event {event!r} is {len(item)} bytes pickled, over this peer's "
                f"{limit}-byte limit for subscribers on other hosts (max_frame); nothing "
                "was sent. Raise max_frame (on the subscribers' side too)")
        for key, pid in targets:
            self._outbox(key, pid).put(event, item)

    def has_room(self, event: str) -> bool:
        """True when triggering ``event`` now would not wait for a remote subscriber."""
        with self._lock:
            outboxes = [self._outboxes.get(key) for key, _ in self._routes.get(event, ())]
        return all(outbox is None or outbox.has_room() for outbox in outboxes)

    def _outbox(self, key: str, pid: int) -> RemoteOutbox:
        """The outbox to subscriber ``key`` in process ``pid`` (a restarted subscriber
        gets a new one: its numbering starts again)."""
        with self._lock:
            outbox = self._outboxes.get(key)
            if outbox is not None and outbox.pid != pid:
                outbox.close()
                self._retired.append(outbox)
                outbox = None
            if outbox is None or outbox.closed:
                peer = self._link.peer
                outbox = self._outboxes[key] = RemoteOutbox(
                    self._link, key, pid, self._link.subject("ev", key), peer.event_queue,
                    peer.event_block)
            return outbox

    def on_ack(self, body: bytes) -> None:
        try:
            ack = json.loads(body)
            key, upto = str(ack["sub"]), int(ack["upto"])
            failed = [[int(low), int(high)] for low, high in ack.get("failed") or ()]
            session = ack.get("s")
        except (ValueError, KeyError, TypeError):
            logger.debug("ignoring a malformed acknowledgement")
            return
        if session != self._link.session:
            return  # for an earlier run of this publisher
        with self._lock:
            outbox = self._outboxes.get(key)
        if outbox is not None:
            outbox.ack(upto, failed)

    def tick(self, now: float, present: set[str]) -> None:
        """Resend what went stale; close outboxes whose subscriber left."""
        with self._lock:
            outboxes = list(self._outboxes.items())
        for key, outbox in outboxes:
            if key not in present:
                outbox.close()
            elif outbox.stale(now):
                outbox.resend()

    def resent(self) -> int:
        """How many times outboxes sent unacknowledged events again."""
        with self._lock:
            return sum(o.resent for o in [*self._outboxes.values(), *self._retired])

    def resend_all(self) -> None:
        with self._lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.resend()

    def marks(self) -> list[tuple[RemoteOutbox, int]]:
        with self._lock:
            outboxes = list(self._outboxes.values())
        return [(outbox, outbox.mark()) for outbox in outboxes]

    def totals(self) -> list[tuple[str, str, list[int]]]:
        with self._lock:
            outboxes = list(self._outboxes.values()) + self._retired
        return [(event, outbox.name, list(counts)) for outbox in outboxes
                for event, counts in outbox.totals().items()]

    def close(self) -> None:
        with self._lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.close()


class _Inbox:
    """One (publisher, session)'s events on this subscriber: in order, on one thread."""

    def __init__(self, publisher: dict[str, Any]) -> None:
        self.publisher = publisher
        self.receive: Any = None  # made on the worker thread (it notes what it runs)
        self.last = 0
        self.worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="localnet-nats-events")


class Inboxes:
    """A subscriber's inboxes from the publishers of other hosts."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._inboxes: dict[tuple[str, str], _Inbox] = {}
        self.duplicates = 0  # events received again after they were handled (dropped)
        self.gaps = 0  # messages dropped because an earlier one was missing

    def on_events(self, headers: dict[str, str], body: bytes | bytearray | None) -> None:
        """A message of events (on the link's loop): hand it to its inbox's thread.
        ``body`` None: a large event that could not be taken (over this peer's
        max_frame): it counts as failed, here and at the publisher."""
        try:
            publisher, session = headers["p"], headers["s"]
            first, count = int(headers["f"]), int(headers["n"])
        except (KeyError, TypeError, ValueError):
            logger.debug("ignoring a malformed message of events")
            return
        if count < 1 or (body is not None and (not body or body[0] != ITEMS_MARK)):
            return
        with self._lock:
            inbox = self._inboxes.get((publisher, session))
            if inbox is None:
                record = self._link.lookup(publisher)
                if record is None:
                    return  # not (or no longer) known: its resend comes again
                inbox = self._inboxes[(publisher, session)] = _Inbox(
                    {"name": publisher.rpartition("@")[0], "pid": record.get("pid", 0),
                     "group": record.get("group"), "hub": bool(record.get("hub"))})
        inbox.worker.submit(self._handle, inbox, publisher, session, first, count, body)

    def _handle(self, inbox: _Inbox, publisher: str, session: str, first: int, count: int,
                body: bytes | bytearray | None) -> None:
        if inbox.receive is None:
            inbox.receive = self._link.peer._receiver.event_receiver(  # noqa: SLF001
                inbox.publisher)
        last = first + count - 1
        if first > inbox.last + 1:
            self.gaps += 1
            return  # a gap: an earlier batch is missing; the resend brings it
        failed: list[list[int]] = []
        self.duplicates += min(count, inbox.last + 1 - first)
        if last > inbox.last and body is None:
            logger.error("an event from %r is larger than this peer's max_frame (%d bytes); "
                         "it counts as failed", publisher, self._link.peer.max_frame)
            failed = [[max(first, inbox.last + 1), last]]
            inbox.last = last
        elif last > inbox.last and body is not None:
            skip = inbox.last + 1 - first
            if skip > 0:  # partly seen already: keep the rest
                items = _serial.unpickle(bytearray(body[1:]))
                body = bytes([ITEMS_MARK]) + pickle.dumps(items[skip:], 3)
            try:
                frame = body if isinstance(body, bytearray) else bytearray(body)
                failed = inbox.receive([(_EVENT, last, frame, [])])
            except Exception:  # noqa: BLE001 - counted as failed, as on one host
                logger.exception("events from %r could not be handled", publisher)
                failed = [[max(first, inbox.last + 1), last]]
            inbox.last = last
        self._link.acknowledge(publisher, session, inbox.last, failed)

    def close(self) -> None:
        with self._lock:
            inboxes = list(self._inboxes.values())
            self._inboxes.clear()
        for inbox in inboxes:
            inbox.worker.shutdown(wait=False, cancel_futures=True)
