"""The exceptions localnet raises.

Every error localnet raises derives from :class:`LocalnetError`, so one
``except localnet.LocalnetError`` catches them all::

    LocalnetError
    ├── ConfigurationError        bad keyword or environment value, unsafe runtime directory
    ├── NameTaken                 a live peer already holds that name
    ├── PeerNotFound              no live peer has that name
    ├── UnknownConnection         the peer offers no such connection (also an AttributeError)
    ├── SerializationError        an argument or result could not be pickled or unpickled
    ├── RemoteError               a remote exception that could not be rebuilt locally
    ├── ConnectionLost            the other side went away (peer died, closed, or sent garbage)
    │   └── PeerStopping          the called peer is winding down and refused the call (nothing ran)
    ├── RegistryUnavailable       the registry could not be reached or started in time
    ├── PeerClosed                you closed this peer and then used it (or a forked child used
    │                             its parent's)
    ├── OutOfResources            the system refused descriptors, disk or memory (also an OSError)
    ├── TooManyCalls              a limit on calls at once was reached (nothing ran)
    ├── Timeout                   an operation took longer than its timeout (also a TimeoutError)
    └── WouldDeadlock             flush() would wait for itself (also a RuntimeError)

A remote call re-raises the remote exception as its own type when it can be
rebuilt in the caller (so ``except ValueError`` works); the remote traceback
text is attached as ``exc.remote_traceback`` and as a note on the exception.

All of these pickle cleanly: they cross process boundaries.
"""

from __future__ import annotations

import errno
import resource
from typing import Any

__all__ = [
    "ConfigurationError",
    "ConnectionLost",
    "LocalnetError",
    "NameTaken",
    "OutOfResources",
    "PeerClosed",
    "PeerNotFound",
    "PeerStopping",
    "RegistryUnavailable",
    "RemoteError",
    "SerializationError",
    "Timeout",
    "TooManyCalls",
    "UnknownConnection",
    "WouldDeadlock",
]


class LocalnetError(Exception):
    """Base class of every error localnet raises."""


class ConfigurationError(LocalnetError, ValueError):
    """A keyword argument, environment variable or runtime directory is unusable."""


class NameTaken(LocalnetError):
    """A live peer already holds this name in this runtime directory.

    Choose another ``name=`` (or ``LOCALNET_NAME``), or stop the other peer.
    """

    def __init__(self, name: str, pid: int | None = None) -> None:
        self.name = name
        self.pid = pid
        holder = f" (held by pid {pid})" if pid else ""
        super().__init__(f"peer name {name!r} is taken by a live peer{holder}; choose another name")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.pid))


class PeerNotFound(LocalnetError, LookupError):
    """No live peer of that name is registered."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = list(known or [])
        hint = f"; live peers: {', '.join(sorted(self.known))}" if self.known else ""
        super().__init__(f"no live peer named {name!r}{hint}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.known))


class UnknownConnection(LocalnetError, AttributeError):
    """The peer offers no connection of that name.

    ``offered`` lists the connections the peer does offer.
    """

    def __init__(self, connection: str, peer: str, offered: list[str] | None = None) -> None:
        self.connection = connection
        self.peer = peer
        self.offered = sorted(offered or [])
        listing = ", ".join(self.offered) if self.offered else "none"
        super().__init__(
            f"peer {peer!r} offers no connection {connection!r}; it offers: {listing}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.connection, self.peer, self.offered))


class SerializationError(LocalnetError):
    """A value could not be pickled (raised where it was sent) or unpickled."""


class RemoteError(LocalnetError):
    """An exception raised in another peer that could not be rebuilt here.

    Also how a remote ``BaseException`` that is not an ``Exception`` arrives
    (``SystemExit`` from ``sys.exit()`` in a connection, ``KeyboardInterrupt``):
    it ends the remote call, never the caller's process.

    ``type_name`` is the remote exception's qualified type name and
    ``remote_traceback`` the remote traceback text.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class ConnectionLost(LocalnetError, ConnectionError):
    """The other side went away: the peer died, closed, or broke the protocol."""


class PeerStopping(ConnectionLost):
    """The called peer is winding down (SIGTERM, ``close()``) and refused this call.

    Nothing ran, so the call may be made again elsewhere.  Calls the peer
    had already started still get their answers; new ones get this error
    instead of a bare :class:`ConnectionLost` (which says nothing about
    whether the call ran).
    """


class RegistryUnavailable(LocalnetError):
    """The registry could not be reached or started in time."""


class PeerClosed(LocalnetError):
    """This peer was closed; start a new one.

    Also raised in a forked child that uses a peer of its parent's: the
    child gets its own peer on first use, or makes a new ``Peer``.
    """


class TooManyCalls(LocalnetError):
    """A limit on concurrent calls was reached, so this call did not run.

    Either the calling peer already had ``max_calls`` calls in flight to that
    peer, or the called peer was already running ``max_workers`` calls (each
    nested callback holds one on each side).  The message names the limit
    and the ``Peer`` keyword that raises it.
    """


class Timeout(LocalnetError, TimeoutError):
    """An operation did not finish within its timeout."""


class OutOfResources(LocalnetError, OSError):
    """The system refused something localnet needed: descriptors, disk space, memory.

    Also an ``OSError`` with the original ``errno``.  The message says what
    ran out and what to do about it.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


_ADVICE = {
    errno.EMFILE: "this process is out of file descriptors (limit {limit}): raise the limit "
                  "(ulimit -n, or resource.setrlimit(RLIMIT_NOFILE)) or close what holds them",
    errno.ENFILE: "the system is out of file descriptors: close some, or raise fs.file-max",
    errno.ENOSPC: "the file system of the runtime directory is full (space or inodes): free "
                  "some, or point LOCALNET_DIR elsewhere",
    errno.EDQUOT: "the disk quota of the runtime directory is used up: free some, or point "
                  "LOCALNET_DIR elsewhere",
    errno.ENOMEM: "the system is out of memory",
    errno.ENOBUFS: "the system is out of socket buffer memory",
}


def translate_os_error(exc: OSError, doing: str,
                       other: type[LocalnetError] = ConnectionLost) -> LocalnetError:
    """The localnet error for ``exc``, met while ``doing`` (for ``raise ... from exc``).

    Exhausted resources become :class:`OutOfResources` with advice; any
    other failure becomes ``other`` with the system's message.
    """
    advice = _ADVICE.get(exc.errno or 0)
    if advice is not None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return OutOfResources(exc.errno, f"{doing}: {advice.format(limit=limit)}")
    return other(f"{doing}: {exc.strerror or exc}")


class WouldDeadlock(LocalnetError, RuntimeError):
    """Waiting here would wait for itself, forever.

    ``flush()`` raises it, before waiting for anything, when a subscriber's
    acknowledgement waits for the calling thread: called from a handler of
    the flushing peer's own events, or from a connection that a subscriber's
    handler for those events is calling.
    """
