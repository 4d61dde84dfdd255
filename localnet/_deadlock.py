"""Waits that would wait for themselves: which acknowledgements a thread must not await.

A subscriber acknowledges a batch of events only once their handlers have
returned, so ``flush()`` hangs for good when the acknowledgement it waits
for is held up by the very thread that calls it:

* the thread runs a handler for events of the flushing peer (a peer that
  subscribes to its own events, or two peers of one process): the
  subscriber's acknowledgement waits for this thread;
* the thread serves a call that a subscriber's handler for the flushing
  peer's events is waiting on: that handler, hence its acknowledgement,
  waits for the call to return.

Each thread notes what it does in a thread-local record: a thread that runs
handlers notes the publisher (:func:`receiving`); a call channel opened from
such a thread to that very publisher says so in its ``HELLO`` (``handling``:
the subscribing peer's name, see :func:`handling_for`), and the threads that
serve it note it (:func:`serving`).  :func:`blocked` tells ``flush()`` which
subscribers it must not wait for.  Only these direct cases are seen: a
handler whose call reaches the publisher through a third peer is not.
"""

from __future__ import annotations

import os
import threading
from typing import Any


class _Record(threading.local):
    # Class defaults: reading an unset record finds None here instead of
    # raising AttributeError inside getattr() (a cost on every call).
    receiving: tuple[str, int, str] | None = None
    serving: tuple[Any, ...] | None = None
    # The dispatchers whose home this thread is (see _dispatch), or None.
    homes: tuple[Any, ...] | None = None


_local = _Record()


def receiving(publisher: str, pid: int, subscriber: str) -> None:
    """This thread runs ``subscriber``'s handlers for the events of ``publisher`` (pid)."""
    _local.receiving = (publisher, pid, subscriber)


def handling_for(target: str) -> str | None:
    """The subscriber whose handlers for ``target``'s events run on this thread, if any:
    what a call channel from this thread to ``target`` announces in its HELLO."""
    record = _local.receiving
    if record is not None and record[0] == target:
        return str(record[2])
    return None


def caller_handling(hello: dict[str, Any]) -> tuple[int, str] | None:
    """From a call channel's HELLO: (caller's pid, subscriber) when its calls come
    from the thread running that subscriber's handlers for the callee's events."""
    handling, pid = hello.get("handling"), hello.get("pid")
    if isinstance(handling, str) and type(pid) is int:
        return pid, handling
    return None


def serving(callee: str, caller: tuple[int, str]) -> None:
    """This thread serves calls to ``callee`` from ``caller`` (see :func:`caller_handling`)."""
    _local.serving = (callee, *caller)


def blocked(publisher: str, pid: int) -> set[tuple[str, int]]:
    """The subscribers, as (name, pid), whose acknowledgements of ``publisher``'s
    events wait for the current thread."""
    found = set()
    record = _local.receiving
    if record is not None and record[0] == publisher and record[1] == pid:
        found.add((str(record[2]), os.getpid()))
    served = _local.serving
    if served is not None and served[0] == publisher:
        found.add((str(served[2]), int(served[1])))
    return found
