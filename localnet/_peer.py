"""Peer: one participant, its life cycle, its routes and its statistics.

A started peer owns:

* a :class:`~localnet._server.Server` on ``p-<pid>-<n>.sock`` in the
  runtime directory, which runs the process's connections for callers and
  its subscription handlers for publishers;
* a :class:`~localnet._registry_client.RegistryClient`, which keeps it
  registered (name, pid, connections, subscriptions) across registry
  restarts and receives, as pushes, the subscribers that match it;
* one :class:`~localnet._remote.CallChannel` per peer it calls and one
  :class:`~localnet._events.Outbox` per peer subscribed to it.
"""

from __future__ import annotations

import getpass
import itertools
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from itertools import accumulate, chain, pairwise
from typing import Any

from . import _liveness, _paths, _serial, _shm
from ._catalog import CATALOG, Subscription
from ._events import Outbox, fan_out
from ._registry_client import RegistryClient
from ._remote import CallChannel, NotSent, RemotePeer
from ._server import Server
from ._wire import BATCH_MARK, DEFAULT_MAX_FRAME, ITEMS_MARK, Frame, Kind, unpack_batch
from .errors import (
    ConfigurationError,
    ConnectionLost,
    PeerClosed,
    PeerNotFound,
    SerializationError,
    Timeout,
    UnknownConnection,
)

logger = logging.getLogger("localnet.peer")

_encode_item = _serial.encode_item
_ITEM_MAX = _serial.ITEM_MAX

_counter = itertools.count()
_REPLY = int(Kind.REPLY)
_NO_RUN = object()  # equal to no event name
CHANNELS_PER_PEER = 8  # connections to one peer before calling threads share them
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class EventCounts:
    """Delivery counts for one event or one subscriber, as seen by the publisher.

    ``sent``: accepted for delivery; ``delivered``: acknowledged after the
    subscriber's handlers ran; ``dropped``: refused because the subscriber's
    queue was full; ``failed``: sent but never acknowledged (the subscriber
    died or left first).  Events still on their way are the difference
    ``sent - delivered - failed``.
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


class State(Enum):
    NEW = "NEW"
    RUNNING = "RUNNING"
    CLOSED = "CLOSED"


_RUNNING = State.RUNNING  # for the hot paths: an enum member lookup costs 0.1 µs


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use 1/true/yes or 0/false/no")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None


_debug_handler: logging.Handler | None = None


def _debug_from_env() -> None:
    """``LOCALNET_DEBUG``: debug logging of the ``localnet`` logger to stderr, once."""
    global _debug_handler
    if _debug_handler is None and _env_bool("LOCALNET_DEBUG"):
        _debug_handler = logging.StreamHandler()
        _debug_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"))
        root = logging.getLogger("localnet")
        root.addHandler(_debug_handler)
        root.setLevel(logging.DEBUG)


def default_name() -> str:
    """``<program>-<pid>``, the name of a peer nobody named."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    program = os.path.splitext(program)[0] or "python"
    return f"{program}-{os.getpid()}"


class Peer:
    """A participant in the runtime directory: it serves, calls and publishes.

    Every keyword argument wins over its environment variable, read when the
    peer is created: ``name`` (``LOCALNET_NAME``, default ``<program>-<pid>``),
    ``group`` (``LOCALNET_GROUP``), ``hub`` (``LOCALNET_HUB``: 1/true/yes),
    ``directory`` (``LOCALNET_DIR``).  Tuning: ``max_frame`` (bytes of inline
    data in one message, ``LOCALNET_MAX_FRAME``, default 256 MiB),
    ``event_queue`` (events queued or unacknowledged per subscriber before
    triggers wait, default 10,000), ``event_block`` (seconds a trigger waits
    for room before dropping, default 1.0), ``linger`` (seconds ``close()``
    waits for queued events to be handled, default 2.0), ``max_workers``
    (threads serving one caller's concurrent calls, default 32),
    ``shm_threshold`` (buffers of this many bytes or more travel through
    shared memory; ``None`` sends everything inline; default from
    ``LOCALNET_SHM``: ``off``, ``on`` or a number of bytes, else 1 MiB).

    Use it as a context manager, or ``start()`` / ``close()``::

        with localnet.Peer(name="farm-1", group="render") as peer:
            render(7, peer="farm-2")

    Raises (from ``start``): :class:`NameTaken`, :class:`ConfigurationError`,
    :class:`RegistryUnavailable`.
    """

    def __init__(self, name: str | None = None, group: str | None = None,
                 hub: bool | None = None, *, directory: str | os.PathLike[str] | None = None,
                 max_frame: int | None = None, event_queue: int = 10_000,
                 event_block: float = 1.0, linger: float = 2.0, max_workers: int = 32,
                 shm_threshold: int | None | str = "env") -> None:
        _debug_from_env()
        self.name: str = name if name is not None else os.environ.get("LOCALNET_NAME") \
            or default_name()
        if not isinstance(self.name, str) or not self.name or len(self.name) > 255 \
                or any(c in self.name for c in "\0\n\r"):
            raise ConfigurationError(f"invalid peer name {self.name!r}: use 1-255 printable "
                                     "characters")
        self.group: str | None = group if group is not None else \
            os.environ.get("LOCALNET_GROUP") or None
        env_hub = _env_bool("LOCALNET_HUB")
        self.hub: bool = bool(hub) if hub is not None else bool(env_hub)
        self._directory_arg = directory
        self.directory = _paths.default_runtime_dir() if directory is None else directory
        self.max_frame = int(max_frame if max_frame is not None else
                             _env_number("LOCALNET_MAX_FRAME", DEFAULT_MAX_FRAME))
        if self.max_frame < 1024:
            raise ConfigurationError("max_frame must be at least 1024 bytes")
        self._item_max = min(_ITEM_MAX, self.max_frame)
        if event_queue < 1 or event_block < 0 or linger < 0 or max_workers < 1:
            raise ConfigurationError("event_queue and max_workers must be positive; "
                                     "event_block and linger must not be negative")
        self.shm_threshold: int | None = _shm.threshold_from_env() \
            if shm_threshold == "env" else _check_threshold(shm_threshold)
        self.event_queue = event_queue
        self.event_block = event_block
        self.linger = linger
        self.max_workers = max_workers
        self.pid = os.getpid()
        self.state = State.NEW
        self.address = ""
        self.since = 0.0
        self._lock = threading.RLock()
        self._started = threading.Event()
        self._server: Server | None = None
        self._registry: RegistryClient | None = None
        # Calls: each calling thread gets a connection of its own to a peer
        # (the kernel then wakes the right thread for each reply, with no
        # hand-off), up to CHANNELS_PER_PEER per peer; more threads share
        # them, multiplexed by request id.
        self._channels: dict[str, list[CallChannel]] = {}
        self._local = threading.local()
        self._outboxes: dict[str, Outbox] = {}
        self._routes: dict[str, tuple[Outbox, ...]] = {}
        self._wanted: dict[str, set[str]] = {}  # subscriber name -> events it wants from us
        self._entries: dict[str, dict[str, Any]] = {}  # subscriber name -> where it listens
        self._published: set[str] = set()  # events this peer has triggered
        self._retired: list[Outbox] = []  # closing outboxes, until their counts are final
        self._settled: dict[tuple[str, str], list[int]] = {}  # (event, subscriber) -> counts
        self._received: dict[str, list[int]] = {}
        self._stoppers: list[Callable[[], None]] = []  # serve_forever() waits
        self._counts = [0, 0, 0]  # calls made, calls served, call errors

    def __repr__(self) -> str:
        return f"<Peer {self.name!r} pid={self.pid} [{self.state.value}]>"

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- life cycle -----------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Peer:
        """Listen, register and go live; returns the peer.

        Once it returns, the peer's subscriptions are known to every live
        publisher.  Starting a running peer does nothing; a closed one
        cannot be restarted (raises :class:`PeerClosed`).
        """
        from . import _api

        with self._lock:
            if self.state is State.RUNNING:
                return self
            if self.state is State.CLOSED:
                raise PeerClosed(f"{self!r} was closed; create a new Peer")
            directory = _paths.runtime_dir(self._directory_arg)
            self.directory = directory
            self.pid = os.getpid()
            self.address = str(directory / f"p-{self.pid}-{next(_counter)}.sock")
            self.since = time.time()
            self._identity = {"name": self.name, "pid": self.pid,
                              "started": _liveness.create_time(), "group": self.group,
                              "hub": self.hub}
            self._server = Server(self, self.address)
            self._server.start()
            CATALOG.add_listener(self)
            self._registry = RegistryClient(directory, self._registration, self._apply_push)
            try:
                self._registry.start(timeout)
            except BaseException:
                CATALOG.remove_listener(self)
                self._server.close()
                self._server = None
                self._registry = None
                raise
            self.state = State.RUNNING
            self._started.set()
            _api.peer_started(self)
        logger.debug("%r started on %s", self, self.address)
        return self

    def close(self) -> None:
        """Deliver what is queued (up to ``linger`` s), unregister and stop; idempotent."""
        from . import _api

        with self._lock:
            if self.state is not State.RUNNING:
                self.state = State.CLOSED
                return
            _api.peer_stopped(self)
            CATALOG.remove_listener(self)
        try:
            self.flush(self.linger)
        except Timeout:
            logger.warning("%r closed with events still unacknowledged", self)
        with self._lock:
            self.state = State.CLOSED
            registry, server = self._registry, self._server
            channels = [c for pool in self._channels.values() for c in pool]
            outboxes = list(self._outboxes.values())
            self._channels.clear()
            self._outboxes.clear()
            self._routes = {}
            stoppers, self._stoppers = self._stoppers, []
        for outbox in outboxes:
            outbox.close()
        if registry is not None:
            registry.close()  # publishers now send us nothing new ...
        if server is not None:
            server.close(drain=self.linger)  # ... and what they sent is handled and acknowledged
        for channel in channels:
            channel.close()
        for stopper in stoppers:
            stopper()
        self._started.set()
        logger.debug("%r closed", self)

    def _require_running(self) -> None:
        if self.state is not State.RUNNING:
            if self.state is State.CLOSED:
                raise PeerClosed(f"{self!r} is closed")
            self.start()

    @property
    def identity(self) -> dict[str, Any]:
        """Name, pid, process start time, group and hub: how others filter this peer."""
        return dict(self._identity)

    def _registration(self) -> dict[str, Any]:
        info = {
            "name": self.name, "pid": self.pid, "started": self._identity["started"],
            "since": self.since, "uid": os.getuid(), "user": _user(),
            "executable": sys.executable, "argv": list(sys.argv), "group": self.group,
            "hub": self.hub, "address": self.address,
            "connections": sorted(CATALOG.connections), "events": sorted(CATALOG.events),
        }
        return {"info": info, "subs": [s.describe() for s in CATALOG.subscriptions()]}

    # -- catalog changes after start ------------------------------------------
    def catalog_changed(self, added: Subscription | None, removed: list[Subscription]) -> None:
        """Tell the registry; returns once the change is confirmed."""
        if not self._started.wait(30.0) or self.state is not State.RUNNING:
            return
        registry = self._registry
        if registry is None:
            return
        try:
            if added is not None:
                registry.request("subscribe", sub=added.describe())
            for sub in removed:
                registry.request("unsubscribe", id=sub.id)
            if added is None and not removed:
                registry.request("update", connections=sorted(CATALOG.connections),
                                 events=sorted(CATALOG.events))
        except PeerClosed:
            pass

    # -- the registry's pushes: who subscribes to us --------------------------
    def _apply_push(self, changes: list[Any]) -> None:
        with self._lock:
            for change in changes:
                if not (isinstance(change, list) and len(change) == 3):
                    continue
                action, event, target = change
                if action == "add" and isinstance(target, dict):
                    self._add_route(str(event), target)
                elif action == "remove":
                    self._remove_route(str(event), str(target))
            self._rebuild_routes()

    def _add_route(self, event: str, entry: dict[str, Any]) -> None:
        name = str(entry["name"])
        outbox = self._outboxes.get(name)
        key = (name, int(entry["pid"]), float(entry["started"]), str(entry["address"]))
        if outbox is not None and (outbox.key != key or outbox.closed or outbox.retiring):
            self._retire(outbox)
        self._entries[name] = entry
        self._wanted.setdefault(name, set()).add(event)

    def _remove_route(self, event: str, name: str) -> None:
        events = self._wanted.get(name)
        if events is None:
            return
        events.discard(event)
        if not events:
            del self._wanted[name]
            self._entries.pop(name, None)
            outbox = self._outboxes.pop(name, None)
            if outbox is not None:
                self._retire(outbox)

    def _retire(self, outbox: Outbox) -> None:
        outbox.retire()
        self._fold_retired()
        self._retired.append(outbox)
        if self._outboxes.get(outbox.name) is outbox:
            del self._outboxes[outbox.name]

    def _rebuild_routes(self, published: set[str] | None = None) -> None:
        """Routes for the events this peer has published (or ``published``, which
        then replaces that set once the routes are in place); their outboxes are made here.

        A subscriber gets a connection from a publisher only once that
        publisher triggers one of its events: a hundred peers subscribed to
        everything do not open ten thousand idle channels between them.
        """
        if published is None:
            published = self._published
        routes: dict[str, list[Outbox]] = {}
        for name, events in self._wanted.items():
            wanted = events & published
            if not wanted:
                continue
            outbox = self._outboxes.get(name)
            if outbox is None:
                hello = {"role": "events", **self._identity}
                outbox = Outbox(self._entries[name], hello, self.event_queue,
                                self.event_block, self._outbox_died)
                self._outboxes[name] = outbox
            outbox.carry(wanted)
            for event in wanted:
                routes.setdefault(event, []).append(outbox)
        self._routes = {event: tuple(boxes) for event, boxes in routes.items()}
        self._published = published

    def _outbox_died(self, outbox: Outbox, reason: str) -> None:
        alive = _liveness.is_alive(outbox.pid, outbox.started)
        if alive and (outbox.retiring or self.state is not State.RUNNING):
            logger.debug("subscriber %r left: %s", outbox.name, reason)
        elif alive:
            logger.warning("subscriber %r (pid %d) dropped its event channel: %s",
                           outbox.name, outbox.pid, reason)
        else:
            logger.info("subscriber %r (pid %d) died; pruned", outbox.name, outbox.pid)
        with self._lock:
            if self._outboxes.get(outbox.name) is outbox:
                del self._outboxes[outbox.name]
                self._wanted.pop(outbox.name, None)
                self._entries.pop(outbox.name, None)
                self._retired.append(outbox)
                self._rebuild_routes()

    # -- publishing -------------------------------------------------------------
    def publish(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send one event to every matching subscriber; never waits for them.

        Raises :class:`SerializationError` (nothing is sent) when an argument
        does not pickle.
        """
        if self.state is not _RUNNING:
            self._require_running()
        targets = self._routes.get(event)
        if targets is None and event not in self._published:
            targets = self._first_trigger(event)
        if _encode_item is not None:
            item = _encode_item(event, args, kwargs, self._item_max)
            if item is not None:  # the common case: an item of plain values
                if targets:
                    fan_out(targets, event, item)
                return
        payload = _serial.dumps_event(event, args, kwargs, self.shm_threshold)
        if len(payload) > self.max_frame:
            self._too_big(payload, f"an argument of event {event!r}")
        if type(payload) is bytes:  # pickled once; the outboxes frame it, in batches
            if targets:
                if payload[0] != 0x80:  # an item
                    fan_out(targets, event, payload)
                else:
                    for outbox in targets:
                        outbox.put(event, payload)
            return
        assert isinstance(payload, _serial.Payload)
        if targets:
            payload.hold(len(targets))  # one per outbox; the buffers are written once
            for outbox in targets:
                outbox.put(event, payload)
        payload.settle()

    def _first_trigger(self, event: str) -> tuple[Outbox, ...] | None:
        """Route an event triggered here for the first time; its outboxes are made now.

        The event joins the published set only once its routes are in place: a
        trigger on another thread meanwhile comes here too and waits for them.
        """
        with self._lock:
            if event not in self._published:
                self._rebuild_routes(self._published | {event})
            return self._routes.get(event)

    def subscribers(self, event: str | None = None) -> list[str]:
        """Names of the live peers this peer's events (or ``event``) now go to.

        A subscriber that died disappears from this list as soon as the
        publisher notices (its connection closes), without asking the registry.
        """
        with self._lock:
            return sorted(name for name, events in self._wanted.items()
                          if event is None or event in events)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event triggered so far was handled by its subscribers.

        Events to subscribers that died or left count as settled.

        Raises:
            Timeout: some subscriber had not acknowledged within ``timeout``.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        with self._lock:
            marks = [(outbox, outbox.mark()) for outbox in self._outboxes.values()]
        for outbox, seq in marks:
            if not outbox.wait_delivered(seq, deadline):
                raise Timeout(f"subscriber {outbox.name!r} had not handled every event "
                              f"within {timeout:g} s")

    # -- calling --------------------------------------------------------------
    def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``target``; return its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        SerializationError (before anything is sent).
        """
        if self.state is not _RUNNING:
            self._require_running()
        name = target if type(target) is str else target.name  # type: ignore[union-attr]
        try:
            channel = self._local.channels[name]
        except (AttributeError, KeyError):
            channel = None
        if channel is None or channel.broken is not None:
            channel = self._open_channel(name, target)
        payload = _serial.dumps_call(connection, args, kwargs, "an argument of",
                                     self.shm_threshold)
        if len(payload) > self.max_frame:
            self._too_big(payload, f"an argument of {connection!r}")
        self._counts[0] += 1
        if type(payload) is bytes:
            try:
                kind, body, fds, ident = channel.request(payload, timeout)
            except NotSent:
                # A stale connection (the peer restarted or died since this
                # thread last called it): nothing ran; look it up again.
                channel = self._open_channel(name, name)
                kind, body, fds, ident = channel.request(payload, timeout)
        else:
            assert isinstance(payload, _serial.Payload)
            try:
                kind, body, fds, ident = channel.request(payload.body, timeout, payload.fds)
            except Timeout:
                payload.abandon()  # the callee may read it later: never reuse
                raise
            except BaseException:
                payload.settle()
                raise
            payload.settle()  # answered: the callee holds what it still uses
        if kind == _REPLY:
            if not fds:
                return _serial.loads(body, "the result of", None, connection)
            try:
                return _serial.loads(body, "the result of", fds, connection)
            finally:
                channel.taken(ident)
        raise _serial.loads_exception(body)

    def _too_big(self, payload: bytes | _serial.Payload, what: str) -> None:
        if len(payload) > self.max_frame:
            if isinstance(payload, _serial.Payload):
                payload.settle()
            raise SerializationError(
                f"{what} is {len(payload)} bytes inline, over the {self.max_frame}-byte "
                "message limit; raise max_frame (LOCALNET_MAX_FRAME), or send large data "
                "as NumPy arrays/bytearrays so it goes through shared memory")

    def _open_channel(self, name: str, target: str | RemotePeer) -> CallChannel:
        """This thread's channel to ``name``: a new one, or a shared one at the cap."""
        local = self._local.__dict__.setdefault("channels", {})
        with self._lock:
            pool = []
            for old in self._channels.get(name, []):
                if old.broken is None:
                    pool.append(old)
                else:
                    old.close()
            self._channels[name] = pool
            if len(pool) >= CHANNELS_PER_PEER:
                channel = pool[threading.get_ident() % len(pool)]
                local[name] = channel
                return channel
            address = target.address if isinstance(target, RemotePeer) else None
            for attempt in range(2):
                if address is None:
                    info = self._lookup(name)
                    address = str(info["address"])
                hello = {"role": "call", "name": self.name, "pid": self.pid}
                try:
                    channel = CallChannel(address, name, hello, self.max_frame)
                    break
                except ConnectionLost:
                    if attempt:
                        raise PeerNotFound(name) from None
                    address = None  # the peer may have restarted: ask the registry again
            assert channel is not None
            pool.append(channel)
            local[name] = channel
            return channel

    def _lookup(self, name: str) -> dict[str, Any]:
        assert self._registry is not None
        info = self._registry.request("lookup", name=name)
        if not isinstance(info, dict):
            names = [str(i["name"]) for i in self._registry.request("list")
                     if i.get("name") != self.name]
            raise PeerNotFound(name, names)
        return info

    # -- discovery --------------------------------------------------------------
    def peers(self, group: str | None = None, hubs_only: bool = False) -> list[RemotePeer]:
        """The other live peers, optionally only one group's or only hubs."""
        self._require_running()
        assert self._registry is not None
        found = []
        for info in self._registry.request("list"):
            if info.get("name") == self.name and info.get("pid") == self.pid:
                continue
            if group is not None and info.get("group") != group:
                continue
            if hubs_only and not info.get("hub"):
                continue
            found.append(RemotePeer(info, self))
        return sorted(found, key=lambda p: p.name)

    def peer(self, name: str) -> RemotePeer:
        """The live peer called ``name``; raises :class:`PeerNotFound`."""
        self._require_running()
        info = self._lookup(name)
        if not _liveness.is_alive(int(info["pid"]), float(info["started"])):
            raise PeerNotFound(name)
        return RemotePeer(info, self)

    # -- serving (called by the Server's threads) -----------------------------
    def run_call(self, body: bytes | bytearray,
                 fds: list[int]) -> tuple[int, bytes | _serial.Payload]:
        """Run one incoming call; returns the reply's kind and body."""
        self._counts[1] += 1
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
            if len(reply) > self.max_frame:
                self._too_big(reply, f"the result of {connection!r}")
            return _REPLY, reply
        except BaseException as exc:
            self._counts[2] += 1
            return Kind.ERROR, _error_reply(exc)

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
        received, handling, loads = self._received, _handling, _serial.unpickle

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
            # Consecutive events of one name form a run: its handlers are looked
            # up once, and its counts kept in locals until the run ends.
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

    # -- statistics -------------------------------------------------------------
    def _fold_retired(self) -> None:
        """Keep only the counts of closed outboxes, not the outboxes (called with the lock)."""
        still = []
        for outbox in self._retired:
            if not outbox.closed:
                still.append(outbox)
                continue
            for event, counts in outbox.totals().items():
                row = self._settled.setdefault((event, outbox.name), [0, 0, 0, 0])
                for i, n in enumerate(counts):
                    row[i] += n
        self._retired = still

    def stats(self) -> Stats:
        """A snapshot of this peer's counters; see :class:`Stats`."""
        with self._lock:
            self._fold_retired()
            outboxes = list(self._outboxes.values()) + self._retired
            rows = [(event, name, list(counts))
                    for (event, name), counts in self._settled.items()]
        for outbox in outboxes:
            rows.extend((event, outbox.name, list(counts))
                        for event, counts in outbox.totals().items())
        published: dict[str, list[int]] = {}
        subscribers: dict[str, list[int]] = {}
        for event, name, counts in rows:
            for table, key in ((published, event), (subscribers, name)):
                row = table.setdefault(key, [0, 0, 0, 0])
                for i, n in enumerate(counts):
                    row[i] += n
        registry = self._registry
        return Stats(
            calls_made=self._counts[0], calls_served=self._counts[1],
            call_errors=self._counts[2],
            published={k: EventCounts(*v) for k, v in published.items()},
            subscribers={k: EventCounts(*v) for k, v in subscribers.items()},
            received={k: ReceivedCounts(*v) for k, v in self._received.items()},
            registry_recoveries=registry.recoveries if registry is not None else 0,
        )


def _error_reply(exc: BaseException) -> bytes:
    """The body of an ERROR reply; drops the traceback once it is text.

    (Keeping it would hold the failed call's frames, hence its arguments -
    shared memory included - until the garbage collector ran.)
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop run_call's frame: the remote user did not write it
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    del tb
    exc.__traceback__ = None
    try:
        return _serial.dumps_exception(exc, text)
    finally:
        del exc


def _check_threshold(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError("shm_threshold is a positive number of bytes, or None")
    return value if _shm.AVAILABLE else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
