"""Peer: one participant, its configuration and its life cycle.

A started peer wires together:

* a :class:`~localnet._server.Server` on ``p-<pid>-<n>.sock`` in the
  runtime directory, which hands incoming calls and events to its
  :class:`~localnet._receive.Receiver`;
* its transports (:mod:`localnet._transports`): the one-host one
  (:class:`~localnet._local.LocalTransport`, the registry), which keeps it
  registered across registry restarts and passes the registry's pushes (who
  subscribes to it) to its :class:`~localnet._publisher.Publisher`; and,
  with a NATS setting, the one to the other hosts' peers;
* a :class:`~localnet._calls.Caller`, which holds its channels to the peers
  it calls.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _current, _fork, _liveness, _paths, _settings, _transports
from ._budget import DEFAULT_EVENT_BYTES
from ._calls import Caller
from ._catalog import CATALOG, Subscription
from ._current import State
from ._dispatch import Dispatcher, checked
from ._local import LocalTransport
from ._publisher import Publisher
from ._receive import EventContext, Receiver, current_event
from ._remote import RemotePeer
from ._server import Server
from ._settings import default_name
from ._stats import EventCounts, ReceivedCounts, Stats, snapshot
from .errors import (
    ConfigurationError,
    PeerClosed,
    PeerNotFound,
    Timeout,
    translate_os_error,
)

__all__ = ["EventContext", "EventCounts", "Peer", "ReceivedCounts", "State", "Stats",
           "current_event", "default_name"]

logger = logging.getLogger("localnet.peer")

_counter = itertools.count()


class Peer:
    """A participant in the runtime directory: it serves, calls and publishes.

    Every keyword argument wins over its environment variable, read when the
    peer is created: ``name`` (``LOCALNET_NAME``, which a forked child
    leaves to its parent; default ``<program>-<pid>``), ``group``
    (``LOCALNET_GROUP``), ``hub`` (``LOCALNET_HUB``: 1/true/yes),
    ``directory`` (``LOCALNET_DIR``).  Tuning: ``max_frame`` (bytes of inline
    data in one message, ``LOCALNET_MAX_FRAME``, default 256 MiB),
    ``event_queue`` (events queued or unacknowledged per subscriber before
    triggers wait, default 10,000), ``event_bytes`` (bytes those events may
    hold per subscriber, inline and in shared memory, default 256 MiB; one
    larger event goes when nothing else is held), ``event_block`` (seconds a
    trigger waits for room before dropping, default 1.0), ``linger``
    (seconds ``close()`` waits for queued events to be handled, default
    2.0), ``max_workers``
    (calls this peer runs at once for all its callers, a thread each, default
    64), ``max_calls`` (calls in flight from this peer to any one peer, a
    connection each, default 64; beyond either limit a call raises
    :class:`TooManyCalls`),
    ``shm_threshold`` (buffers of this many bytes or more travel through
    shared memory; ``None`` sends everything inline; default from
    ``LOCALNET_SHM``: ``off``, ``on`` or a number of bytes, else 1 MiB),
    ``spin`` (``LOCALNET_SPIN``: seconds a caller polls for its answer, and
    a callee with one caller for the next call, before the thread sleeps,
    default 50e-6; 0 never polls; with the C extensions only),
    ``dispatcher`` (a :mod:`localnet.dispatch` dispatcher: served calls and
    handlers run on the application's thread it stands for, not on
    localnet's threads; a connection's or subscription's own wins),
    ``nats`` (``LOCALNET_NATS``: a NATS URL that joins this peer to the
    peers of other hosts, see :mod:`localnet.nats`; None: this host only).

    Use it as a context manager, or ``start()`` / ``close()``::

        with localnet.Peer(name="farm-1", group="render") as peer:
            render(7, peer="farm-2")

    Raises (from ``start``): :class:`NameTaken`, :class:`ConfigurationError`,
    :class:`RegistryUnavailable`.
    """

    # Set by localnet/_settings.py from the keywords and the environment.
    name: str
    group: str | None
    hub: bool
    directory: str | os.PathLike[str]
    _directory_arg: str | os.PathLike[str] | None  # the keyword; start() resolves it
    max_frame: int
    event_queue: int
    event_bytes: int
    event_block: float
    linger: float
    max_workers: int
    max_calls: int
    shm_threshold: int | None
    spin: float

    def __init__(self, name: str | None = None, group: str | None = None,
                 hub: bool | None = None, *, directory: str | os.PathLike[str] | None = None,
                 max_frame: int | None = None, event_queue: int = 10_000,
                 event_bytes: int = DEFAULT_EVENT_BYTES,
                 event_block: float = 1.0, linger: float = 2.0, max_workers: int = 64,
                 max_calls: int = 64, shm_threshold: int | None | str = "env",
                 spin: float | None = None, dispatcher: Dispatcher | None = None,
                 nats: str | None = "env") -> None:
        _settings.apply(self, name=name, group=group, hub=hub, directory=directory,
                        max_frame=max_frame, event_queue=event_queue, event_bytes=event_bytes,
                        event_block=event_block, linger=linger, max_workers=max_workers,
                        max_calls=max_calls, shm_threshold=shm_threshold, spin=spin)
        self.pid = os.getpid()
        self.state = State.NEW
        self.address = ""
        self.since = 0.0
        self._lock = threading.RLock()
        self._started = threading.Event()
        self._server: Server | None = None
        self._stoppers: list[Callable[[], None]] = []  # serve_forever() waits
        self._identity: dict[str, Any] = {}
        # The parts: calling, publishing and receiving.  The hot paths are
        # bound here, so a trigger or a call costs no extra Python call.
        self._caller = Caller(self)
        self._publisher = Publisher(self)
        self._receiver = Receiver(self.name, self.max_frame, max_workers, self.shm_threshold,
                                  self.spin)
        if dispatcher is not None:
            self._receiver.dispatcher = checked(dispatcher)
        # The ways it reaches the others: this host's first, then any other.
        self._local = LocalTransport(self)
        self._others = _transports.configured(self, nats)
        self._transports: list[_transports.Transport] = [self._local, *self._others]
        self.call = self._caller.call  # type: ignore[method-assign]
        self.publish = self._publisher.trigger  # type: ignore[method-assign]
        self.flush = self._publisher.flush  # type: ignore[method-assign]
        self.subscribers = self._publisher.subscribers  # type: ignore[method-assign]
        _fork.track(self)  # a forked child detaches it

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
        with self._lock:
            if self.state is State.RUNNING:
                return self
            if self.state is State.CLOSED:
                raise _fork.closed_error(self, f"{self!r} was closed; create a new Peer")
            directory = _paths.runtime_dir(self._directory_arg)
            self.directory = directory
            self.pid = os.getpid()
            self.address = str(directory / f"p-{self.pid}-{next(_counter)}.sock")
            self.since = time.time()
            try:
                self._identity = {"name": self.name, "pid": self.pid,
                                  "started": _liveness.create_time(),
                                  "ticks": _liveness.start_ticks(), "group": self.group,
                                  "hub": self.hub}
                self._server = Server(self._receiver, self.address)
                self._server.start()
            except OSError as exc:
                self._server = None
                raise translate_os_error(exc, f"cannot listen on {self.address}",
                                         ConfigurationError) from exc
            CATALOG.add_listener(self)
            _current.claim_receiving(self)
            try:
                self._local.start(timeout)
            except BaseException:
                _current.release_receiving(self)
                CATALOG.remove_listener(self)
                self._server.close()
                self._server = None
                raise
            self.state = State.RUNNING
            self._started.set()
            _current.peer_started(self)
            for other in self._others:
                other.start(timeout)
        logger.debug("%r started on %s", self, self.address)
        return self

    def close(self) -> None:
        """Deliver what is queued (up to ``linger`` s), unregister and stop; idempotent."""
        with self._lock:
            if self.state is not State.RUNNING:
                self.state = State.CLOSED
                return
            _current.peer_stopped(self)
            CATALOG.remove_listener(self)
            if self._server is not None:
                self._server.wind_down()  # new calls are refused from here on
        for transport in reversed(self._transports):
            transport.leave()  # (this host's hands its subscriptions over)
        try:  # (closing from a handler: what waits for that handler is not waited for)
            self._publisher.flush(self.linger, skip_blocked=True)
        except Timeout:
            logger.warning("%r closed with events still unacknowledged", self)
        with self._lock:
            self.state = State.CLOSED
            server = self._server
            stoppers, self._stoppers = self._stoppers, []
        self._publisher.close()
        for transport in self._transports:
            transport.close()  # publishers now send us nothing new ...
        if server is not None:
            server.close(drain=self.linger)  # ... and what they sent is handled and acknowledged
        self._caller.close()
        for stopper in stoppers:
            stopper()
        self._started.set()
        logger.debug("%r closed", self)

    def require_running(self) -> None:
        """Start a new peer on first use; raises :class:`PeerClosed` once closed."""
        if self.state is not State.RUNNING:
            if self.state is State.CLOSED:
                raise _fork.closed_error(self, f"{self!r} is closed")
            self.start()

    @property
    def identity(self) -> dict[str, Any]:
        """Name, pid, process start time, group and hub: how others filter this peer."""
        return dict(self._identity)

    # -- catalog changes after start ------------------------------------------
    def catalog_changed(self, added: Subscription | None, removed: list[Subscription]) -> None:
        """Tell every transport; returns once the change is confirmed."""
        if not self._started.wait(30.0) or self.state is not State.RUNNING:
            return
        try:
            for transport in self._transports:
                if added is None and not removed:
                    transport.catalog_updated()
                else:
                    transport.subscriptions_changed(added, removed)
        except PeerClosed:
            pass

    # -- discovery --------------------------------------------------------------
    def lookup(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """This host's registry record of peer ``name``, within ``timeout`` seconds.

        Raises :class:`PeerNotFound`, or RegistryUnavailable after ``timeout``.
        """
        return self._local.find(name, timeout)

    def peers(self, group: str | None = None, hubs_only: bool = False) -> list[RemotePeer]:
        """The other live peers, optionally only one group's or only hubs."""
        self.require_running()
        return sorted((RemotePeer(info, self) for transport in self._transports
                       for info in transport.peers()
                       if (group is None or info.get("group") == group)
                       and (not hubs_only or info.get("hub"))), key=lambda p: p.name)

    def peer(self, name: str) -> RemotePeer:
        """The live peer called ``name``; raises :class:`PeerNotFound`."""
        self.require_running()
        try:
            info = self.lookup(name)
        except PeerNotFound:
            remote = _transports.lookup(self, name)  # another host's (name@host)
            if remote is None:
                raise
            return RemotePeer(remote, self)
        if not _liveness.is_alive(int(info["pid"]), float(info["started"]), info.get("ticks")):
            raise PeerNotFound(name)
        return RemotePeer(info, self)

    # -- what the parts do, under the names users know --------------------------
    # (Bound in __init__ to the parts' methods; these give the docs and types.)
    def call(self, target: str | RemotePeer, connection: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Any:
        """Run ``connection(*args, **kwargs)`` in peer ``target``; return its result.

        Raises the remote exception, or PeerNotFound, ConnectionLost, Timeout,
        SerializationError (before anything is sent).
        """
        return self._caller.call(target, connection, args, kwargs, timeout)

    def publish(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Send one event to every matching subscriber; never waits for them.

        Raises :class:`SerializationError` (nothing is sent) when an argument
        does not pickle.
        """
        self._publisher.publish(event, args, kwargs)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event triggered so far was handled by its subscribers.

        Events to subscribers that died or left count as settled.

        Raises:
            Timeout: some subscriber had not acknowledged within ``timeout``.
            WouldDeadlock: at once, when a subscriber's acknowledgement waits
                for the calling thread (see README, "Flush from a handler").
        """
        self._publisher.flush(timeout)

    def subscribers(self, event: str | None = None) -> list[str]:
        """Names of the live peers this peer's events (or ``event``) now go to.

        A subscriber that died disappears from this list as soon as the
        publisher notices (its connection closes), without asking the registry.
        """
        return self._publisher.subscribers(event)

    def stats(self) -> Stats:
        """A snapshot of this peer's counters; see :class:`Stats`."""
        served, errors = self._receiver.counts
        return snapshot(self._caller.made, served, errors, self._publisher.delivery(),
                        self._receiver.received, self._local.recoveries)

