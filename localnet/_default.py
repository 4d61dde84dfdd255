"""The peer the module-level API goes through: the current one, or a default peer.

Below both the thread API (:mod:`localnet._api`) and the awaitable one
(:mod:`localnet._atwins`, :mod:`localnet.aio`), which both start from it.
"""

from __future__ import annotations

from . import _current
from ._current import live as _live
from ._peer import Peer
from .errors import PeerClosed

__all__ = ["current_peer"]


def current_peer() -> Peer:
    """The peer this process's calls and events go through, started on demand.

    Raises :class:`PeerClosed` when the process's last running peer was
    closed: a default peer is made only while none was ever closed.
    """
    live = _live
    if live:
        try:
            return live[-1]  # the common case needs no lock: list reads are atomic
        except IndexError:
            pass
    with _current.lock:
        if live:
            return live[-1]
        default = _current.default
        if default.closed is not None:
            raise PeerClosed(
                f"this process's peer {default.closed.name!r} was closed; start a new "
                "localnet.Peer(...) (or a with block) before calling, triggering or listing "
                "peers")
        if default.peer is None:
            default.peer = Peer()
        peer = default.peer
    return peer.start()
