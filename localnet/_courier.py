"""The network side of a publisher's outboxes: one thread for all of them.

Each subscriber's :class:`~localnet._events.Outbox` queues its events; the
*courier* is the one thread of the publisher that sends what has queued up
on every outbox's socket and reads every subscriber's acknowledgements.  A
burst of events for 16 subscribers wakes one thread once, not 32 threads
(a writer and an acknowledgement reader each) once every batch: what the
publisher spends per event no longer grows with the thread switches of its
subscribers' channels.

The sockets are non-blocking.  What a subscriber's socket does not take at
once waits in that channel's pending chunks, and the courier goes on with
the others; it sends the rest when the socket is writable again (the
selector tells it).  A stopped subscriber therefore holds up nobody but
itself, and an outbox takes no more of its queue while its channel has
chunks pending.

Waking: when the courier has nothing to do it marks every outbox's lane
idle (``lane[2]``), then looks at their queues once more, then waits on its
selector.  A trigger appends first and reads the flag after (see
:func:`~localnet._lanes.take`), and :meth:`Courier.wake` writes one byte
to the courier's pipe only while it sleeps: so an event is never left
unsent, and a burst of triggers costs one wake-up.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
from collections import deque
from itertools import groupby
from typing import TYPE_CHECKING, Any

from ._events import CHUNKS, ITEM, PAYLOAD, kind_of
from ._ring import is_ring_run
from ._signals import spawn_thread
from ._wire import (
    HEADER,
    HEADER_SIZE,
    VERSION,
    Kind,
    ProtocolError,
    pack_batch,
    pack_header,
    pack_items,
)

if TYPE_CHECKING:
    from ._events import Outbox

try:  # send and receive without letting go of the GIL (see _run); None where not built
    from ._fastcall import recv_now, send_now
except ImportError:  # pragma: no cover - a machine without a compiler
    recv_now = send_now = None  # type: ignore[assignment]

logger = logging.getLogger("localnet.events")

_ACK = int(Kind.ACK)
_ACK_MAX = 1024  # bytes of an ACK frame's body (see localnet._wire.ACK_RANGES)
_SCM = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_READ, _WRITE = 1, 2  # selectors.EVENT_READ, EVENT_WRITE

#: A piece of a channel's output: the bytes, the descriptors that go with
#: their first byte (or None), and a descriptor to close once they went.
Chunk = tuple[Any, "list[int] | None", "int | None"]


class _Channel:
    """One subscriber's socket, seen from the courier."""

    __slots__ = ("outbox", "sock", "fd", "pending", "acks", "writing")

    def __init__(self, outbox: Outbox, sock: socket.socket) -> None:
        self.outbox = outbox
        self.sock = sock
        self.fd = sock.fileno()
        self.pending: deque[Chunk] = deque()
        self.acks = bytearray()
        self.writing = False  # registered for writability (chunks pending)


class Courier:
    """Sends the events of every outbox of one publisher and reads their
    acknowledgements, from one thread (see the module's docstring)."""

    def __init__(self) -> None:
        import selectors  # (here: a peer that never publishes does not pay for it)

        self._selector = selectors.DefaultSelector()
        # A socket pair, not a pipe: send_now writes the wake-up byte without
        # letting go of the GIL, so a trigger that wakes the courier is not
        # switched out for it at once; the courier runs at the trigger
        # thread's next switch and takes a batch, not one event per wake-up.
        try:
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:  # (no descriptors left: the outbox that asked fails, and retries)
            self._selector.close()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ)
        self._channels: dict[int, _Channel] = {}
        self._lanes: list[list[Any]] = []  # the channels' outboxes' lanes (replaced, not changed)
        self._regrouped = False  # the outboxes' groups changed since _lanes was made
        self._arrivals: list[tuple[Outbox, socket.socket]] = []
        self._lock = threading.Lock()
        self._sleeping = False
        self.closed = False
        self._thread = spawn_thread(self._run, name="localnet-courier")

    # -- other threads ----------------------------------------------------------
    def attach(self, outbox: Outbox, sock: socket.socket) -> bool:
        """Serve ``outbox`` on ``sock`` (connected); False once the courier closed."""
        with self._lock:
            if self.closed:
                return False
            self._arrivals.append((outbox, sock))
        self._signal()
        return True

    def wake(self) -> None:
        """Have the courier look at the queues (a trigger saw an idle lane)."""
        if self._sleeping and not self.closed:  # (closed: also a forked child's copy)
            self._signal()

    def relane(self) -> None:
        """The outboxes' groups changed: have the courier look at their lanes (a new
        group's lane is not marked idle until the courier has seen it)."""
        self._regrouped = True  # (before the wake-up: the courier reads it after)
        self._signal()

    def _signal(self) -> None:
        with self._lock:
            self._sleeping = False
            for lane in self._lanes:  # (the next triggers need not call wake)
                lane[2] = False
            if not self.closed:
                try:
                    if send_now is not None:
                        send_now(self._wake_w.fileno(), b"\0")  # (0: one is pending already)
                    else:
                        self._wake_w.send(b"\0")
                except BlockingIOError:  # (a wake-up is pending already)
                    pass

    def close(self) -> None:
        """Stop: the thread closes every socket it still holds, then its own."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:
                pass

    def after_fork_in_child(self) -> None:
        """Close this process's copies of the courier's descriptors (its thread
        and channels are the parent's)."""
        self.closed = True
        for channel in self._channels.values():
            channel.sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the courier's thread ---------------------------------------------------
    def _run(self) -> None:
        # While there is work, a round sends and reads with the GIL held
        # throughout (send_now, recv_now): a thread that let go of it for each
        # socket would wait for it again each time, up to the switch interval
        # (sys.getswitchinterval) behind a busy trigger loop.  Only an idle
        # courier waits on the selector.
        try:
            while not self.closed:
                self._adopt()
                channels = list(self._channels.values())
                for channel in channels:
                    if not channel.pending:
                        self._take(channel)
                for channel in channels:
                    self._serve(channel, _READ)
                if not self._has_work() and self._idle():
                    self._wait()
        finally:
            self._shut()

    def _adopt(self) -> None:
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        for outbox, sock in arrivals:
            channel = _Channel(outbox, sock)
            self._channels[channel.fd] = channel
            self._selector.register(channel.fd, _READ, channel)
        if arrivals:
            self._relane()

    def _relane(self) -> None:
        # a new list, never one changed in place: _signal reads it from other threads
        self._regrouped = False
        outboxes = [channel.outbox for channel in self._channels.values()]
        groups = dict.fromkeys(outbox.group for outbox in outboxes
                               if outbox.group is not None and not outbox.group.sealed)
        self._lanes = [outbox.lane for outbox in outboxes] + [group.lane for group in groups]

    def _has_work(self) -> bool:
        return any(channel.outbox.unwritten() and not channel.pending
                   for channel in self._channels.values())

    def _idle(self) -> bool:
        """Mark the lanes idle, then look once more: True when there is nothing to do."""
        if self._regrouped:  # (the groups' lanes change with the routes)
            self._relane()
        for lane in self._lanes:
            lane[2] = True
        self._sleeping = True
        if self._has_work() or self._arrivals or self.closed:
            self._sleeping = False
            return False
        return True

    def _wait(self) -> None:
        """Wait for a wake-up, an acknowledgement or a socket's room."""
        ready = self._selector.select()
        self._sleeping = False
        for lane in self._lanes:
            lane[2] = False
        for key, mask in ready:
            if key.data is None:
                _drain(self._wake_r)
            else:
                self._serve(key.data, mask)

    def _serve(self, channel: _Channel, mask: int) -> None:
        """Read what the channel's socket holds (``_READ``), send what it now
        takes (``_WRITE``); drop the channel when it broke."""
        if self._channels.get(channel.fd) is not channel:
            return  # (dropped meanwhile)
        try:
            if mask & _READ:
                self._read(channel)
            if mask & _WRITE and channel.fd in self._channels:
                self._flush(channel)
        except EOFError:
            self._drop(channel, "the subscriber closed the connection")
        except (OSError, ProtocolError) as exc:
            self._drop(channel, f"connection broken: {exc}")

    def _take(self, channel: _Channel) -> None:
        """Send what the channel's outbox has queued since the last time."""
        outbox = channel.outbox
        try:
            taken = outbox.take()
            if taken is None:
                if outbox.closed:
                    self._drop(channel, "closed")
                return
            channel.pending.extend(chunks_of(outbox, *taken))
            self._flush(channel)
        except Exception as exc:  # whatever the socket or the peer, never die silently
            self._drop(channel, f"connection broken: {exc}")

    def _flush(self, channel: _Channel) -> None:
        """Send the channel's pending chunks, as far as its socket takes them now."""
        pending, sock = channel.pending, channel.sock
        while pending:
            data, fds, owned = pending[0]
            try:
                if fds:
                    sent = sock.sendmsg([data], [(*_SCM, array.array("i", fds))])
                elif send_now is not None:
                    sent = send_now(channel.fd, data)
                else:
                    sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            if not sent:
                break
            if owned is not None:
                os.close(owned)
            if sent < len(data):
                pending[0] = (memoryview(data)[sent:], None, None)
                break
            pending.popleft()
        if bool(pending) != channel.writing:
            channel.writing = bool(pending)
            self._selector.modify(channel.fd, _READ | _WRITE if pending else _READ, channel)

    def _read(self, channel: _Channel) -> None:
        """Read acknowledgements; hand each to the outbox."""
        try:
            data = recv_now(channel.fd, 65536) if recv_now is not None \
                else channel.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if data is None:
            return
        if not data:
            raise EOFError
        channel.acks += data
        for seq, body in take_acks(channel.acks):
            if channel.outbox.acknowledge(seq, body):  # retired, and all acknowledged
                channel.outbox.close()
                self._drop(channel, "")
                return

    def _drop(self, channel: _Channel, reason: str) -> None:
        """Let go of a channel; its outbox fails with ``reason`` unless it closed first."""
        if self._channels.pop(channel.fd, None) is None:
            return
        self._selector.unregister(channel.fd)
        self._relane()
        channel.sock.close()
        for _, _, owned in channel.pending:
            if owned is not None:
                os.close(owned)
        channel.pending.clear()
        if reason:
            channel.outbox.fail(reason)

    def _shut(self) -> None:
        for channel in list(self._channels.values()):
            self._drop(channel, "the publisher closed")
        with self._lock:
            self.closed = True
            arrivals, self._arrivals = self._arrivals, []
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
        for outbox, sock in arrivals:
            sock.close()
            outbox.fail("the publisher closed")


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def take_acks(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Cut the whole ACK frames from the front of ``buffer``: ``(seq, body)`` each.

    Raises:
        ProtocolError: a frame that is not an ACK (a subscriber sends nothing else).
    """
    acks = []
    while len(buffer) >= HEADER_SIZE:
        version, kind, nfds, length, seq = HEADER.unpack_from(buffer)
        if version != VERSION or kind != _ACK or nfds or length > _ACK_MAX:
            raise ProtocolError(f"unexpected frame (version {version}, kind {kind}, "
                                f"{nfds} descriptors, {length} bytes) from a subscriber")
        end = HEADER_SIZE + length
        if len(buffer) < end:
            break
        acks.append((seq, bytes(buffer[HEADER_SIZE:end])))
        del buffer[:end]
    return acks


def chunks_of(outbox: Outbox, entries: list[Any], first: int, mixed: bool,
              run: Any = None) -> list[Chunk]:
    """The chunks that carry events ``first``, ``first + 1``, ... (``entries``,
    which ``run`` may know to be a run of the ring, or the chunks themselves):
    a run of the ring's entries as RING frames; else items as list frames,
    whole pickles as batch frames and shared-memory payloads alone, each run
    in its turn."""
    if run is CHUNKS:  # (made already, see Outbox.take)
        return entries
    ring = outbox.ring
    if not mixed and ring is not None and (run or is_ring_run(entries)):
        fd = None if outbox.ring_sent else ring.dup()
        outbox.ring_sent = True
        return ring.chunks(entries, first, fd)
    frames: list[Any] = [entry[1] for entry in entries]
    if not mixed:  # the common case: items only
        return [(b"".join(pack_items(frames, first)), None, None)]
    chunks: list[Chunk] = []
    start = 0
    for kind, group in groupby(frames, key=kind_of):
        end = start + len(list(group))
        if kind == PAYLOAD:
            for seq, payload in enumerate(frames[start:end], first + start):
                body, fds = payload.body, payload.fds
                chunks.append((pack_header(Kind.EVENT, seq, len(body), len(fds)) + body,
                               list(fds), None))
        else:
            pack = pack_items if kind == ITEM else pack_batch
            chunks.append((b"".join(pack(frames[start:end], first + start)), None, None))
        start = end
    return chunks

