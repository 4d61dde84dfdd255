"""The publishing side: one outbox per subscriber peer.

A trigger pickles its event once and appends the bytes to the outbox of
every subscriber whose subscription matches this publisher; it never waits
for the network.  Each outbox has a writer thread, which sends whatever has
queued up in one ``sendall``, packed into batch frames of up to
``EVENT_BATCH`` bytes each (:func:`~localnet._wire.pack_batch`: a burst of
events costs a few system calls and a few frame headers, not one each), and
an acknowledgement reader, which counts what the subscriber has handled.

Bounds (per subscriber): at most ``limit`` events may be queued or in flight
unacknowledged.  When an outbox is full, a trigger waits up to ``block``
seconds for room, then drops the event for that subscriber only, logs it,
counts it, and marks the outbox *congested*: further events for it are
dropped at once, without waiting, until it has drained to half the limit.
A stopped or slow subscriber therefore delays a trigger by at most
``block`` seconds once, and never blocks the other subscribers.

Counts, per event and per subscriber: ``sent`` (accepted into the outbox),
``delivered`` (acknowledged after the subscriber's handlers ran),
``dropped`` (refused because the outbox was full) and ``failed`` (sent but
never acknowledged: the subscriber died or left first).
"""

from __future__ import annotations

import bisect
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import groupby
from typing import Any

from . import _liveness
from ._serial import Payload
from ._signals import spawn_thread
from ._wire import (
    FrameReader,
    Kind,
    ProtocolError,
    encode_control,
    pack_batch,
    pack_items,
    send_frame,
    send_raw_with_fds,
)

logger = logging.getLogger("localnet.events")


class Outbox:
    """Events queued for, and in flight to, one subscriber peer.

    Events arrive pickled: the publisher numbers its events with one sequence
    for all subscribers and pickles each once, so queueing one for a
    subscriber is three list appends.  ``_frames`` holds what is not yet
    written: items and whole pickles (bytes), which the writer packs into
    frames, and :class:`Payload` frames (shared memory), sent whole.
    ``_seqs`` and ``_events`` list what is queued or unacknowledged, oldest
    first (so the last ``len(_frames)`` sequences are those of ``_frames``);
    an acknowledgement (cumulative) cuts them with one bisect.
    """

    def __init__(self, entry: dict[str, Any], hello: dict[str, Any], limit: int, block: float,
                 on_dead: Callable[[Outbox, str], None],
                 lock: threading.Lock | None = None) -> None:
        self.name = str(entry["name"])
        self.pid = int(entry["pid"])
        self.started = float(entry["started"])
        self.address = str(entry["address"])
        self.key = (self.name, self.pid, self.started, self.address)
        self._hello = hello
        self.limit = limit
        self.block = block
        self._on_dead = on_dead
        # One lock may serve all of a publisher's outboxes: fan_out() then
        # queues an event for every subscriber under a single acquisition.
        lock = lock if lock is not None else threading.Lock()
        self._has_work = threading.Condition(lock)
        self._has_room = threading.Condition(lock)
        self._lock = lock
        self._frames: list[bytes | Payload] = []  # queued, not yet written
        self._seqs: list[int] = []  # queued or unacknowledged
        self._events: list[str] = []
        self._payloads: dict[int, Payload] = {}  # the ones in shared memory, by sequence
        self._mixed = False  # _frames holds more than items
        self.seq = 0  # the last sequence queued here
        self.written = 0  # the last sequence handed to the socket
        self.acked = 0
        self._congested = False
        self._writer_idle = False
        self.closed = False
        self.retiring = False
        self._delivered: Counter[str] = Counter()
        self._dropped: dict[str, int] = {}
        self._failed: Counter[str] = Counter()
        self._sock: socket.socket | None = None
        self._writer = spawn_thread(self._write_loop, name="localnet-outbox")

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "CONGESTED" if self._congested else "OPEN"
        return (f"<Outbox to {self.name!r} queued={self.seq} acked={self.acked} "
                f"pending={len(self._seqs)} [{state}]>")

    # -- the trigger side ---------------------------------------------------
    def put(self, event: str, seq: int, frame: bytes | Payload) -> bool:
        with self._lock:
            return self._put(event, seq, frame)

    def _put(self, event: str, seq: int, frame: bytes | Payload) -> bool:
        """Queue one event's frame; False when it was dropped (full or closed).

        ``frame`` is the event's item or whole pickle (``dumps_event``), or
        for shared memory a whole frame in a :class:`Payload` held once for
        this outbox, which the outbox settles when the event is acknowledged,
        or at once when it is dropped.  Called with the lock held.
        """
        if self.closed or self.retiring or (len(self._seqs) >= self.limit
                                            and not self._wait_for_room()):
            self._dropped[event] = self._dropped.get(event, 0) + 1
            if type(frame) is not bytes:
                frame.settle()  # type: ignore[union-attr]
            return False
        self.seq = seq
        self._frames.append(frame)
        self._seqs.append(seq)
        self._events.append(event)
        kind = _kind(frame)
        if kind != _ITEM:
            self._mixed = True
            if kind == _PAYLOAD:
                self._payloads[seq] = frame  # type: ignore[assignment]
        if self._writer_idle:
            self._writer_idle = False
            self._has_work.notify()
        return True

    def _wait_for_room(self) -> bool:
        # (with a shared lock, waiting here lets the other outboxes proceed)
        # called with the lock held and the outbox full
        if not self._congested and self.block > 0:
            deadline = time.monotonic() + self.block
            while len(self._seqs) >= self.limit and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._has_room.wait(remaining)
            if len(self._seqs) < self.limit and not self.closed:
                return True
        if not self._congested:
            self._congested = True
            logger.warning("subscriber %r is not keeping up (%d events unacknowledged); "
                           "dropping its events until it catches up", self.name, self.limit)
        return False

    def wait_delivered(self, seq: int, deadline: float) -> bool:
        """Wait until event ``seq`` was acknowledged (or can never be)."""
        with self._lock:
            while self.acked < seq and self._seqs and self._seqs[0] <= seq \
                    and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._has_room.wait(remaining)
            return True

    # -- the network side ---------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
            if not _liveness.same_user(sock):
                raise ProtocolError("the subscriber runs as another user")
            send_frame(sock, Kind.HELLO, 0, encode_control(self._hello))
        except BaseException:
            sock.close()
            raise
        return sock

    def _write_loop(self) -> None:
        try:
            sock = self._connect()
        except Exception as exc:  # whatever the address or the peer, never die silently
            self._fail(f"cannot connect: {exc}")
            return
        with self._lock:
            if self.closed:
                sock.close()
                return
            self._sock = sock
        spawn_thread(self._ack_loop, sock, name="localnet-acks")
        try:
            while True:
                with self._lock:
                    while not self._frames and not self.closed:
                        self._writer_idle = True
                        self._has_work.wait()
                    if self.closed:
                        return
                    frames, self._frames = self._frames, []
                    seqs = self._seqs[len(self._seqs) - len(frames):]
                    self.written = self.seq
                    mixed, self._mixed = self._mixed, False
                self._send(sock, frames, seqs, mixed)
        except Exception as exc:
            self._fail(f"connection broken: {exc}")

    @staticmethod
    def _send(sock: socket.socket, frames: list[bytes | Payload], seqs: list[int],
              mixed: bool) -> None:
        """Send queued events: items as list frames, whole pickles as batch
        frames, shared-memory payloads alone (each run in its turn)."""
        if not mixed:  # the common case: items only
            sock.sendall(b"".join(pack_items(frames, seqs)))  # type: ignore[arg-type]
            return
        start = 0
        for kind, run in groupby(frames, key=_kind):
            end = start + len(list(run))
            if kind == _PAYLOAD:
                for payload in frames[start:end]:
                    send_raw_with_fds(sock, payload.body, payload.fds)  # type: ignore[union-attr]
            else:
                pack = pack_items if kind == _ITEM else pack_batch
                sock.sendall(b"".join(pack(frames[start:end], seqs[start:end])))  # type: ignore[arg-type]
            start = end

    def _ack_loop(self, sock: socket.socket) -> None:
        reader = FrameReader(sock, 1024, with_fds=False)
        try:
            self._read_acks(reader)
        except EOFError:
            self._fail("the subscriber closed the connection")
        except (OSError, ProtocolError) as exc:
            self._fail(f"connection broken: {exc}")
        finally:
            sock.close()

    def _read_acks(self, reader: FrameReader) -> None:
        while True:
            kind, seq, _, _ = reader.read()
            if kind != Kind.ACK:
                raise ProtocolError(f"unexpected {Kind(kind).name} frame from a subscriber")
            if seq > self.written:
                raise ProtocolError(f"the subscriber acknowledged event {seq}, "
                                    f"which was never sent")
            settle: list[Payload] = []
            with self._lock:
                if seq > self.acked:
                    self.acked = seq
                n = bisect.bisect_right(self._seqs, seq)
                if n:
                    del self._seqs[:n]
                    self._delivered.update(self._events[:n])  # counted in C
                    del self._events[:n]
                if self._payloads:
                    for done in [s for s in self._payloads if s <= seq]:
                        settle.append(self._payloads.pop(done))
                if self._congested and len(self._seqs) <= self.limit // 2:
                    self._congested = False
                    logger.info("subscriber %r caught up", self.name)
                self._has_room.notify_all()
                settled = self.retiring and not self._seqs
            for payload in settle:
                payload.settle()
            if settled:
                self.close()
                return

    def retire(self) -> None:
        """Take no more events; close once those already sent are acknowledged.

        For a subscriber that unsubscribed or left: what it was sent still
        reaches it (it drains its channels before closing).
        """
        with self._lock:
            if self.closed:
                return
            self.retiring = True
            settled = not self._seqs
        if settled:
            self.close()

    def _fail(self, reason: str) -> None:
        if self.close():
            self._on_dead(self, reason)

    def close(self) -> bool:
        """Stop sending; count what was never acknowledged as failed.

        Returns True for the call that actually closed it.
        """
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            self._failed.update(self._events)
            self._frames, self._seqs, self._events = [], [], []
            payloads, self._payloads = list(self._payloads.values()), {}
            self._has_work.notify_all()
            self._has_room.notify_all()
            sock = self._sock
        for payload in payloads:
            payload.abandon()  # its fate is unknown: never reuse its segments
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the acknowledgement reader, which closes it
            except OSError:
                pass
        return True

    def totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Per event: (sent, delivered, dropped, failed)."""
        with self._lock:
            pending = Counter(self._events)
            events = set(pending) | set(self._delivered) | set(self._failed) | set(self._dropped)
            result = {}
            for event in events:
                delivered, failed = self._delivered[event], self._failed[event]
                result[event] = (delivered + failed + pending[event], delivered,
                                 self._dropped.get(event, 0), failed)
            return result


_ITEM, _WHOLE, _PAYLOAD = range(3)


def _kind(frame: bytes | Payload) -> int:
    """What a queued frame is: an item, a whole pickle, or a shared-memory payload."""
    if type(frame) is not bytes:
        return _PAYLOAD
    return _WHOLE if frame[0] == 0x80 else _ITEM


def fan_out(lock: threading.Lock, outboxes: tuple[Outbox, ...], event: str, seq: int,
            item: bytes) -> None:
    """Queue one event's item for every outbox sharing ``lock``, in one acquisition."""
    with lock:
        for outbox in outboxes:
            if outbox.closed or outbox.retiring or len(outbox._seqs) >= outbox.limit:
                outbox._put(event, seq, item)  # the slow path: drop, or wait for room
                continue
            outbox.seq = seq
            outbox._frames.append(item)
            outbox._seqs.append(seq)
            outbox._events.append(event)
            if outbox._writer_idle:
                outbox._writer_idle = False
                outbox._has_work.notify()
