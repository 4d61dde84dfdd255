"""The event loop localnet owns, where it awaits ``async def`` connections and handlers.

A connection or subscription handler written as ``async def`` returns a
coroutine when localnet calls it on one of its threads.  :func:`await_result`
runs such an awaitable to completion on one asyncio loop per process, on a
thread of its own (``localnet-loop``, started on first use with the signal
mask of the thread that first needed it: the one served calls and handlers
run with), and blocks the calling localnet thread until it is done.  So the
serving thread answers a call, or acknowledges an event, only once the
coroutine has finished; concurrent calls run their coroutines concurrently
on that loop; events from one publisher are still handled one after another.

``KeyboardInterrupt`` and ``SystemExit`` raised inside a coroutine would stop
the loop itself (asyncio re-raises them out of ``run_forever``); they are
caught in the coroutine's wrapper and re-raised on the waiting thread, where
the serving code treats them as for a plain function.

After ``fork()`` the child has no loop thread: it starts its own on first use.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable
from typing import Any

from ._signals import current_mask, spawn_thread

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread_id: int | None = None


class _Raised:
    """A BaseException that is no Exception, carried out of the loop as a value."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def _guarded(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except (KeyboardInterrupt, SystemExit) as exc:
        return _Raised(exc)


def owned() -> asyncio.AbstractEventLoop:
    """The process's loop, started on first use."""
    global _loop, _thread_id
    loop = _loop
    if loop is not None:
        return loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                global _thread_id
                asyncio.set_event_loop(loop)
                _thread_id = threading.get_ident()
                ready.set()
                loop.run_forever()

            spawn_thread(run, name="localnet-loop", mask=current_mask())
            ready.wait()
            _loop = loop
        return _loop


def await_result(awaitable: Awaitable[Any],
                 loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """Run ``awaitable`` to completion on ``loop`` (the application's, which must be
    running), else on the owned loop; return its result or raise.

    Called from a localnet thread (serving a call, running handlers), never
    from the loop's own thread, where it could only wait for itself.
    """
    if loop is None or not loop.is_running():
        if threading.get_ident() == _thread_id:
            raise RuntimeError("localnet cannot wait for a coroutine on its own event loop "
                               "thread")
        loop = owned()
    future = asyncio.run_coroutine_threadsafe(_guarded(awaitable), loop)
    try:
        result = future.result()
    except BaseException:
        future.cancel()  # interrupted while waiting (KeyboardInterrupt): stop the coroutine
        raise
    if isinstance(result, _Raised):
        raise result.error
    return result


#: Loops inherited through fork(): kept, never run or closed (their thread is
#: the parent's; collecting one would warn of an unclosed loop).
_inherited: list[asyncio.AbstractEventLoop] = []


def _after_fork_in_child() -> None:
    """The parent's loop thread did not come along: start afresh on first use."""
    global _loop, _thread_id, _lock
    _lock = threading.Lock()
    if _loop is not None:
        _inherited.append(_loop)
    _loop = None
    _thread_id = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
