"""The names users write: decorators, discovery helpers and the default peer.

Decorators only record intent in the process's catalog; nothing touches the
network at import time.  The first operation that needs the network (a
remote call, a trigger, ``peers()``) uses the most recently started live
peer of this process, or starts a *default peer* configured from the
``LOCALNET_*`` environment variables, which is closed at interpreter exit.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from ._atwins import AsyncConnection, AsyncEvent
from ._catalog import CATALOG
from ._current import live as _live
from ._default import current_peer
from ._dispatch import Dispatched, Dispatcher, checked
from ._peer import Peer
from ._remote import RemotePeer
from ._signals import Stopper, wait_for_stop
from ._timeouts import check_timeout
from .errors import ConfigurationError

try:  # the call of an event trigger in C (optional, see localnet/_trigger.c)
    from ._trigger import EventCall
except ImportError:  # built without a C compiler
    EventCall = None  # type: ignore[assignment,misc]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class Connection(Generic[P, R]):
    """A function other peers can call; made by :func:`connect`.

    Called plainly it runs here.  With ``peer=`` (a name or a RemotePeer) it
    runs in that peer and returns its result; ``.on(peer, timeout=...)``
    returns a callable that does the same with a timeout.

    Like a function, it binds when read from an instance (a connection
    stored as a class attribute); a staticmethod or bound method it wraps
    is not bound again.
    """

    def __init__(self, func: Callable[P, R], name: str) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None or not isinstance(self.func, types.FunctionType):
            return self
        return types.MethodType(self, instance)

    def __call__(self, *args: Any, peer: str | RemotePeer | None = None, **kwargs: Any) -> R:
        if peer is None:
            return self.func(*args, **kwargs)
        try:
            me = _live[-1]  # current_peer(), inlined for the common case
        except IndexError:
            me = current_peer()
        result: R = me.call(peer, self.name, args, kwargs, None)
        return result

    def on(self, peer: str | RemotePeer, timeout: float | None = None) -> Callable[P, R]:
        """A callable that runs this connection in ``peer``.

        Raises ConfigurationError at once when ``timeout`` is not None or a
        positive number of seconds.  Raises (when called): the remote
        exception, PeerNotFound, UnknownConnection, Timeout, ConnectionLost,
        SerializationError.
        """
        timeout = check_timeout(timeout)
        name = self.name

        def remote(*args: P.args, **kwargs: P.kwargs) -> R:
            result: R = current_peer().call(peer, name, args, kwargs, timeout)
            return result

        functools.update_wrapper(remote, self.func)
        return remote

    @property
    def aio(self) -> AsyncConnection:
        """The awaited twin: ``await render.aio(7, peer="b")``,
        ``await render.aio.on("b", timeout=5)(7)`` (see :mod:`localnet.aio`)."""
        return AsyncConnection(self)

    def __repr__(self) -> str:
        return f"<localnet.Connection {self.name!r} of {self.func.__qualname__}>"


@overload
def connect(tag: Callable[P, R]) -> Connection[P, R]: ...
@overload
def connect(tag: str | None = None, *, dispatcher: Dispatcher | None = None
            ) -> Callable[[Callable[P, R]], Connection[P, R]]: ...


def connect(tag: Any = None, *, dispatcher: Dispatcher | None = None) -> Any:
    """Offer a function to other peers, under its name or under ``tag``.

    ``dispatcher`` (a :mod:`localnet.dispatch` dispatcher) runs the calls
    other peers make on the application's thread it stands for, whatever
    the peer's own dispatcher.

    Two peers whose functions differ in name but share a tag can call each
    other's::

        @localnet.connect()
        def render(frame, quality=1): ...

        render(7)                    # here
        render(7, peer="farm-2")     # in peer farm-2
    """
    if callable(tag):
        return connect()(tag)
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise ConfigurationError("connect() takes an optional non-empty string tag")
    if dispatcher is not None:
        checked(dispatcher)

    def decorate(func: Callable[P, R]) -> Connection[P, R]:
        _refuse_methods(func, tag)
        name = tag or func.__name__
        CATALOG.add_connection(name, func if dispatcher is None else
                               Dispatched(func, dispatcher))
        return Connection(func, name)

    return decorate


def _refuse_methods(func: Any, tag: str | None) -> None:
    """Refuse what another peer could not call: a method, a classmethod.

    A function defined in a class body whose first parameter is ``self`` or
    ``cls`` is a method: the peer would call it without an instance (which
    instance would a remote caller mean?).  A bound method, a staticmethod
    and a plain function are fine.
    """
    if isinstance(func, classmethod):
        target = func.__func__
    elif isinstance(func, types.FunctionType):
        code = func.__code__
        parts = func.__qualname__.split(".")
        if len(parts) < 2 or parts[-2] == "<locals>" or not code.co_argcount \
                or code.co_varnames[0] not in ("self", "cls"):
            return
        target = func
    else:
        return
    short = target.__name__
    label = f'"{tag or short}"'
    if isinstance(func, classmethod):
        owner = target.__qualname__.rpartition(".")[0].rpartition(".")[2] or "TheClass"
        how = f"offer it bound to its class: localnet.connect({label})({owner}.{short})"
    else:
        how = ("offer one instance's bound method once the instance exists: "
               f"localnet.connect({label})(instance.{short})")
    raise ConfigurationError(
        f"@localnet.connect() cannot offer the method {target.__qualname__}: another peer "
        f"would call it without an instance. Decorate a module-level function or a "
        f"@staticmethod, or {how}")


class _EventCall:
    """What calling an :class:`Event` does (``localnet._trigger.EventCall`` in C)."""

    func: Callable[..., Any]
    name: str
    _live: list[Peer]
    _current_peer: Callable[[], Peer]

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        out: tuple[tuple[Any, ...], dict[str, Any]] = self.func(*args, **kwargs)
        if type(out) is not tuple or len(out) != 2 or type(out[0]) is not tuple \
                or type(out[1]) is not dict:
            out = self._check(out)
        try:
            peer = self._live[-1]  # current_peer(), inlined for the common case
        except IndexError:
            peer = self._current_peer()
        peer.publish(self.name, out[0], out[1])
        return out

    def _check(self, out: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError


class Event(EventCall or _EventCall, Generic[P]):  # type: ignore[misc]
    """An event trigger made by :func:`event`.

    Calling it runs the decorated function, which returns ``(args, kwargs)``;
    those are delivered to every matching subscriber, and returned.
    """

    def __init__(self, func: Callable[P, Any], name: str) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.name = name
        self._live = _live
        self._current_peer = current_peer

    if TYPE_CHECKING:
        def __call__(self, *args: P.args, **kwargs: P.kwargs
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]: ...

    def __reduce__(self) -> tuple[Any, ...]:  # (the C base's members are not in __dict__)
        return type(self), (self.func, self.name)

    def _check(self, out: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list)) \
                and isinstance(out[1], dict):
            return tuple(out[0]), out[1]
        raise TypeError(
            f"event function {self.func.__qualname__!r} must return (args, kwargs), "
            f"a tuple of a tuple and a dict; it returned {type(out).__name__}"
        )

    @property
    def aio(self) -> AsyncEvent:
        """The awaited twin: ``await frame_done.aio(7)`` awaits room where a trigger
        would block (see :mod:`localnet.aio`)."""
        return AsyncEvent(self)

    def __repr__(self) -> str:
        return f"<localnet.Event {self.name!r}>"


def event(name: str) -> Callable[[Callable[P, Any]], Event[P]]:
    """Make a function trigger event ``name`` when called.

    The function returns ``(args, kwargs)`` (it may clean or convert them);
    every subscriber's handler is called with ``*args, **kwargs``::

        @localnet.event("frame_done")
        def frame_done(*args, **kwargs):
            return args, kwargs

    Raises (when called): TypeError when the function returns anything
    else, SerializationError when an argument does not pickle (then nothing
    is sent to anyone).
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError("event() takes the event's name, a non-empty string")

    def decorate(func: Callable[P, Any]) -> Event[P]:
        CATALOG.add_event(name)
        return Event(func, name)

    return decorate


def _names(peers: str | RemotePeer | Iterable[str | RemotePeer] | None) -> frozenset[str] | None:
    if peers is None:
        return None
    items: Iterable[str | RemotePeer] = [peers] if isinstance(peers, (str, RemotePeer)) else peers
    names = []
    for p in items:
        if isinstance(p, RemotePeer):
            names.append(p.name)
        elif isinstance(p, str) and p:
            names.append(p)
        else:
            raise ConfigurationError(f"subscribe(peers=...) takes names or RemotePeers, not {p!r}")
    return frozenset(names)


def subscribe(name: str, peers: str | RemotePeer | Iterable[str | RemotePeer] | None = None,
              group: str | None = None, hubs_only: bool = False, *,
              dispatcher: Dispatcher | None = None) -> Callable[[F], F]:
    """Run the decorated function whenever a matching peer triggers event ``name``.

    ``peers`` (a name, a RemotePeer or a list of them), ``group`` and
    ``hubs_only`` select publishers; by default every peer's events match.
    The function is returned unchanged.  A subscription covers publishers
    running now and those that start later; when a peer of this process is
    running, ``subscribe`` returns once every live publisher knows of it.
    Handlers run in this process, in order per publisher, on a thread of
    that publisher's channel (or on the application's thread that
    ``dispatcher``, a :mod:`localnet.dispatch` dispatcher, stands for);
    an exception in a handler is logged and counted, never seen by the
    publisher.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError("subscribe() takes the event's name, a non-empty string")
    if group is not None and not isinstance(group, str):
        raise ConfigurationError("subscribe(group=...) takes one group name")
    names = _names(peers)
    if dispatcher is not None:
        checked(dispatcher)

    def decorate(func: F) -> F:
        if not callable(func):
            raise ConfigurationError("subscribe() decorates a callable")
        CATALOG.add_subscription(name, func, names, group, bool(hubs_only), dispatcher)
        return func

    return decorate


def unsubscribe(handler: Callable[..., Any], name: str | None = None) -> int:
    """Stop running ``handler`` for event ``name`` (for every event when None).

    Returns how many subscriptions were removed; when a peer is running,
    publishers know of it when this returns.
    """
    removed = CATALOG.remove_subscriptions(
        lambda s: s.handler == handler and (name is None or s.event == name))
    return len(removed)


def peers(group: str | None = None, hubs_only: bool = False) -> list[RemotePeer]:
    """The other live peers, as RemotePeer objects sorted by name."""
    return current_peer().peers(group=group, hubs_only=hubs_only)


def peer(name: str) -> RemotePeer:
    """The live peer called ``name``.  Raises :class:`PeerNotFound` at once if none."""
    return current_peer().peer(name)


@dataclass(frozen=True)
class PeerInfo:
    """What :func:`info` tells about a peer."""

    name: str
    pid: int
    user: str | None
    executable: str | None
    group: str | None
    hub: bool
    connections: tuple[str, ...]
    events: tuple[str, ...]
    subscriptions: tuple[dict[str, Any], ...]
    started: float
    since: float
    address: str
    argv: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain types, ready for JSON."""
        return {"name": self.name, "pid": self.pid, "user": self.user,
                "executable": self.executable, "group": self.group, "hub": self.hub,
                "connections": list(self.connections), "events": list(self.events),
                "subscriptions": [dict(s) for s in self.subscriptions],
                "started": self.started, "since": self.since, "address": self.address,
                "argv": list(self.argv)}


def info(peer: str | RemotePeer | Peer | None = None) -> PeerInfo:
    """Describe a peer (this process's current peer when None).

    Raises :class:`PeerNotFound` when no live peer has that name.
    """
    here = current_peer()
    if peer is None or isinstance(peer, Peer):
        name = (peer or here).name
    else:
        name = peer if isinstance(peer, str) else peer.name
    raw = here.peer(name).describe() if name != here.name else \
        here.lookup(here.name)  # the registry's view of ourselves
    return PeerInfo(
        name=raw["name"], pid=int(raw["pid"]), user=raw.get("user"),
        executable=raw.get("executable"), group=raw.get("group"), hub=bool(raw.get("hub")),
        connections=tuple(raw.get("connections", ())), events=tuple(raw.get("events", ())),
        subscriptions=tuple(raw.get("subscriptions", ())), started=float(raw["started"]),
        since=float(raw.get("since", raw["started"])), address=str(raw["address"]),
        argv=tuple(raw.get("argv", ())),
    )


def serve_forever(peer: Peer | None = None, *, ready: Callable[[], Any] | None = None) -> None:
    """Start ``peer`` (the default peer when None) and serve until SIGINT or SIGTERM.

    ``ready`` is called once the peer is live and the signals are handled
    (to tell a supervisor or a test that it may proceed).  ``peer.close()``
    from another thread (a handler, say) also ends it.  Must be called from
    the main thread; the peer is closed before it returns.
    """
    target = peer if peer is not None else current_peer()
    target.start()
    stopper = Stopper()
    target._stoppers.append(stopper.stop)  # noqa: SLF001 - close() from any thread ends the wait
    try:
        wait_for_stop(stopper, ready=ready)
    finally:
        stopper.close()
        target.close()
