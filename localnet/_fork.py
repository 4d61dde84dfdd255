"""fork(): a child never shares the parent's peers.

A child made by ``os.fork()`` (or by ``multiprocessing`` and
``concurrent.futures`` with the *fork* start method) starts as a copy of
its parent: every socket, every lock as it was at that instant (held, if
another thread held it), every request id and the exit handlers.  Were the
child to use those, it would read replies meant for the parent's calls,
present itself under the parent's name, and at exit close the parent's
peer: unregister it, shut down its listener (the parent's accept loop
then fails forever) and delete its socket file.

So, in the child, straight after the fork (``os.register_at_fork``), while
it has only the one thread that forked:

* every :class:`~localnet.Peer` object inherited from the parent is
  *detached*: the child closes its copies of that peer's sockets - close
  only: ``shutdown()`` would act on the connection the parent still uses,
  and the socket file and the registration stay the parent's - and the
  object is closed for good, so using it raises :class:`PeerClosed` naming
  the process it belongs to;
* the process's live peers and its default peer are forgotten, so the
  child's exit handlers close nothing of the parent's, and the child's
  first remote call or trigger starts a peer of its own, named
  ``<program>-<child pid>`` (``LOCALNET_NAME`` names the parent, which
  was started with it, not its forked children);
* the locks localnet's shared state lives under (the live peers, the
  catalog, the shared-memory pool) are made anew, the catalog forgets the
  parent's peers as listeners, and the shared-memory segments the parent
  kept for reuse are never reused by the child (both would write into the
  same pages); descriptors a parent thread held only for a moment (the
  registry's spawn lock, its ready pipe) are closed.

A child that never touches localnet pays for a few ``close()`` calls.  A
peer started in the child is the child's, and is closed at its exit like
any other; the parent's peers are unaffected throughout.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from . import _current, _shm
from ._catalog import CATALOG
from .errors import PeerClosed

if TYPE_CHECKING:
    from ._peer import Peer

#: Every Peer object of this process (weakly): a forked child detaches them all.
_peers: weakref.WeakSet[Peer] = weakref.WeakSet()

#: In a forked child, the pid of the process it was forked from; else None.
forked_from: int | None = None

# Descriptors held for a moment (the registry spawn lock, its ready pipe).
# A child forked meanwhile would keep the flock, or the pipe open, for as
# long as it lives: it closes its copies.  Opened and closed with
# ``brief_lock`` held, which a fork waits for, so the set is exact.
brief_lock = threading.Lock()
brief_fds: set[int] = set()


def track(peer: Peer) -> None:
    """Remember ``peer`` so that a forked child can detach it."""
    _peers.add(peer)


def env_name() -> str | None:
    """``LOCALNET_NAME``, unless this is a forked child: the name is the parent's."""
    return os.environ.get("LOCALNET_NAME") if forked_from is None else None


def closed_error(peer: Peer, message: str) -> PeerClosed:
    """The error for using a closed ``peer``: it says so when fork() made it foreign."""
    if peer.pid != os.getpid():
        return PeerClosed(
            f"{peer!r} belongs to process {peer.pid}; a forked child gets its own peer "
            "on first use (or make a new Peer)")
    return PeerClosed(message)


def _detach(peer: Peer) -> None:
    """Make an inherited peer unusable here, without touching the parent's."""
    # Private attributes of the peer on purpose: the Peer class stays as it
    # is, and this is the one place that knows what a fork leaves behind.
    peer._lock = threading.RLock()
    peer.state = _current.State.CLOSED
    peer._stoppers = []
    peer._started.set()
    server, registry = peer._server, peer._local.registry
    if server is not None:
        server._after_fork_in_child()
    if registry is not None:
        registry._after_fork_in_child()
    peer._caller._after_fork_in_child()
    peer._publisher._after_fork_in_child()


def _before_fork() -> None:
    brief_lock.acquire()


def _after_fork_in_parent() -> None:
    brief_lock.release()


def _after_fork_in_child() -> None:
    global forked_from, brief_lock
    forked_from = os.getppid()
    brief_lock = threading.Lock()  # the forking thread held the parent's
    for fd in brief_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    brief_fds.clear()
    _current._after_fork_in_child()
    CATALOG._after_fork_in_child()
    _shm._after_fork_in_child()
    for peer in list(_peers):
        try:
            _detach(peer)
        except Exception:  # a fork must never fail for our sake
            pass
    _peers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
