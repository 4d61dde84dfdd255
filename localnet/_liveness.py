"""Process identity and liveness, through psutil.

A process is identified by its pid *and* its creation time, so a pid the
kernel has handed to a new process is not mistaken for the old one.  A
zombie (dead, not yet reaped by its parent) counts as dead.
"""

from __future__ import annotations

import os
import socket
import struct

import psutil

# Creation times are floats rounded differently by different calls; anything
# within this margin is the same process.
_SAME_START = 0.05


def create_time(pid: int | None = None) -> float:
    """The creation time of ``pid`` (this process by default)."""
    return float(psutil.Process(os.getpid() if pid is None else pid).create_time())


def is_alive(pid: int, started: float) -> bool:
    """True when process ``pid`` exists, is not a zombie, and began at ``started``."""
    try:
        proc = psutil.Process(pid)
        if not abs(proc.create_time() - started) <= _SAME_START:  # NaN is never the same
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


_SO_PEERCRED = getattr(socket, "SO_PEERCRED", None)
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """Return ``(pid, uid)`` of the process at the other end of a Unix socket.

    ``None`` where the platform has no SO_PEERCRED; there the 0700 runtime
    directory is what keeps other users out.
    """
    if _SO_PEERCRED is None:
        return None
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size))
    return pid, uid


def same_user(sock: socket.socket) -> bool:
    """True when the connecting process runs as this process's user."""
    creds = peer_credentials(sock)
    return creds is None or creds[1] == os.getuid()
