"""One write of an event for every subscriber of this host: the event ring.

A publisher writes each small event (an *item*, see
:func:`~localnet._serial.encode_item`) once into a ring of shared memory
(a ``memfd``), and queues the same entry ``(event, item, position, number)``
for each of its subscribers (:func:`~localnet._events.fan_out`).  The
publisher's courier (:mod:`localnet._courier`) then sends each subscriber,
for a run of such entries, one small RING frame naming the bytes
``[start, end)`` of the ring that hold them (:meth:`EventRing.chunks`),
instead of packing and sending the items themselves; the subscriber maps
the ring (its descriptor comes with the first RING frame, by SCM_RIGHTS)
and reads the items from there.  So the event is copied once whatever the
number of subscribers; what is left per subscriber is bookkeeping: the
entry appended to its queue (in C), taken by the courier and dropped when
acknowledged, and per *batch* one frame header.

Items back to back are a valid body of an items frame (see
:func:`~localnet._wire.pack_items`): the subscriber rebuilds the frame as
``ITEMS_HEAD + ring[start:end] + ITEMS_TAIL`` and handles it as if it had
come through the socket: same order, acknowledgements, counts and bounds.

Space: the ring holds ``size`` bytes; positions grow without end and
``position % size`` is the offset.  An item never wraps (the trigger skips
to the next lap instead), and a RING frame never spans two laps.  Space is
taken back up to the oldest entry any subscriber has not acknowledged
(:meth:`EventRing.reclaim`); the first 8 bytes of the segment hold that
point (``tail``), written *before* the space is reused.  A subscriber checks
``tail`` after copying its bytes: if it has passed ``start``, the copy may
be torn, and the channel is dropped (the publisher counts those events
failed).  That only happens to a subscriber the publisher has already let
go of.  When the ring is full (a stopped subscriber holds it), events go
the plain way, through each subscriber's socket, until it has room again.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _shm
from ._lanes import c_ring_fan_out, c_ring_frames, c_ring_run, take
from ._wire import (
    EVENT_BATCH,
    HEADER_SIZE,
    ITEMS_HEAD,
    ITEMS_PER_FRAME,
    ITEMS_TAIL,
    VERSION,
    Kind,
    ProtocolError,
    pack_header,
)

if TYPE_CHECKING:
    from ._events import Outbox

#: The bytes of one publisher's ring: about 40,000 small events in flight.
RING_BYTES = 2 * 1024 * 1024
RING_MARK = 0x52  # b"R": the body of a RING frame (an EVENT frame): mark, start, end
_SPAN = struct.Struct("<BQQ")
_TAIL = struct.Struct("<Q")
_HEAD = 64  # the segment's header: tail (u64), then padding
_HEAD_OF_EVENT = (VERSION, int(Kind.EVENT))
#: Triggers that go the plain way after a reclaim found no room, before the next try.
_PAUSE = 256

#: An entry that went into the ring: (event, item, position, number).
RingEntry = tuple[str, bytes, int, int]


def available() -> bool:
    """True where the ring can be made (memfd shared memory)."""
    return _shm.AVAILABLE


class EventRing:
    """One publisher's ring.

    ``state`` is ``[head, tail, number, pause, size, start]``: where the next
    item goes, before which space may be reused, the number of the last item,
    triggers left to go the plain way (-1: closed), the ring's bytes, and
    where they begin in the segment.  A write and its fan-out are one step
    for the other threads: in C (``_speedups.ring_fan_out``) without letting
    go of the GIL, in Python under ``lock``.  :meth:`reclaim` only raises
    ``tail``, to a point no write since it began has passed, so it runs
    beside writes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("localnet-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, _HEAD + size)
            self.map = mmap.mmap(self.fd, _HEAD + size)
        except BaseException:
            os.close(self.fd)
            raise
        self.state: list[int] = [0, 0, 0, 0, size, _HEAD]
        self.lock = threading.Lock()
        self._members: list[Outbox] = []
        self._member_ids: set[int] = set()

    @property
    def closed(self) -> bool:
        return self.state[3] < 0

    def join(self, outboxes: Any) -> None:
        """Note ``outboxes``: they may hold entries of this ring from now on."""
        with self.lock:
            for outbox in outboxes:
                if id(outbox) not in self._member_ids:
                    self._member_ids.add(id(outbox))
                    self._members.append(outbox)

    def fan_out(self, lanes: tuple[list[Any], ...], event: str, item: bytes) -> Any:
        """Write ``item`` and queue its entry on ``lanes`` (see ``_events.take``);
        False when the ring had no room even after :meth:`reclaim`."""
        if c_ring_fan_out is not None:  # (which writes nothing when no lane has room)
            rest = c_ring_fan_out(self.state, self.map, lanes, event, item)
            if rest is False and self._make_room(len(item)):
                rest = c_ring_fan_out(self.state, self.map, lanes, event, item)
            return rest
        if not any(len(lane[0]) < lane[1] for lane in lanes):  # nobody takes it: no write
            return take((event, item), lanes)
        with self.lock:
            entry = self._write(event, item)
            if entry is not None:
                return take(entry, lanes)
        if not self._make_room(len(item)):  # (which takes the lock)
            return False
        with self.lock:
            entry = self._write(event, item)
            return False if entry is None else take(entry, lanes)

    def _write(self, event: str, item: bytes) -> RingEntry | None:
        # (the Python twin of ring_fan_out's write, under the lock)
        head, tail, number, pause, size, start = self.state
        if pause:
            if pause > 0:
                self.state[3] = pause - 1
            return None
        n = len(item)
        pos, offset = head, head % size
        if offset + n > size:  # never across the end: on to the next lap
            pos += size - offset
            offset = 0
        if pos + n - tail > size:
            return None
        self.map[start + offset:start + offset + n] = item
        self.state[0], self.state[2] = pos + n, number + 1
        return (event, item, pos, number + 1)

    def _make_room(self, n: int) -> bool:
        """Reclaim space for an item of ``n`` bytes; else pause the ring for a while."""
        if self.state[3]:
            return False
        head, size = self.state[0], self.size
        offset = head % size
        needed = (head + (size - offset if offset + n > size else 0)) + n - size
        if self.reclaim() >= needed:
            return True
        self.state[3] = _PAUSE
        return False

    def reclaim(self) -> int:
        """Move ``tail`` up to the oldest entry any outbox still holds; the new tail."""
        with self.lock:
            low = self.state[0]  # (written beyond this meanwhile: held by nobody yet)
            members = []
            for outbox in self._members:
                if outbox.closed:
                    continue
                members.append(outbox)
                hold = outbox.ring_hold()
                if hold is not None and hold < low:
                    low = hold
            if len(members) < len(self._members):
                self._members = members
                self._member_ids = {id(outbox) for outbox in members}
            if low > self.state[1] and not self.closed:
                _TAIL.pack_into(self.map, 0, low)  # before any of that space is written again
                self.state[1] = low
            return self.state[1]

    def chunks(self, entries: list[Any], first: int, fd: int | None, low: int = 0,
               high: int | None = None) -> list[tuple[bytes, list[int] | None, int | None]]:
        """The RING frames for events ``first``, ... (consecutive entries of this
        ring, ``entries[low:high]``, see :func:`is_ring_run`), a header and 17
        bytes for up to ``ITEMS_PER_FRAME`` events, as chunks for the courier
        (:mod:`localnet._courier`); ``fd``, a descriptor of the ring
        (:meth:`dup`), goes with the first frame and is closed once sent."""
        if c_ring_frames is not None:  # the same frames, made in C
            data = c_ring_frames(entries, low, len(entries) if high is None else high,
                                 self.size, first, 0 if fd is None else 1, ITEMS_PER_FRAME,
                                 EVENT_BATCH, _HEAD_OF_EVENT, RING_MARK)
            if fd is None:
                return [(data, None, None)]
            one = HEADER_SIZE + _SPAN.size
            return [(data[:one], [fd], fd)] + ([(data[one:], None, None)] if len(data) > one
                                                else [])
        spans = [(first + end_index - low - 1, pack_span(start, end))
                 for _, end_index, start, end in ring_runs(entries, self.size, low, high)]
        chunks: list[tuple[bytes, list[int] | None, int | None]] = []
        if fd is not None:
            ident, span = spans.pop(0)
            chunks.append((pack_header(Kind.EVENT, ident, _SPAN.size, 1) + span, [fd], fd))
        if spans:
            chunks.append((b"".join([pack_header(Kind.EVENT, ident, _SPAN.size) + span
                                     for ident, span in spans]), None, None))
        return chunks

    def dup(self) -> int:
        """A descriptor of the segment, for one subscriber (the caller closes it)."""
        with self.lock:
            if self.closed:
                raise OSError("the event ring was closed")
            return os.dup(self.fd)

    def close(self) -> None:
        """Let go of the segment (a subscriber that mapped it keeps its mapping)."""
        with self.lock:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.state[3] = -1
            self._members = []
            self.map.close()
            os.close(self.fd)

    def after_fork_in_child(self) -> None:
        """Close this process's copy (its lock may be held by a thread of the parent)."""
        self._close()


def descriptors() -> int:
    """How many descriptors of this process are event rings (for resource checks)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:localnet-ring")
        except OSError:  # (closed meanwhile)
            pass
    return count


def ring_runs(entries: list[Any], size: int, low: int = 0,
              n: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Split entries of one ring, consecutive in it (``entries[low:n]``), into
    RING frames: ``(first index, end index, start, end)`` each.

    A frame holds at most ``ITEMS_PER_FRAME`` events and ``EVENT_BATCH`` bytes
    of one lap; the split costs a few steps a frame, not one per event.
    """
    if n is None:
        n = len(entries)
    while low < n:
        high = min(n, low + ITEMS_PER_FRAME)
        start = entries[low][2]
        while True:
            last = entries[high - 1]
            end = last[2] + len(last[1])
            if high - low == 1 or (end - start <= EVENT_BATCH
                                   and (end - 1) // size == start // size):
                break
            high = low + (high - low) // 2
        yield low, high, start, end
        low = high


def is_ring_run(entries: list[Any]) -> bool:
    """True when ``entries`` are only entries of the ring, numbered one after the
    other (so their items lie back to back in it, but for the laps' ends)."""
    if c_ring_run is not None:
        return c_ring_run(entries)
    first = entries[0][-1] if entries and len(entries[0]) == 4 else None
    return first is not None and all(
        len(entry) == 4 and entry[3] == first + i for i, entry in enumerate(entries))


def pack_span(start: int, end: int) -> bytes:
    """The body of a RING frame."""
    return _SPAN.pack(RING_MARK, start, end)


class RingReader:
    """A subscriber's view of one publisher's ring (one per event channel)."""

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None
        self._size = 0

    def items_frame(self, frame: tuple[int, int, Any, list[int]]
                    ) -> tuple[int, int, bytes, list[int]]:
        """The items frame a RING frame stands for (its descriptor, on the first one,
        is the ring itself)."""
        kind, ident, body, fds = frame
        if fds:
            self._attach(fds)
        if self._map is None:
            raise ProtocolError("a RING frame before the ring's descriptor")
        if len(body) != _SPAN.size:
            raise ProtocolError(f"a RING frame of {len(body)} bytes")
        _, start, end = _SPAN.unpack(body)
        size = self._size
        if not start < end <= start + size or (end - 1) // size != start // size:
            raise ProtocolError(f"a RING frame for bytes {start}..{end} of a {size}-byte ring")
        offset = _HEAD + start % size
        items = self._map[offset:offset + end - start]
        (tail,) = _TAIL.unpack_from(self._map, 0)
        if tail > start:
            raise ProtocolError("the publisher reused its event ring before this subscriber "
                                "read it (it had let go of this channel)")
        return kind, ident, b"".join((ITEMS_HEAD, items, ITEMS_TAIL)), []

    def _attach(self, fds: list[int]) -> None:
        try:
            if len(fds) != 1 or self._map is not None:
                raise ProtocolError("a RING frame with an unexpected descriptor")
            size = os.fstat(fds[0]).st_size - _HEAD
            if size <= 0:
                raise ProtocolError("an event ring of no size")
            self._map = mmap.mmap(fds[0], _HEAD + size, prot=mmap.PROT_READ)
            self._size = size
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def translate(batch: list[Any], reader: RingReader) -> None:
    """Replace the RING frames of ``batch`` by the items frames they stand for."""
    for i, frame in enumerate(batch):
        body = frame[2]
        if body and body[0] == RING_MARK:
            batch[i] = reader.items_frame(frame)

