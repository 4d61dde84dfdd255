"""Shared memory for large buffers: memfd segments, a reuse pool, receivers' mappings.

On Linux a large out-of-band buffer (a NumPy array's data, a bytearray, a
memoryview) is copied once into a ``memfd`` segment whose descriptor
travels with the message (SCM_RIGHTS); the receiver maps it and gets an
array that views the shared pages, read-only, with no further copy.  The
kernel frees a segment when the last process lets go of it, crash or not,
and nothing ever appears in ``/dev/shm``.

Why a pool: the first write to fresh shared pages faults each one in
(about 1 ms per MiB here, slower than sending the bytes through the
socket), while rewriting pages already faulted runs at memcpy speed.  So
the sender keeps its segments (size classes of powers of two) and reuses
them, but only once every receiver has let go:

* a receiver takes a shared ``flock`` on the segment (through a fresh open
  file description, ``/proc/self/fd/N``) *before* the message is
  acknowledged, and keeps it, and the mapping, for as long as the rebuilt
  object lives; the kernel drops it when the process dies;
* the sender counts a segment "in flight" until the message that carried
  it was answered (call), acknowledged (event) or confirmed ``TAKEN``
  (reply), and reuses a segment only when it is not in flight and an
  exclusive ``flock`` succeeds.

Idle segments are dropped after a few seconds, so memory returns after a
burst (and at once when the process runs out of descriptors or memory).
Each segment holds one descriptor, however long receivers take.  Arrays
made by :func:`empty` / :func:`zeros` live in a segment of their own from
the start: sending one passes only its descriptor.

Where ``os.memfd_create`` is missing (or ``LOCALNET_SHM=off``), large
buffers travel inline in the socket instead.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import resource
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger("localnet.shm")

AVAILABLE = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
DEFAULT_THRESHOLD = 1024 * 1024  # measured: below it the socket is as fast (see README)
_MIN_CLASS = 64 * 1024
_IDLE_SECONDS = 5.0
_IDLE_LIMIT = 1 << 30  # bytes of idle segments kept at most


def _idle_count() -> int:
    """Idle segments kept at most: each holds a descriptor, so an eighth of the limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else max(4, soft // 8)


def threshold_from_env() -> int | None:
    """The threshold ``LOCALNET_SHM`` selects: bytes, or None for "off"."""
    raw = os.environ.get("LOCALNET_SHM", "").strip().lower()
    if not AVAILABLE or raw in ("0", "off", "no", "false"):
        return None
    if raw in ("", "on", "yes", "true", "1"):
        return DEFAULT_THRESHOLD
    try:
        return max(1, int(raw))
    except ValueError:
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"LOCALNET_SHM={raw!r}: use off, on, or a threshold in bytes") from None


def _address(buffer: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class Segment:
    """One memfd, mapped read-write by the process that made it.

    It holds one descriptor: the mapping is made with libc's ``mmap``, since
    ``mmap.mmap`` keeps a duplicate of the descriptor it maps, and a sender
    holds a segment for as long as any receiver has not acknowledged it.
    """

    __slots__ = ("fd", "size", "address", "users", "idle_since", "pid")

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("localnet", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.address = _map(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.users = 0
        self.idle_since = 0.0
        self.pid = os.getpid()  # reused by this process only: a forked child shares the pages

    def write(self, data: memoryview) -> None:
        """Copy ``data`` (a contiguous byte view) to the start of the segment."""
        with memoryview((ctypes.c_char * data.nbytes).from_address(self.address)) as view, \
                view.cast("B") as target:
            target[:] = data

    def close(self) -> None:
        """Let go of it; receivers that still map it keep it alive."""
        address, self.address = self.address, 0
        if address:
            _libc.munmap(address, self.size)
        try:
            os.close(self.fd)
        except OSError:
            pass

    def unlocked(self) -> bool:
        """True when no receiver holds it (the exclusive flock succeeds)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, size: int) -> int:
    """The address of a fresh shared read-write mapping of ``fd``'s first ``size`` bytes."""
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(address)


class Pool:
    """Reusable segments by size class; thread-safe; one per process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[Segment]] = {}
        self._waiting: list[Segment] = []  # settled, but a receiver may still hold them
        self._trimmer: threading.Thread | None = None
        self.pid = os.getpid()
        self.created = 0
        self.reused = 0

    def acquire(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes``, reused when one is free."""
        size = max(_MIN_CLASS, 1 << (nbytes - 1).bit_length())
        with self._lock:
            self._recheck_waiting()
            free = self._free.get(size)
            while free:
                segment = free.pop()
                if segment.unlocked():
                    segment.users = 1
                    self.reused += 1
                    return segment
                self._waiting.append(segment)
        try:
            segment = Segment(size)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            self.trim(everything=True)  # idle segments hold descriptors and memory too
            segment = Segment(size)
        segment.users = 1
        self.created += 1
        return segment

    def release(self, segment: Segment) -> None:
        """One message that carried ``segment`` is settled."""
        with self._lock:
            segment.users -= 1
            if segment.users > 0:
                return
            mine = segment.pid == self.pid
            if mine:
                segment.idle_since = time.monotonic()
                self._free.setdefault(segment.size, []).append(segment)
                self._start_trimmer()
                crowded = sum(map(len, self._free.values())) > _idle_count()
        if not mine:
            segment.close()  # the parent's, inherited through fork(): never reuse it here
        elif crowded:
            self.trim()

    def abandon(self, segment: Segment) -> None:
        """A message whose fate is unknown carried it: never reuse it."""
        with self._lock:
            segment.users -= 1
            if segment.users > 0:
                return
        segment.close()

    def _recheck_waiting(self) -> None:
        still = []
        for segment in self._waiting:
            if segment.unlocked():
                self._free.setdefault(segment.size, []).append(segment)
            else:
                still.append(segment)
        self._waiting = still

    def _start_trimmer(self) -> None:
        if self._trimmer is None or not self._trimmer.is_alive():
            from ._signals import spawn_thread

            self._trimmer = spawn_thread(self._trim_loop, name="localnet-shm-trim")

    def _trim_loop(self) -> None:
        while True:
            time.sleep(1.0)  # a periodic sweep of idle segments, not synchronisation
            if not self.trim():
                return

    def trim(self, everything: bool = False) -> bool:
        """Drop segments idle for a while (all when ``everything``); True if some remain."""
        now = time.monotonic()
        dropped: list[Segment] = []
        most = _idle_count()
        with self._lock:
            kept_bytes = kept = 0
            for size in sorted(self._free):
                keep = []
                for segment in self._free[size]:
                    old = now - segment.idle_since > _IDLE_SECONDS
                    if everything or old or kept_bytes + size > _IDLE_LIMIT or kept >= most:
                        dropped.append(segment)
                    else:
                        keep.append(segment)
                        kept_bytes += size
                        kept += 1
                self._free[size] = keep
            waiting = self._waiting
            if everything:
                dropped.extend(waiting)
                self._waiting = []
            remaining = any(self._free.values()) or bool(self._waiting)
        for segment in dropped:
            segment.close()
        return remaining

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Forget the parent's idle segments (unmapped here; the parent keeps them).

        Reusing one would make parent and child write into the same pages.
        """
        inherited = [s for free in self._free.values() for s in free] + self._waiting
        self._lock = threading.Lock()
        self._free = {}
        self._waiting = []
        self._trimmer = None
        self.pid = os.getpid()
        for segment in inherited:
            segment.close()


POOL = Pool()

# Mappings made by empty()/zeros() -> (fd, base address, size).  The value
# must not refer to the mapping, or the weak key would never die.
_owned: weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int, int]] = weakref.WeakKeyDictionary()
_owned_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """In a forked child (see localnet._fork): fresh locks, none of the parent's idle segments."""
    global _owned_lock
    _owned_lock = threading.Lock()
    POOL._after_fork_in_child()


def owned_segment(raw: memoryview) -> tuple[mmap.mmap, int, int] | None:
    """``(mapping, fd, offset)`` when ``raw`` lies in an array from :func:`empty`."""
    obj: Any = raw.obj
    for _ in range(32):
        if isinstance(obj, mmap.mmap):
            break
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            return None
    else:
        return None
    with _owned_lock:
        record = _owned.get(obj)
    if record is None:
        return None
    fd, base, size = record
    start = _data_address(raw)
    if start is None:
        return None
    offset = start - base
    if not 0 <= offset <= size - raw.nbytes:
        return None
    return obj, fd, offset


def _data_address(raw: memoryview) -> int | None:
    interface = getattr(raw.obj, "__array_interface__", None)
    if interface is not None:
        return int(interface["data"][0])
    if not raw.readonly:
        return _address(raw)
    return None


def empty(shape: Any, dtype: Any = float, order: str = "C") -> Any:
    """A NumPy array that lives in shared memory from the start.

    Passing it to a call or an event sends only its descriptor, whatever its
    size.  Receivers see a read-only view of the same pages: what you write
    into it afterwards, they see too.

    Raises:
        ImportError: NumPy is not installed.
        RuntimeError: shared memory is not available on this platform.
    """
    import numpy as np

    if not AVAILABLE:
        raise RuntimeError("localnet.empty() needs memfd shared memory (Linux)")
    dt = np.dtype(dtype)
    shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for n in shape_t:
        count *= int(n)
    nbytes = max(1, count * dt.itemsize)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    fd = os.memfd_create("localnet", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    with _owned_lock:
        _owned[mm] = (fd, _address(mm), size)
    weakref.finalize(mm, os.close, fd)
    flat = np.frombuffer(mm, dtype=dt, count=count)
    return flat.reshape(shape_t, order=order)  # type: ignore[call-overload]


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> Any:
    """Like :func:`empty`, filled with zeros (fresh shared pages already are)."""
    return empty(shape, dtype, order)


def map_received(fd: int) -> mmap.mmap:
    """Map a received segment read-only and hold it (shared flock) while mapped.

    Takes ownership of ``fd``.
    """
    try:
        lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # Only a sender checking for reuse holds it exclusively, for an
            # instant; a sender that keeps it is its own problem: do without.
            logger.debug("a received segment is locked by its sender; mapping it unlocked")
        size = os.fstat(lock_fd).st_size
        mm = mmap.mmap(lock_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except BaseException:
        os.close(lock_fd)
        raise
    weakref.finalize(mm, os.close, lock_fd)
    return mm
