"""Dispatchers: running served calls and handlers on the application's own thread.

A GUI or DCC application (Qt, Tk, Maya, Houdini, Blender) may touch its
widgets or its scene only from its main thread, which is busy running the
toolkit's event loop.  A :class:`Dispatcher` is the way to run a piece of
work on such a thread: localnet's serving thread hands the call or the
handler to it and waits; the work runs on the *home* thread when the
application's loop comes round to it; then the reply, or the event's
acknowledgement, goes out.  Order, errors and counts are those of the
thread API, since the serving thread still does everything but the run.

Each kind of host differs only in how its loop is woken (:meth:`_wake`):
an asyncio loop through ``call_soon_threadsafe``, Qt through a queued
signal, Tk through a file handler on a pipe (see :mod:`localnet.dispatch`),
and :class:`ManualDispatcher` not at all: the host calls
:meth:`~Dispatcher.run_pending` from an idle or timer hook.

Re-entrancy.  When the home thread itself makes a blocking call (or a
``flush()``) and the peer it calls calls back a connection dispatched onto
this very thread, the callback must run while the home thread waits.  So
a blocking call made on a home thread (:func:`is_home`) is made by a helper
thread while the home thread keeps running its dispatchers' work
(:func:`pump_while`), as a nested event loop would.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._deadlock import _local
from ._signals import current_mask, spawn_thread
from .errors import ConfigurationError, PeerStopping

__all__ = ["Dispatched", "Dispatcher", "ManualDispatcher", "bind", "checked", "is_home",
           "pump_while"]


class _Work:
    """One call of a function on the home thread, and its outcome."""

    __slots__ = ("func", "args", "kwargs", "done", "ok", "value")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None

    def finish(self, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value
        self.done.set()


class Dispatcher:
    """Runs work on one thread of the application's (its *home* thread).

    Created on the home thread (subclasses for loops say otherwise).  Give
    it to ``Peer(dispatcher=...)``, ``@connect(dispatcher=...)`` or
    ``@subscribe(..., dispatcher=...)``.  A subclass says how to wake the
    home thread's loop (:meth:`_wake`); the loop then calls
    :meth:`run_pending`.
    """

    def __init__(self, adopt: bool = True) -> None:
        self._lock = threading.Lock()
        self._queue: deque[_Work] = deque()
        self._scheduled = False  # a wake-up is on its way: no need for another
        self._pokes: list[threading.Event] = []  # home-thread waits (pump_while)
        self._closed: BaseException | None = None
        self.home: int | None = None
        if adopt:
            self._adopt()

    def _adopt(self) -> None:
        """Make the current thread the home thread."""
        self.home = threading.get_ident()
        homes = _local.homes
        _local.homes = (*homes, self) if homes else (self,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} home={self.home} pending={len(self._queue)}>"

    # -- from localnet's serving threads ----------------------------------------------
    def run(self, func: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        """Run ``func(*args, **kwargs)`` on the home thread; its result, or raise.

        On the home thread itself it runs at once.  Raises PeerStopping when
        the dispatcher was closed before the work ran.
        """
        if self._closed is not None:
            raise self._closed
        if threading.get_ident() == self.home:
            return func(*args, **kwargs)
        work = _Work(func, args, kwargs)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            self._queue.append(work)
            wake = not self._scheduled
            self._scheduled = True
            pokes = list(self._pokes)
        for poke in pokes:
            poke.set()
        if wake:
            self._wake()
        work.done.wait()
        if work.ok:
            return work.value
        raise work.value

    def _wake(self) -> None:
        """Have the home thread's loop call :meth:`run_pending` soon (any thread)."""

    # -- on the home thread ----------------------------------------------------------
    def run_pending(self, max_seconds: float | None = None) -> int:
        """Run the work waiting for the home thread; how many pieces ran.

        Stops once nothing waits, or after ``max_seconds`` (the piece
        running then finishes first), leaving the rest for the next call.
        A ``KeyboardInterrupt`` or ``SystemExit`` raised by a piece is
        reported to its caller as an error and raised here too.
        """
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        ran = 0
        while True:
            with self._lock:
                if not self._queue:
                    self._scheduled = False
                    return ran
                work = self._queue.popleft()
            self._execute(work)
            ran += 1
            if deadline is not None and time.monotonic() >= deadline:
                with self._lock:
                    if self._queue:
                        self._scheduled = True
                        rest = True
                    else:
                        self._scheduled = rest = False
                if rest:
                    self._wake()  # the rest in the loop's next round
                return ran

    def _execute(self, work: _Work) -> None:
        try:
            value = work.func(*work.args, **work.kwargs)
        except (KeyboardInterrupt, SystemExit) as exc:
            work.finish(False, exc)
            raise
        except BaseException as exc:
            work.finish(False, exc)
        else:
            work.finish(True, value)

    def close(self) -> None:
        """Refuse new work and fail what waits (PeerStopping); for a host loop's end."""
        with self._lock:
            self._closed = PeerStopping(f"{self!r} was closed before the work ran")
            waiting, self._queue = list(self._queue), deque()
        for work in waiting:
            work.finish(False, self._closed)
        homes = _local.homes if threading.get_ident() == self.home else ()
        if homes and self in homes:
            _local.homes = tuple(d for d in homes if d is not self) or None


class ManualDispatcher(Dispatcher):
    """Work waits until the host calls :meth:`run_pending` on the home thread.

    For hosts that offer an idle or timer hook rather than a loop localnet
    can wake: Maya's ``executeDeferred``/``scriptJob(idleEvent=...)``,
    Houdini's ``hdefereval``/event loop callbacks, Blender's
    ``bpy.app.timers``.  :meth:`pending` tells whether anything waits.
    """

    def pending(self) -> int:
        """How many pieces of work wait for :meth:`run_pending`."""
        return len(self._queue)


class Dispatched:
    """A connection or handler bound to a dispatcher of its own (``dispatcher=``).

    Calling it runs the function through the dispatcher; a peer's own
    dispatcher does not apply to it.
    """

    __slots__ = ("func", "dispatcher", "__wrapped__")

    def __init__(self, func: Callable[..., Any], dispatcher: Dispatcher) -> None:
        self.func = func
        self.dispatcher = checked(dispatcher)
        self.__wrapped__ = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.dispatcher.run(self.func, args, kwargs)


def checked(dispatcher: object) -> Dispatcher:
    """``dispatcher``, or ConfigurationError when it is not one."""
    if not isinstance(dispatcher, Dispatcher):
        raise ConfigurationError(f"dispatcher={dispatcher!r}: use a localnet.dispatch "
                                 "dispatcher (AsyncioDispatcher, QtDispatcher, TkDispatcher, "
                                 "ManualDispatcher)")
    return dispatcher


def bind(func: Callable[..., Any], dispatcher: Dispatcher | None) -> Callable[..., Any]:
    """``func`` as a serving thread should call it: through ``dispatcher`` unless it
    has one of its own (or there is none)."""
    if dispatcher is None or type(func) is Dispatched:
        return func
    return Dispatched(func, dispatcher)


# -- a blocking call on the home thread ------------------------------------------------
def is_home() -> bool:
    """True on a thread that some dispatcher runs work on."""
    return _local.homes is not None


class _Helper:
    """A thread that makes blocking calls for a home thread (see pump_while), reused."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        spawn_thread(self._run, name="localnet-home-call", mask=current_mask())

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()


_helpers: list[_Helper] = []  # idle ones; list pop/append are atomic
_KEEP = 4  # idle helpers kept for the next calls


def pump_while(func: Callable[..., Any], *args: Any) -> Any:
    """Call ``func(*args)`` on a helper thread; meanwhile run this home thread's
    dispatched work (a callback of the peer being called, say).  Its result."""
    homes: tuple[Dispatcher, ...] = _local.homes or ()
    poke = threading.Event()
    outcome: list[Any] = []

    def job() -> None:
        try:
            outcome.append((True, func(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the home thread
            outcome.append((False, exc))
        finally:
            poke.set()

    for dispatcher in homes:
        with dispatcher._lock:  # noqa: SLF001
            dispatcher._pokes.append(poke)  # noqa: SLF001
    try:
        try:
            helper = _helpers.pop()
        except IndexError:
            helper = _Helper()
        helper.jobs.put(job)
        while not outcome:
            poke.wait()
            poke.clear()
            for dispatcher in homes:
                dispatcher.run_pending()
    finally:
        for dispatcher in homes:
            with dispatcher._lock:  # noqa: SLF001
                if poke in dispatcher._pokes:  # noqa: SLF001
                    dispatcher._pokes.remove(poke)  # noqa: SLF001
    # (interrupted, the helper finishes the call and is not kept)
    if len(_helpers) < _KEEP:
        _helpers.append(helper)
    else:
        helper.jobs.put(None)
    ok, value = outcome[0]
    if ok:
        return value
    raise value


def _after_fork_in_child() -> None:
    """The parent's helper threads did not come along."""
    _helpers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
