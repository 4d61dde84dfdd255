"""Process identity and liveness.

A process is identified by its pid *and* when it began, so a pid the kernel
has handed to a new process is not mistaken for the old one.  A zombie
(dead, not yet reaped by its parent) counts as dead.

When it began is compared as the kernel's own start time in clock ticks
since boot (``/proc/<pid>/stat``, field 22), which no wall-clock step moves.
psutil's creation time is that figure plus the boot time, which the kernel
derives from the wall clock: a clock step (NTP, a suspended laptop, a VM
restored) moves every process's creation time at once, and compared within
a margin it made live peers look dead.  The epoch-seconds creation time is
still kept (``started``) to show people; where there is no ``/proc``, it is
the identity, through psutil.
"""

from __future__ import annotations

import os
import socket
import struct

import psutil

# Creation times are floats rounded differently by different calls; anything
# within this margin is the same process.
_SAME_START = 0.05
_PROC = os.path.exists(f"/proc/{os.getpid()}/stat")


def create_time(pid: int | None = None) -> float:
    """The creation time of ``pid`` (this process by default), in epoch seconds."""
    return float(psutil.Process(os.getpid() if pid is None else pid).create_time())


class _Unknown(Exception):
    """``/proc`` could not be read for a reason that says nothing about the process."""


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start ticks)`` of ``pid`` from ``/proc``; None when it is gone.

    Raises _Unknown when the file could not be read for another reason (no
    descriptor left, say): that is no sign the process died.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise _Unknown(str(exc)) from exc
    try:
        # The command name (field 2) may hold spaces and parentheses: the
        # fields that follow start after its last ')'.
        fields = raw[raw.rindex(b")") + 2:].split()
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (ValueError, IndexError):
        return None


def start_ticks(pid: int | None = None) -> int | None:
    """When ``pid`` (this process by default) began, in clock ticks since boot.

    None where ``/proc`` does not tell (not Linux).
    """
    try:
        stat = _stat(os.getpid() if pid is None else pid)
    except _Unknown:
        return None
    return None if stat is None else stat[1]


def is_alive(pid: int, started: float, ticks: int | None = None) -> bool:
    """True when process ``pid`` exists, is not a zombie, and is the one that began then.

    ``ticks`` (from :func:`start_ticks`) is compared exactly when given and
    ``/proc`` is there; otherwise ``started`` (epoch seconds) within a margin.
    When ``/proc`` cannot be read (this process is out of descriptors), a
    pid that exists counts as alive: a live peer must never be pruned for a
    check that could not be made; a dead one is pruned at a later check.
    """
    if ticks is not None and _PROC:
        try:
            stat = _stat(pid)
        except _Unknown:
            return _exists(pid)
        return stat is not None and stat[1] == ticks and stat[0] not in ("Z", "X")
    try:
        proc = psutil.Process(pid)
        if not abs(proc.create_time() - started) <= _SAME_START:  # NaN is never the same
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _exists(pid: int) -> bool:
    """Whether ``pid`` exists (maybe as another process), asked without a descriptor."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
