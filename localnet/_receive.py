"""The receiving side: serving calls and running subscription handlers.

A :class:`Receiver` is what a peer's :class:`~localnet._server.Server`
hands incoming work to.  ``run_call`` runs one call and returns its reply;
``event_receiver`` makes the function that runs this process's handlers
for the events of one publisher's channel, whose counts it keeps per event
(``received``, ``handled``, ``failed``: :class:`~localnet._stats.ReceivedCounts`)
and which returns the sequence numbers of the events it could not handle
(see :func:`~localnet._wire.pack_ack`), so the publisher counts them failed.

An event counts as failed when it cannot be rebuilt here (its class is
missing in this process, say) or when one of its handlers raises.  A
connection or handler that returns an awaitable (``async def``) is awaited
to its end before the reply goes out or the event counts as handled: on
the application's loop when the peer was started inside it (``async with
localnet.aio.Peer(...)``, see ``loop``), else on the loop localnet owns
(:mod:`localnet._loop`).  With a dispatcher (the peer's, or the
connection's or subscription's own) the call or handler runs on the
application's thread instead (:mod:`localnet._dispatch`).  The first
failure per publisher and event is also written to stderr
(:mod:`localnet._failures`), since the ``localnet`` logger prints nothing
unless logging is configured.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from inspect import isawaitable
from itertools import accumulate, pairwise
from typing import Any

from . import _deadlock, _serial
from ._catalog import CATALOG
from ._dispatch import Dispatched, Dispatcher, bind
from ._failures import event_name, tell_once
from ._loop import await_result
from ._serial import ENCODE_MAX, encode_value
from ._tracebacks import user_traceback
from ._wire import BATCH_MARK, ITEMS_MARK, Frame, Kind, close_fds, unpack_batch

try:  # the handlers' loop over a run of one event, in C (optional, see _speedups.c)
    from ._speedups import dispatch as c_dispatch
except ImportError:  # built without a C compiler
    c_dispatch = None  # type: ignore[assignment]
from .errors import Timeout, TooManyCalls, UnknownConnection

logger = logging.getLogger("localnet.peer")

_REPLY = int(Kind.REPLY)
_NO_RUN = object()  # equal to no event name
#: Sequences of events that could not be handled, as ``[first, last]`` ranges.
Failed = list[list[int]]


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
                 shm_threshold: int | None, spin: float = 0.0) -> None:
        self.name = name
        self.spin = spin  # seconds the C loop polls for a connection's next call
        self.max_frame = max_frame
        self.max_workers = max_workers
        self.shm_threshold = shm_threshold
        self.counts = [0, 0]  # calls served, call errors
        # One token per call that may run at once; list pop/append are atomic.
        self._slots: list[None] = [None] * max_workers
        self.received: dict[str, list[int]] = {}  # event -> received, handled, failed
        #: Where calls and handlers run when not on the serving thread (see
        #: _dispatch), and the loop that awaits those written as coroutines
        #: (None: the one localnet owns, see _loop).
        self.dispatcher: Dispatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: What the C loop (_fastserve.c) needs to run a plain call itself, as
        #: run_call does: the connections, the dispatched type, the pickle reader,
        #: the result encoder and its bound, the counts and the slots; None
        #: without the extensions.
        self.plain_calls: tuple[Any, ...] | None = None if _serial.encode_value is None or \
            _serial.load_plain is _serial.unpickle else (
                CATALOG.connections, Dispatched, _serial.load_plain, _serial.encode_value,
                ENCODE_MAX, self.counts, self._slots)

    def run_call(self, body: bytes | bytearray, fds: list[int],
                 inline: bool = False) -> tuple[int, bytes | _serial.Payload]:
        """Run one incoming call; returns the reply's kind and body (all of it inline,
        no shared memory, with ``inline``: for a caller on another host).

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
            if fds or not body or body[0] != 0x80:
                connection, args, kwargs = _serial.loads(body, "the call's arguments", fds)
            else:
                try:
                    connection, args, kwargs = _serial.load_plain(body)
                except Exception as exc:
                    raise _serial.unreadable("the call's arguments", None, exc) from exc
            func = CATALOG.connections.get(connection)
            if func is None:
                raise UnknownConnection(connection, self.name, list(CATALOG.connections))
            if self.dispatcher is None or type(func) is Dispatched:
                result = func(*args, **kwargs)
            else:  # on the application's thread (Peer(dispatcher=...))
                result = self.dispatcher.run(func, args, kwargs)
            # A plain result is written here, as dumps() would first do; only a
            # result that is not plain needs the awaitable check (0.2 µs a call).
            plain = None if encode_value is None else encode_value(result, ENCODE_MAX)
            if plain is not None and len(plain) <= self.max_frame:
                return _REPLY, plain
            return self.finish(result, connection, plain, inline)
        except BaseException as exc:
            return self.failed(exc)
        finally:
            slots.append(None)

    def finish(self, result: Any, connection: str, plain: bytes | None = None,
               inline: bool = False) -> tuple[int, bytes | _serial.Payload]:
        """The reply to a call of ``connection`` that returned ``result`` (``plain``:
        its encoding, if it had one, too large): awaited first when it is awaitable,
        pickled, refused when over ``max_frame``; an ERROR reply when any of that fails."""
        try:
            if plain is None and isawaitable(result):  # async def: run it to the end
                result = await_result(result, self.loop)
                plain = None if encode_value is None else encode_value(result, ENCODE_MAX)
            reply = plain if plain is not None else _serial.dumps(
                result, "the result of", None if inline else self.shm_threshold, connection)
            if len(reply) > self.max_frame:
                _serial.refuse_oversize(reply, self.max_frame, f"the result of {connection!r}")
            return _REPLY, reply
        except BaseException as exc:
            return self.failed(exc)

    def failed(self, exc: BaseException) -> tuple[int, bytes]:
        """The ERROR reply to a call that raised ``exc``, counted."""
        self.counts[1] += 1
        return Kind.ERROR, _error_reply(exc)

    def expired_call(self, fds: list[int]) -> bytes:
        """The ERROR reply to a call read after its deadline, which is not run."""
        close_fds(fds)
        self.counts[0] += 1
        self.counts[1] += 1
        return _serial.dumps_exception(Timeout(
            f"peer {self.name!r} read the call after its deadline (it was stopped or "
            "overloaded) and did not run it"), "")

    def event_receiver(self, publisher: dict[str, Any]) -> Callable[[list[Frame]], Failed]:
        """A function that runs this process's handlers for a batch of one publisher's events.

        The batch is what arrived together, in order; the channel acknowledges
        it as a whole afterwards, naming the events that failed (the function
        returns them as ``[first, last]`` ranges of sequence numbers; usually
        none).  What depends only on the publisher (its context record, which
        subscriptions accept it) is worked out once per event name and kept
        until the catalog changes.  Called on the thread that will run it.
        """
        name, group, hub = publisher.get("name", ""), publisher.get("group"), \
            bool(publisher.get("hub"))
        pid = int(publisher.get("pid", 0))
        _deadlock.receiving(str(name), pid, self.name)  # (flush() must not wait for it)
        cache: dict[str, tuple[EventContext, tuple[Callable[..., Any], ...], list[int]]] = {}
        table = [CATALOG.by_event]
        received, handling, loads = self.received, _handling, _serial.unpickle
        receiver = self
        # The frame being handled: the sequence of its first event and its
        # events (None stands for one that could not be rebuilt), so a failure
        # finds its event's sequence; and the last sequence seen on the channel.
        where: list[Any] = [0, None, 0]

        def unreadable(failed: Failed, first: int, last: int, body: Any,
                       exc: BaseException) -> None:
            # Events first..last could not be rebuilt (body: the one event's
            # pickle, when there is one, which usually still names the event).
            if first <= last:
                failed.append([first, last])
            event = event_name(body) if body is not None else None
            if event is not None:
                counts = received.setdefault(event, [0, 0, 0])
                counts[0] += 1
                counts[2] += 1
            what = f"event {event!r}" if event is not None else \
                "an event" if first == last else f"{max(0, last - first + 1)} events"
            cause = exc.__cause__ or exc
            tell_once((name, pid, event, "rebuild"),
                      f"peer {self.name!r} cannot rebuild {what} from peer {name!r} "
                      f"({type(cause).__name__}: {cause}); it counts as failed, here and at "
                      f"the publisher")

        def seq_of(message: Any) -> int:
            for i, other in enumerate(where[1] or ()):
                if other is message:
                    return int(where[0]) + i
            return int(where[0])

        def unpickled(frames: list[Frame], failed: Failed) -> Iterator[list[Any]]:
            # A frame holds one payload, a list of items (_wire.pack_items), or a
            # batch of whole pickles (_wire.pack_batch).  Its events are rebuilt
            # when the previous frame's were handled (see ITEMS_PER_FRAME).
            for _, ident, body, fds in frames:
                previous = where[2]
                where[2] = ident
                if not fds and body and body[0] == ITEMS_MARK:  # the common case
                    try:
                        items = loads(body[1:])
                        if type(items) is not list:
                            raise ValueError(f"{type(items).__name__}, not a list")
                    except Exception as exc:
                        logger.exception("dropping a batch of events from %r that cannot "
                                         "be rebuilt (%d bytes)", name, len(body))
                        unreadable(failed, previous + 1, ident, None, exc)
                        continue
                    where[0], where[1] = ident - len(items) + 1, items
                    yield items
                    where[1] = None
                    del items
                    continue
                if fds or not body or body[0] != BATCH_MARK:  # one payload
                    try:
                        message = _serial.loads(body, "an event", fds)
                    except Exception as exc:
                        logger.exception("dropping an event from %r that cannot be rebuilt",
                                         name)
                        unreadable(failed, ident, ident, body, exc)
                        continue
                    where[0], where[1] = ident, [message]
                    yield where[1]
                    where[1] = None
                    continue
                try:
                    first, sizes = unpack_batch(body)
                except ValueError as exc:
                    logger.error("dropping a malformed batch of events from %r: %s", name, exc)
                    unreadable(failed, previous + 1, ident, None, exc)
                    continue
                messages: list[Any] = []
                where[0] = ident - len(sizes) + 1
                for start, end in pairwise(accumulate(sizes, initial=first)):
                    try:
                        messages.append(loads(body[start:end]))
                    except Exception as exc:
                        logger.exception("dropping an event from %r that cannot be rebuilt",
                                         name)
                        seq = where[0] + len(messages)
                        messages.append(None)
                        unreadable(failed, seq, seq, body[start:end], exc)
                where[1] = messages
                yield messages
                where[1] = None
                del messages

        def malformed(message: Any, failed: Failed) -> None:
            logger.error("dropping a malformed event from %r", name)
            seq = seq_of(message)
            failed.append([seq, seq])

        def receive(frames: list[Frame]) -> Failed:
            # Invariant: events are handled in the order they arrived.  A run
            # is consecutive events of one name: its handlers are looked up
            # once, and its counts kept in the locals n (received) and handled
            # until the run ends, when they are added to received[event]
            # (ReceivedCounts); a handler's failure is added at once, and its
            # event's sequence goes to ``failed`` (see seq_of).
            run: object = _NO_RUN
            handlers: tuple[Callable[..., Any], ...] = ()
            counts = [0, 0, 0]
            n = handled = 0
            failed: Failed = []
            try:
                for batch in unpickled(frames, failed):
                    i, end = 0, len(batch)
                    while i < end:
                        message = batch[i]
                        i += 1
                        try:
                            event, args, kwargs = message
                        except (TypeError, ValueError):
                            if message is not None:  # (None: could not be rebuilt, counted)
                                malformed(message, failed)
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
                                    malformed(message, failed)
                                    continue
                                handlers = tuple(bind(s.handler, s.dispatcher or
                                                      receiver.dispatcher)
                                                 for s in table[0].get(event, ())
                                                 if s.accepts(name, group, hub))
                                counts = received.setdefault(event, [0, 0, 0])
                                entry = cache[event] = (EventContext(event, name, pid, group, hub),
                                                        handlers, counts)
                            handling.context, handlers, counts = entry
                            run = event
                        n += 1
                        for handler in handlers:
                            try:
                                result = handler(*args, **kwargs) if kwargs else handler(*args)
                                if result is not None and isawaitable(result):
                                    await_result(result, receiver.loop)  # async def: its end
                                handled += 1
                            except Exception:
                                counts[2] += 1
                                seq = seq_of(message)
                                failed.append([seq, seq])
                                logger.exception("handler %s for event %r from %r raised",
                                                 getattr(handler, "__qualname__", handler), event,
                                                 name)
                        if len(handlers) != 1 or i == end or c_dispatch is None:
                            continue
                        # The rest of this run, in C: the same calls and checks, without
                        # the interpreter's loop (see _speedups.dispatch).
                        handler = handlers[0]
                        status, j, value = c_dispatch(batch, i, event, handler, CATALOG, table[0])
                        ran = j - i + (status >= 2)
                        n += ran
                        handled += ran - (status >= 2)
                        i = j + (status >= 2)
                        if status == 3:  # it returned something
                            try:
                                if isawaitable(value):
                                    await_result(value, receiver.loop)  # async def: its end
                                handled += 1
                                continue
                            except Exception as exc:
                                value = exc
                        if status >= 2:  # it raised
                            counts[2] += 1
                            failed.append([where[0] + j, where[0] + j])
                            logger.error("handler %s for event %r from %r raised",
                                         getattr(handler, "__qualname__", handler), event, name,
                                         exc_info=value)
                            del value
            finally:
                counts[0] += n
                counts[1] += handled
                handling.context = None
            return failed

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
