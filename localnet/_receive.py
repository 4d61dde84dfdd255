"""The receiving side: serving calls and running subscription handlers.

A :class:`Receiver` is what a peer's :class:`~localnet._server.Server`
hands incoming work to.  ``run_call`` runs one call and returns its reply;
``event_receiver`` makes the function that runs this process's handlers
for the events of one publisher's channel, whose counts it keeps per event
(``received``, ``handled``, ``failed``: :class:`~localnet._stats.ReceivedCounts`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise
from typing import Any

from . import _serial
from ._catalog import CATALOG
from ._tracebacks import user_traceback
from ._wire import BATCH_MARK, ITEMS_MARK, Frame, Kind, close_fds, unpack_batch
from .errors import TooManyCalls, UnknownConnection

logger = logging.getLogger("localnet.peer")

_REPLY = int(Kind.REPLY)
_NO_RUN = object()  # equal to no event name


@dataclass(frozen=True)
class EventContext:
    """The event a handler is running for: see :func:`localnet.current_event`."""

    event: str
    publisher: str
    pid: int
    group: str | None
    hub: bool


_handling = threading.local()


def current_event() -> EventContext | None:
    """Inside a subscription handler: which event, from which publisher.

    ``None`` outside handlers.  Handy when one handler serves several
    publishers::

        @localnet.subscribe("frame_done")
        def on_done(frame):
            print(frame, "from", localnet.current_event().publisher)
    """
    return getattr(_handling, "context", None)


class Receiver:
    """Runs what other peers send to one peer: calls and events."""

    def __init__(self, name: str, max_frame: int, max_workers: int,
                 shm_threshold: int | None) -> None:
        self.name = name
        self.max_frame = max_frame
        self.max_workers = max_workers
        self.shm_threshold = shm_threshold
        self.counts = [0, 0]  # calls served, call errors
        # One token per call that may run at once; list pop/append are atomic.
        self._slots: list[None] = [None] * max_workers
        self.received: dict[str, list[int]] = {}  # event -> received, handled, failed

    def run_call(self, body: bytes | bytearray,
                 fds: list[int]) -> tuple[int, bytes | _serial.Payload]:
        """Run one incoming call; returns the reply's kind and body.

        Beyond ``max_workers`` calls at once the call does not run: the reply
        is a :class:`TooManyCalls` error.
        """
        self.counts[0] += 1
        slots = self._slots
        try:
            slots.pop()
        except IndexError:
            close_fds(fds)
            self.counts[1] += 1
            return Kind.ERROR, _serial.dumps_exception(TooManyCalls(
                f"peer {self.name!r} is already running {self.max_workers} calls, its limit "
                "(max_workers; each nested callback holds one); raise it with "
                "Peer(max_workers=...)"), "")
        try:
            if fds or body[:1] != b"\x80":
                connection, args, kwargs = _serial.loads(body, "the call's arguments", fds)
            else:
                try:
                    connection, args, kwargs = _serial.unpickle(body)
                except Exception:
                    connection, args, kwargs = _serial.loads(body, "the call's arguments")
            func = CATALOG.connections.get(connection)
            if func is None:
                raise UnknownConnection(connection, self.name, list(CATALOG.connections))
            result = func(*args, **kwargs)
            reply = _serial.dumps(result, "the result of", self.shm_threshold, connection)
            _serial.refuse_oversize(reply, self.max_frame, f"the result of {connection!r}")
            return _REPLY, reply
        except BaseException as exc:
            self.counts[1] += 1
            return Kind.ERROR, _error_reply(exc)
        finally:
            slots.append(None)

    def event_receiver(self, publisher: dict[str, Any]) -> Callable[[list[Frame]], None]:
        """A function that runs this process's handlers for a batch of one publisher's events.

        The batch is what arrived together, in order; the channel acknowledges
        it as a whole afterwards.  What depends only on the publisher (its
        context record, which subscriptions accept it) is worked out once per
        event name and kept until the catalog changes.
        """
        name, group, hub = publisher.get("name", ""), publisher.get("group"), \
            bool(publisher.get("hub"))
        pid = int(publisher.get("pid", 0))
        cache: dict[str, tuple[EventContext, tuple[Callable[..., Any], ...], list[int]]] = {}
        table = [CATALOG.by_event]
        received, handling, loads = self.received, _handling, _serial.unpickle

        def unpickled(frames: list[Frame]) -> Iterator[list[Any]]:
            # A frame holds one payload, a list of items (_wire.pack_items), or a
            # batch of whole pickles (_wire.pack_batch).  Its events are rebuilt
            # when the previous frame's were handled (see ITEMS_PER_FRAME).
            for _, _, body, fds in frames:
                if not fds and body and body[0] == ITEMS_MARK:  # the common case
                    try:
                        items = loads(body[1:])
                        if type(items) is not list:
                            raise ValueError(f"{type(items).__name__}, not a list")
                    except Exception:
                        logger.exception("dropping a batch of events from %r that cannot "
                                         "be rebuilt (%d bytes)", name, len(body))
                        continue
                    yield items
                    del items
                    continue
                if fds or not body or body[0] != BATCH_MARK:  # one payload
                    try:
                        message = _serial.loads(body, "an event", fds)
                    except Exception:
                        logger.exception("dropping an event from %r that cannot be rebuilt",
                                         name)
                        continue
                    yield [message]
                    continue
                try:
                    first, sizes = unpack_batch(body)
                except ValueError as exc:
                    logger.error("dropping a malformed batch of events from %r: %s", name, exc)
                    continue
                messages: list[Any] = []
                for start, end in pairwise(accumulate(sizes, initial=first)):
                    try:
                        messages.append(loads(body[start:end]))
                    except Exception:
                        logger.exception("dropping an event from %r that cannot be rebuilt",
                                         name)
                yield messages
                del messages

        def receive(frames: list[Frame]) -> None:
            # Invariant: events are handled in the order they arrived.  A run
            # is consecutive events of one name: its handlers are looked up
            # once, and its counts kept in the locals n (received) and handled
            # until the run ends, when they are added to received[event]
            # (ReceivedCounts); a handler's failure is added at once.
            run: object = _NO_RUN
            handlers: tuple[Callable[..., Any], ...] = ()
            counts = [0, 0, 0]
            n = handled = 0
            try:
                for message in chain.from_iterable(unpickled(frames)):
                    try:
                        event, args, kwargs = message
                    except (TypeError, ValueError):
                        logger.error("dropping a malformed event from %r", name)
                        continue
                    # (checked per event: a handler may unsubscribe itself)
                    if event != run or table[0] is not CATALOG.by_event:
                        counts[0] += n
                        counts[1] += handled
                        n = handled = 0
                        run = _NO_RUN
                        if table[0] is not CATALOG.by_event:  # subscriptions changed
                            table[0] = CATALOG.by_event
                            cache.clear()
                        entry = cache.get(event) if type(event) is str else None
                        if entry is None:
                            if type(event) is not str:
                                logger.error("dropping a malformed event from %r", name)
                                continue
                            handlers = tuple(s.handler for s in table[0].get(event, ())
                                             if s.accepts(name, group, hub))
                            counts = received.setdefault(event, [0, 0, 0])
                            entry = cache[event] = (EventContext(event, name, pid, group, hub),
                                                    handlers, counts)
                        handling.context, handlers, counts = entry
                        run = event
                    n += 1
                    for handler in handlers:
                        try:
                            if kwargs:
                                handler(*args, **kwargs)
                            else:
                                handler(*args)
                            handled += 1
                        except Exception:
                            counts[2] += 1
                            logger.exception("handler %s for event %r from %r raised",
                                             getattr(handler, "__qualname__", handler), event,
                                             name)
            finally:
                counts[0] += n
                counts[1] += handled
                handling.context = None

        return receive


def _error_reply(exc: BaseException) -> bytes:
    """The body of an ERROR reply; drops the traceback once it is text.

    (Keeping it would hold the failed call's frames, hence its arguments -
    shared memory included - until the garbage collector ran.)
    """
    text = user_traceback(exc)
    exc.__traceback__ = None
    try:
        return _serial.dumps_exception(exc, text)
    finally:
        del exc
