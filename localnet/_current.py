"""The process's live peers, and which of them is current.

Every started :class:`~localnet.Peer` enters :data:`live` and leaves it when
it closes; the most recently started one is the *current* peer, through
which the module-level API (remote calls, triggers, ``peers()``) goes.

The process's subscriptions are registered by one peer only, the
*receiving* peer (:data:`receiving`): the first one started, and when it
closes, the oldest peer still running, which the registry hands them over
to in one step (see ``hand_over`` in :mod:`localnet._registry`).  Every
handler thus runs once per event, whichever peers the process runs.
This module sits below both :mod:`localnet._peer` (which enters and leaves
the list) and :mod:`localnet._api` (which reads it and makes the default
peer), so neither imports the other back.  A peer's :class:`State` lives here
too, for the same reason: the parts of a peer check it.
"""

from __future__ import annotations

import atexit
import os
import threading
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._peer import Peer

class State(Enum):
    """A peer's life: NEW until started, RUNNING, then CLOSED for good."""

    NEW = "NEW"
    RUNNING = "RUNNING"
    CLOSED = "CLOSED"


RUNNING = State.RUNNING  # for the hot paths: an enum member lookup costs 0.1 µs

lock = threading.RLock()
#: Started peers of this process, oldest first; read without the lock (list
#: reads are atomic), changed only with it.
live: list[Peer] = []


class _Default:
    """The default peer: made on demand from the environment, closed at exit.

    ``closed`` is the peer whose closing left the process with none running:
    from then on the module-level API raises PeerClosed naming it, rather
    than quietly starting a default peer under another name.
    """

    peer: Peer | None = None
    closed: Peer | None = None


default = _Default()


class _Receiving:
    """The peer that registers this process's subscriptions (None: no peer runs)."""

    peer: Peer | None = None


receiving = _Receiving()
#: Held while a peer tells the registry about subscriptions, and while one
#: hands them over: the registry sees the changes in the order they happened.
subscribing = threading.RLock()


def claim_receiving(peer: Peer) -> bool:
    """A peer is starting: it becomes the receiving peer unless another one is.

    A holder left over from the parent of a forked process, or a closed one,
    does not count.
    """
    with lock:
        holder = receiving.peer
        if holder is None or holder.pid != os.getpid() or holder.state is State.CLOSED:
            receiving.peer = peer
        return receiving.peer is peer


def release_receiving(peer: Peer) -> None:
    """``peer`` failed to start: it receives nothing."""
    with lock:
        if receiving.peer is peer:
            receiving.peer = None


def next_receiving(peer: Peer) -> Peer | None:
    """``peer`` stops receiving: the oldest other running peer takes over.

    Returns that successor (None when ``peer`` was not receiving, or no other
    peer runs).
    """
    with lock:
        if receiving.peer is not peer:
            return None
        successor = next((p for p in live if p is not peer and p.state is State.RUNNING
                          and p.pid == os.getpid()), None)
        receiving.peer = successor
        return successor


def peer_started(peer: Peer) -> None:
    with lock:
        live.append(peer)
        default.closed = None


def peer_stopped(peer: Peer) -> None:
    with lock:
        if peer in live:
            live.remove(peer)
            if not live:
                default.closed = peer


@atexit.register
def _close_all() -> None:
    with lock:
        peers = list(reversed(live))
    for peer in peers:
        try:
            peer.close()
        except Exception:
            pass


# -- fork (see localnet._fork) -------------------------------------------------
def _after_fork_in_child() -> None:
    """A forked child has no live peer and no default peer yet, and a lock of its own."""
    global lock, subscribing
    lock = threading.RLock()  # another thread of the parent may have held it
    subscribing = threading.RLock()
    live.clear()  # in place: localnet._api reads this very list
    default.peer = None
    default.closed = None  # a fresh process: its first use starts a default peer
    receiving.peer = None  # the parent's receiving peer is not the child's
