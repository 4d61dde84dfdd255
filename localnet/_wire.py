"""Framing: how every localnet socket carries messages.

Every message on every localnet socket (peer to peer, peer to registry) is
one frame: a fixed 16-byte header followed by ``length`` bytes of body.
File descriptors (shared-memory segments) ride along with the first bytes of
their frame as SCM_RIGHTS ancillary data.

====== ====== ===========================================================
offset  size   field
====== ====== ===========================================================
0       1      protocol version (``VERSION``); any other value closes the
               connection
1       1      message kind (:class:`Kind`)
2       2      number of file descriptors sent with this frame
4       4      body length in bytes, at most the reader's ``max_frame``
8       8      id: call id, event sequence number or request id
====== ====== ===========================================================

All integers are little-endian and unsigned.  A connection starts with one
``HELLO`` frame from the connecting side (its identity and the channel's
role); after that the kinds allowed depend on the role:

================ ========================= ======================================
kind             direction                 body
================ ========================= ======================================
HELLO            connecting side → server  JSON object: role, name, pid, ...
CALL             caller → callee           payload of (connection, args, kwargs)
TIMED_CALL       caller → callee           a call with a deadline: the deadline
                                           (f64, seconds of ``time.monotonic()``,
                                           i.e. CLOCK_MONOTONIC, which every
                                           process of the machine shares), then
                                           the payload of a CALL.  A callee that
                                           reads it after its deadline does not
                                           run it; it answers ERROR (Timeout).
REPLY            callee → caller           payload of the result
ERROR            callee → caller           payload of (exception, traceback text)
EVENT            publisher → subscriber    payload of (event, args, kwargs), or
                                           a batch of them (see
                                           :func:`pack_items`, :func:`pack_batch`);
                                           id = the last event's sequence (each
                                           channel numbers its events 1, 2, ...)
ACK              subscriber → publisher    id = last sequence handled; body empty
                                           (the usual case), or the events up to id
                                           that could not be handled, as ranges
                                           ``[first, last]`` (two u64 each, in
                                           order, at most ``ACK_RANGES``; see
                                           :func:`pack_ack`)
REQUEST          peer → registry           pickled (operation, arguments)
RESPONSE         registry → peer           pickled (ok, value)
PUSH             registry → peer           pickled list of changes
PUSH_ACK         peer → registry           empty; id = the PUSH's id
TAKEN            caller → callee           empty; id = a REPLY whose shared memory
                                           the caller has mapped (see _shm)
================ ========================= ======================================

A "payload" is what :mod:`localnet._serial` produces.  The reader checks the
version, the kind and the declared length before allocating anything, grows
its buffer only as bytes actually arrive, and tells a clean end of stream
(:class:`EOFError` between frames) from a broken one (:class:`ProtocolError`).
"""

from __future__ import annotations

import array
import json as _json
import os
import select
import socket
import struct
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from enum import IntEnum
from itertools import accumulate, repeat
from operator import add as _add
from typing import Union

from .errors import ConnectionLost

# The C side of small frames (localnet._fastcall), None where it was not
# built; the Python framing below then does it all.
try:
    from . import _fastcall
except ImportError:  # built without a C compiler
    _fastcall = None  # type: ignore[assignment]
_recv_frame = None if _fastcall is None else _fastcall.recv_frame
_send_small = None if _fastcall is None else _fastcall.send_frame

Buffer = Union[bytes, bytearray, memoryview]
#: What a reader returns: (kind, ident, body, descriptors).
Frame = tuple[int, int, Union[bytes, bytearray], list[int]]

VERSION = 1
HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size
_pack = HEADER.pack
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
MAX_FDS = 64  # per frame; more buffers than this travel in several segments' stead inline

#: A publisher packs consecutive small events to one subscriber into one EVENT
#: frame of up to this many bytes (see :func:`pack_batch`); a subscriber accepts
#: EVENT frames this large whatever its max_frame.
EVENT_BATCH = 64 * 1024
#: At most this many ranges of failed events to an ACK frame (1 KiB of body).
ACK_RANGES = 64
_RANGE = struct.Struct("<QQ")
#: At most this many events to a list frame (:func:`pack_items`).  A subscriber
#: rebuilds a frame's events at once and frees them once handled: about two
#: new containers an event, which stays under the collector's first threshold
#: (700 by default), so a burst does not set off garbage collections.
ITEMS_PER_FRAME = 256
#: The first byte of a batch body (a plain payload starts with 0x80, one in
#: shared memory with ``b"O"``): a batch of whole pickles, or a list of items.
BATCH_MARK = 0x42  # b"B"
ITEMS_MARK = 0x4C  # b"L"
_BATCH_COUNT = struct.Struct("<BI")
#: An event *item* is a protocol-3 pickle without its PROTO opcode and STOP
#: (see _serial.dumps_event); items back to back between these make one list.
ITEMS_HEAD = b"L\x80\x03("  # mark, PROTO 3, MARK
ITEMS_TAIL = b"l."  # LIST, STOP
ITEM_HEAD = b"\x80\x03"  # an item sent alone: PROTO 3, the item, STOP
ITEM_TAIL = b"."
_READ_CHUNK = 256 * 1024
_SMALL_SEND = 64 * 1024
_FD_KIND_ANY = -1
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
# plain ints: the IntFlag/IntEnum versions cost a Python-level call per use
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


class Kind(IntEnum):
    """Message kinds; see the module docstring for their bodies."""

    HELLO = 1
    CALL = 2
    REPLY = 3
    ERROR = 4
    EVENT = 5
    ACK = 6
    REQUEST = 7
    RESPONSE = 8
    PUSH = 9
    PUSH_ACK = 10
    TAKEN = 11
    TIMED_CALL = 12


_KINDS = frozenset(int(k) for k in Kind)
# Only these carry descriptors (shared memory); any other kind declaring some
# is refused, and what arrived with it is closed.
_FD_KINDS = frozenset({int(Kind.CALL), int(Kind.TIMED_CALL), int(Kind.REPLY),
                       int(Kind.EVENT)})
_EVENT = int(Kind.EVENT)


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors that arrived with a frame nobody will use."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ProtocolError(ConnectionLost):
    """The other side sent something that is not a valid frame."""


class CutShort(ProtocolError):
    """The connection ended inside a frame (the sender gave up, or died, while sending)."""


class FrameTooLarge(ProtocolError):
    """A frame declared a body longer than the reader's ``max_frame``."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the {limit}-byte limit")
        self.length = length
        self.limit = limit


def pack_header(kind: int, ident: int, length: int, nfds: int = 0) -> bytes:
    """Return the 16-byte header of a frame."""
    return HEADER.pack(VERSION, kind, nfds, length, ident)


def _runs(sizes: list[int], each: int, room: int) -> Iterator[tuple[int, int, int]]:
    """Split consecutive bodies into frames: ``(start, end, nbytes)`` per frame.

    A body takes its size plus ``each`` bytes (its entry in a table); a
    frame holds at most ``room`` such bytes, ``nbytes`` of them.  A body too
    large for that makes a frame of its own, with ``nbytes`` 0.
    """
    ends = list(accumulate(map(_add, sizes, repeat(each))) if each else accumulate(sizes))
    start, base, n = 0, 0, len(sizes)
    while start < n:
        end = bisect_right(ends, base + room, start)
        if end == start:
            end = start + 1
            yield start, end, 0
        else:
            yield start, end, ends[end - 1] - base
        base, start = ends[end - 1], end


def pack_items(items: list[bytes], first: int) -> list[bytes]:
    """Headers and bodies of the EVENT frames carrying event ``items``, to be joined.

    Items (``_serial.dumps_event``) are protocol-3 pickles, whose memo
    references carry explicit indices: back to back inside one list they
    still each refer to their own objects, so a frame's body::

        b"L", PROTO 3, MARK, the items, LIST, STOP

    is rebuilt by one ``pickle.loads`` (after the mark) as the list of the
    events.  Consecutive items share a frame of up to ``EVENT_BATCH`` bytes
    and ``ITEMS_PER_FRAME`` items;
    an item too large for that travels alone as a plain payload.  The
    items are events ``first``, ``first + 1``, ...; each frame's id is the
    sequence of its last event.
    """
    room = EVENT_BATCH - len(ITEMS_HEAD) - len(ITEMS_TAIL)
    parts: list[bytes] = []
    for low in range(0, len(items), ITEMS_PER_FRAME):
        chunk = items[low:low + ITEMS_PER_FRAME]
        body = b"".join(chunk)
        if len(body) <= room:  # the common case
            parts += (_pack(VERSION, _EVENT, 0, len(ITEMS_HEAD) + len(body) + len(ITEMS_TAIL),
                            first + low + len(chunk) - 1), ITEMS_HEAD, body, ITEMS_TAIL)
            continue
        sizes = list(map(len, chunk))
        for start, end, nbytes in _runs(sizes, 0, room):
            if not nbytes:  # alone
                parts += (_pack(VERSION, _EVENT, 0, len(ITEM_HEAD) + len(chunk[start])
                                + len(ITEM_TAIL), first + low + start),
                          ITEM_HEAD, chunk[start], ITEM_TAIL)
                continue
            parts += (_pack(VERSION, _EVENT, 0, len(ITEMS_HEAD) + nbytes + len(ITEMS_TAIL),
                            first + low + end - 1), ITEMS_HEAD)
            parts += chunk[start:end]
            parts.append(ITEMS_TAIL)
    return parts


def pack_batch(bodies: list[bytes], first: int) -> list[bytes]:
    """Headers and bodies of the EVENT frames carrying ``bodies``, to be joined.

    ``bodies`` are plain payloads (whole pickles, as cloudpickle makes them
    for what is not an item) of events ``first``, ``first + 1``, ....
    Consecutive bodies share a frame of up to ``EVENT_BATCH`` bytes, whose
    body is::

        b"B", count n (u32), n sizes (u32 each), the n pickles back to back

    Each pickle keeps its own memo and is rebuilt on its own (read as one
    stream, one event's memo references would point into the previous one).
    A body too large to share a frame travels alone, as a plain payload.
    Each frame's id is the sequence of its last event.
    """
    sizes = list(map(len, bodies))
    parts: list[bytes] = []
    for start, end, nbytes in _runs(sizes, 4, EVENT_BATCH - _BATCH_COUNT.size):
        if not nbytes:  # alone, as a plain payload
            parts += (_pack(VERSION, _EVENT, 0, sizes[start], first + start), bodies[start])
            continue
        count = end - start
        parts.append(_pack(VERSION, _EVENT, 0, _BATCH_COUNT.size + nbytes, first + end - 1))
        parts.append(struct.pack(f"<BI{count}I", BATCH_MARK, count, *sizes[start:end]))
        parts += bodies[start:end]
    return parts


def pack_ack(last: int, failed: list[list[int]]) -> bytes:
    """The ACK frames for events up to ``last``, of which ``failed`` were not handled.

    ``failed`` holds ``[first, last]`` ranges of sequences, in any order,
    overlapping or not.  More ranges than one frame carries make several
    frames, each acknowledging up to the end of its last range (an
    acknowledgement is cumulative), the final one up to ``last``.
    """
    ranges: list[list[int]] = []
    for low, high in sorted(failed):
        high = min(high, last)
        if low > high or low < 1:
            continue
        if ranges and low <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], high)
        else:
            ranges.append([low, high])
    frames = []
    for start in range(0, len(ranges), ACK_RANGES):
        chunk = ranges[start:start + ACK_RANGES]
        ident = last if start + ACK_RANGES >= len(ranges) else chunk[-1][1]
        body = b"".join(_RANGE.pack(low, high) for low, high in chunk)
        frames.append(_pack(VERSION, Kind.ACK, 0, len(body), ident) + body)
    return b"".join(frames) or _pack(VERSION, Kind.ACK, 0, 0, last)


def unpack_ack(body: Buffer, after: int, last: int) -> list[tuple[int, int]]:
    """The ranges of failed events in an ACK body, each within ``after + 1 .. last``.

    Raises:
        ProtocolError: the body is not such ranges, in order and apart.
    """
    if len(body) % _RANGE.size:
        raise ProtocolError(f"an acknowledgement of {len(body)} bytes")
    ranges = list(_RANGE.iter_unpack(body))
    for low, high in ranges:
        if not after < low <= high <= last:
            raise ProtocolError(f"an acknowledgement up to event {last} names events "
                                f"{low}..{high} as failed")
        after = high
    return ranges


def unpack_batch(body: Buffer) -> tuple[int, tuple[int, ...]]:
    """Where the first pickle of a batch body starts, and the pickles' sizes.

    Raises:
        ValueError: the body is not a batch its table describes exactly.
    """
    if len(body) < _BATCH_COUNT.size:
        raise ValueError("a batch shorter than its count")
    mark, count = _BATCH_COUNT.unpack_from(body)
    first = _BATCH_COUNT.size + 4 * count
    if mark != BATCH_MARK or first > len(body):
        raise ValueError(f"a batch of {count} events cannot fit in {len(body)} bytes")
    sizes: tuple[int, ...] = struct.unpack_from(f"<{count}I", body, _BATCH_COUNT.size)
    if first + sum(sizes) != len(body):
        raise ValueError(f"a batch's sizes add up to {first + sum(sizes)} bytes, "
                         f"not {len(body)}")
    return first, sizes


def send_frame(
    sock: socket.socket,
    kind: int,
    ident: int,
    body: Buffer = b"",
    fds: Sequence[int] = (),
) -> None:
    """Send one frame; the caller holds the socket's send lock.

    Raises OSError when the socket is broken; callers translate it.
    """
    length = len(body)
    if not fds and length <= _SMALL_SEND:
        if _send_small is not None:
            _send_small(sock.fileno(), kind, ident, body)
        else:
            sock.sendall(_pack(VERSION, kind, 0, length, ident) + body)
        return
    if isinstance(body, memoryview):
        length = body.nbytes
    header = _pack(VERSION, kind, len(fds), length, ident)
    if fds:
        ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
        sent = sock.sendmsg([header, body], ancillary)
    else:
        sent = sock.sendmsg([header, body])
    _send_rest(sock, header, body, sent)


class SendTimeout(TimeoutError):
    """A send gave up at its deadline; ``sent`` bytes of the frame had left.

    With ``sent`` 0 the connection is as it was; otherwise it carries the
    start of a frame and nothing else can follow on it.
    """

    def __init__(self, sent: int) -> None:
        super().__init__(f"timed out sending a frame ({sent} bytes sent)")
        self.sent = sent


#: A TIMED_CALL's header and deadline, packed at once.
_TIMED_HEAD = struct.Struct("<BBHIQd")
DEADLINE_SIZE = 8
_DEADLINE = struct.Struct("<d")
_TIMED_CALL = int(Kind.TIMED_CALL)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)


def send_call_by(sock: socket.socket, ident: int, body: Buffer, fds: Sequence[int],
                 deadline: float) -> None:
    """Send a TIMED_CALL frame, giving up at ``deadline`` (``time.monotonic()``).

    The socket stays blocking (a call without a timeout blocks on it);
    each send here is made with MSG_DONTWAIT, and a full socket buffer is
    waited on with poll() until the deadline.

    Raises:
        SendTimeout: the deadline passed first (``sent`` says how far it got).
        OSError: the socket is broken.
    """
    length = len(body) if not isinstance(body, memoryview) else body.nbytes
    head = _TIMED_HEAD.pack(VERSION, _TIMED_CALL, len(fds), DEADLINE_SIZE + length, ident,
                            deadline)
    if not fds and length <= _SMALL_SEND:
        data = head + body
        try:
            sent = sock.send(data, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            send_by(sock, [memoryview(data)[sent:]], (), deadline, sent)
    else:
        send_by(sock, [head, body], fds, deadline)


def send_frame_by(sock: socket.socket, kind: int, ident: int, body: Buffer = b"",
                  deadline: float | None = None) -> None:
    """:func:`send_frame` without descriptors, giving up at ``deadline``.

    Raises SendTimeout or OSError, as :func:`send_call_by` does.
    """
    if deadline is None:
        send_frame(sock, kind, ident, body)
        return
    length = len(body) if not isinstance(body, memoryview) else body.nbytes
    send_by(sock, [_pack(VERSION, kind, 0, length, ident), body], (), deadline)


def send_by(sock: socket.socket, parts: list[Buffer], fds: Sequence[int],
            deadline: float, sent: int = 0) -> None:
    """Send ``parts`` back to back (``fds`` with the first bytes) by ``deadline``.

    ``sent``: bytes of the frame that already left (for SendTimeout).
    """
    views = [memoryview(part).cast("B") for part in parts]
    total = sent + sum(len(view) for view in views)
    ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    poll: select.poll | None = None
    if sent:
        poll = _wait_writable(sock, deadline, sent)
    while True:
        try:
            if len(views) == 1 and not ancillary:
                n = sock.send(views[0], _MSG_DONTWAIT)
            else:
                n = sock.sendmsg(views, ancillary, _MSG_DONTWAIT)
        except BlockingIOError:
            n = 0
        if n:
            ancillary = []  # the descriptors went with the first bytes
            sent += n
            if sent >= total:
                return
            while n >= len(views[0]):  # drop what left; keep the rest of a part
                n -= len(views.pop(0))
            views[0] = views[0][n:]
        poll = _wait_writable(sock, deadline, sent, poll)


def _wait_writable(sock: socket.socket, deadline: float, sent: int,
                   poll: select.poll | None = None) -> select.poll:
    """Wait until ``sock`` has room; raise SendTimeout(sent) at ``deadline``."""
    if poll is None:
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLOUT)
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poll.poll(remaining * 1000.0):
        raise SendTimeout(sent)
    return poll


def take_deadline(body: bytearray) -> float:
    """Remove the deadline from the front of a TIMED_CALL body and return it.

    Raises ProtocolError when the body is too short to hold one.
    """
    if len(body) < DEADLINE_SIZE:
        raise ProtocolError(f"a TIMED_CALL of {len(body)} bytes has no deadline")
    deadline: float = _DEADLINE.unpack_from(body)[0]
    del body[:DEADLINE_SIZE]  # (cheap: a bytearray drops its head in place)
    return deadline


def send_raw_with_fds(sock: socket.socket, data: Buffer, fds: Sequence[int]) -> None:
    """Send one complete frame (header included) with its descriptors."""
    ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))]
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _send_rest(sock: socket.socket, header: bytes, body: Buffer, sent: int) -> None:
    total = HEADER_SIZE + len(memoryview(body).cast("B"))
    if sent >= total:
        return
    if sent < HEADER_SIZE:
        sock.sendall(header[sent:])
        sent = HEADER_SIZE
    sock.sendall(memoryview(body).cast("B")[sent - HEADER_SIZE :])


class FrameReader:
    """Reads frames from one socket, through one buffer, by one thread at a time.

    ``read()`` returns ``(kind, ident, body, fds)``; ``body`` is a
    ``bytearray`` of its own (a copy for small frames), so it stays valid
    after the next read.  Descriptors that arrive are owned by
    the caller of the ``read()`` that returns them; descriptors still queued
    when the reader is closed are closed.
    """

    __slots__ = ("_sock", "_buf", "_view", "_start", "_end", "_fds", "max_frame", "_poll",
                 "_with_fds", "_large")

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME,
                 with_fds: bool = True) -> None:
        self._sock = sock
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._fds: deque[int] = deque()
        self.max_frame = max_frame
        self._poll: select.poll | None = None
        self._with_fds = with_fds
        # A body larger than the buffer, while it arrives: [kind, ident, nfds,
        # length, body, bytes got], or [] once a read was interrupted inside it.
        self._large: list[object] | None = None

    def drain(self) -> list[Frame]:
        """Every whole frame already buffered, without reading the socket.

        Checks each header as :meth:`read` does (raises ProtocolError).
        """
        frames: list[Frame] = []
        buf, start, end = self._buf, self._start, self._end
        unpack = HEADER.unpack_from
        while end - start >= HEADER_SIZE:
            version, kind, nfds, length, ident = unpack(buf, start)
            if version != VERSION or kind not in _KINDS or length > self.max_frame \
                    or nfds > MAX_FDS:
                self._start = start
                self._reject(version, kind, length, nfds)
            total = HEADER_SIZE + length
            if end - start < total:
                break
            frames.append((kind, ident, buf[start + HEADER_SIZE: start + total],
                           self._take_fds(nfds, kind) if nfds else []))
            start += total
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start
        return frames

    @property
    def empty(self) -> bool:
        """Nothing buffered: the next frame starts with the next receive."""
        return self._start == self._end and self._large is None

    @property
    def buffer(self) -> bytearray:
        """Where the receives land (``_fastcall`` receives into it while :attr:`empty`)."""
        return self._buf

    def read_on(self, got: tuple[int, int, list[int], None]) -> Frame:
        """Take the raw receive ``_fastcall`` handed back, ``(0, nbytes, fds, None)``
        for ``buffer[:nbytes]``, and read the next frame on from it (see :meth:`read`)."""
        end = got[1]
        if end < 0:
            raise ProtocolError("too many descriptors in one message")
        if got[2]:
            self._fds.extend(got[2])
        if not end:
            raise EOFError("connection closed")
        self._start = 0
        self._end = end
        return self.read()

    def has_frame(self) -> bool:
        """True when a whole frame is already buffered (the next read will not block)."""
        avail = self._end - self._start
        if avail < HEADER_SIZE:
            return False
        length: int = HEADER.unpack_from(self._buf, self._start)[3]
        return avail >= HEADER_SIZE + length

    def read(self, timeout: float | None = None) -> tuple[int, int, bytes | bytearray, list[int]]:
        """Read the next frame.

        Raises:
            EOFError: the other side closed the connection between frames.
            ProtocolError: a malformed or oversized frame, or EOF inside one.
            socket.timeout: nothing complete arrived within ``timeout``
                (the partial frame stays buffered: the next read goes on with it).
            OSError: the socket failed.

        Any other exception inside a large frame (KeyboardInterrupt) may come
        between a receive and its bookkeeping: the reader then refuses to
        read on (ProtocolError) instead of misreading the rest of the frame.
        """
        start, end = self._start, self._end
        if start == end and timeout is None and self._large is None:
            # The common case: nothing buffered; one system call, no helpers.
            if _recv_frame is not None and self._with_fds:
                got = _recv_frame(self._sock.fileno(), self._buf, self.max_frame)
                return got if got[0] else self.read_on(got)
            if self._with_fds:
                end, ancdata, flags, _ = self._sock.recvmsg_into([self._view], _CMSG_SPACE)
                if ancdata or flags & _MSG_CTRUNC:
                    self._take_ancillary(ancdata, flags)
            else:
                end = self._sock.recv_into(self._view)
            if not end:
                raise EOFError("connection closed")
            start = self._start = 0
            self._end = end
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._large is not None:
            return self._read_large(deadline)
        if end - start < HEADER_SIZE:
            self._fill(HEADER_SIZE, deadline)
            start, end = self._start, self._end
        version, kind, nfds, length, ident = HEADER.unpack_from(self._buf, start)
        if version != VERSION or kind not in _KINDS or length > self.max_frame \
                or nfds > MAX_FDS:
            self._reject(version, kind, length, nfds)
        total = HEADER_SIZE + length
        if end - start < total:
            if total > len(self._buf):
                have = end - start - HEADER_SIZE
                body = bytearray(min(length, max(have, _READ_CHUNK)))
                body[:have] = self._view[start + HEADER_SIZE: end]
                self._start = self._end = 0
                self._large = [kind, ident, nfds, length, body, have]
                del body
                return self._read_large(deadline)
            self._fill(total, deadline)
            start, end = self._start, self._end
        body = self._buf[start + HEADER_SIZE: start + total]
        start += total
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start
        return kind, ident, body, self._take_fds(nfds, kind) if nfds else []

    def resume(self, kind: int, ident: int, nfds: int, length: int, prefix: bytes,
               fds: list[int]) -> None:
        """Take over a large frame whose header and first bytes were read elsewhere
        (localnet._fastcall), with the descriptors that came with them; the
        next :meth:`read` returns it."""
        body = bytearray(min(length, max(len(prefix), _READ_CHUNK)))
        body[:len(prefix)] = prefix
        self._fds.extend(fds)
        self._large = [kind, ident, nfds, length, body, len(prefix)]

    def reject(self, version: int, kind: int, nfds: int, length: int) -> None:
        """Raise the ProtocolError (or FrameTooLarge) a header read elsewhere earns."""
        self._reject(version, kind, length, nfds)

    def _reject(self, version: int, kind: int, length: int, nfds: int) -> None:
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version} (expected {VERSION})")
        if kind not in _KINDS:
            raise ProtocolError(f"unknown message kind {kind}")
        if length > self.max_frame:
            raise FrameTooLarge(length, self.max_frame)
        raise ProtocolError(f"frame declares {nfds} descriptors (at most {MAX_FDS})")

    def _take_fds(self, nfds: int, kind: int = _FD_KIND_ANY) -> list[int]:
        if not nfds:
            return []
        if len(self._fds) < nfds:
            raise ProtocolError(f"frame declares {nfds} descriptors but {len(self._fds)} arrived")
        fds = [self._fds.popleft() for _ in range(nfds)]
        if kind not in _FD_KINDS and kind != _FD_KIND_ANY:
            close_fds(fds)
            raise ProtocolError(f"a {Kind(kind).name} frame cannot carry descriptors")
        return fds

    def _fill(self, need: int, deadline: float | None) -> None:
        """Read until at least ``need`` bytes are buffered past ``_start``."""
        if self._start and len(self._buf) - self._start < need:
            pending = self._end - self._start
            self._buf[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        while self._end - self._start < need:
            n = self._recv_into(self._view[self._end :], deadline)
            if n == 0:
                if self._end == self._start:
                    raise EOFError("connection closed")
                raise CutShort("connection closed in the middle of a frame")
            self._end += n

    def _read_large(self, deadline: float | None) -> Frame:
        """Go on reading the large body begun in ``_large``, growing it as bytes arrive."""
        large = self._large
        assert large is not None
        if not large:
            raise ProtocolError("an earlier read was interrupted inside a frame")
        kind, ident, nfds, length, body, got = large
        assert isinstance(body, bytearray) and isinstance(length, int) and isinstance(got, int)
        try:
            while got < length:
                if got == len(body):  # double, as the bytes actually arrive
                    body.extend(bytes(min(length - got, len(body))))
                # Both views released on the way out, even by an exception: a
                # traceback that keeps _recv_into's frame then holds no export
                # of the body, which can be freed.
                with memoryview(body) as view, view[got:] as part:
                    n = self._recv_into(part, deadline)
                if n == 0:
                    raise CutShort("connection closed in the middle of a frame")
                got += n
                large[5] = got
        except TimeoutError:
            body = bytearray()  # not kept alive by the traceback: _large holds it
            raise
        except BaseException:
            large.clear()  # bytes may be lost: refuse to go on; free the body
            body = bytearray()
            raise
        self._large = None
        assert isinstance(kind, int) and isinstance(ident, int) and isinstance(nfds, int)
        return kind, ident, body, self._take_fds(nfds, kind)

    def _recv_into(self, view: memoryview, deadline: float | None) -> int:
        if deadline is not None:
            self._wait_readable(deadline - time.monotonic())
        if not self._with_fds:
            return self._sock.recv_into(view)
        n, ancdata, flags, _ = self._sock.recvmsg_into([view], _CMSG_SPACE)
        if ancdata or flags & _MSG_CTRUNC:
            self._take_ancillary(ancdata, flags)
        return n

    def _take_ancillary(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        for level, ctype, data in ancdata:
            if level == _SOL_SOCKET and ctype == _SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                self._fds.extend(fds)
        if flags & _MSG_CTRUNC:
            raise ProtocolError("too many descriptors in one message")

    def _wait_readable(self, timeout: float) -> None:
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._sock.fileno(), select.POLLIN)
        if not self._poll.poll(max(0.0, timeout) * 1000.0):
            raise TimeoutError("timed out waiting for a frame")

    def drop_partial(self) -> None:
        """Give up a half-read body for good (its memory is freed; reading on is refused)."""
        if self._large:
            self._large.clear()

    def close(self) -> None:
        """Close descriptors received but never handed out; drop a half-read body."""
        self.drop_partial()
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass


def encode_control(obj: object) -> bytes:
    """Encode a control message (HELLO, registry traffic) as compact JSON.

    Control messages never need pickle, so the registry never unpickles.
    """
    return _json.dumps(obj, separators=(",", ":")).encode()


def decode_control(body: Buffer) -> object:
    """Decode a control message; raises ProtocolError when it is not JSON."""
    try:
        obj = _json.loads(bytes(body))
        # JSON escapes can smuggle lone surrogates, which no socket path or
        # log line can carry: refuse them here, once, for every reader.
        _json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed control message: {exc}") from exc
    return obj
