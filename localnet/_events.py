"""The publishing side: one outbox per subscriber peer.

A trigger pickles its event once and appends the bytes to the outbox of
every subscriber whose subscription matches this publisher; it never waits
for the network.  Each outbox has a writer thread, which sends whatever has
queued up in one ``sendall`` (so a burst of events costs a few system calls,
not one each), and an acknowledgement reader, which counts what the
subscriber has handled.

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

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _liveness
from ._serial import Payload
from ._signals import spawn_thread
from ._wire import FrameReader, Kind, ProtocolError, encode_control, pack_header, send_frame

logger = logging.getLogger("localnet.events")

_BATCH_BYTES = 1 << 20
_DELIVERED, _SENT, _DROPPED, _FAILED = range(4)


class Outbox:
    """Events queued for, and in flight to, one subscriber peer."""

    def __init__(self, entry: dict[str, Any], hello: dict[str, Any], limit: int, block: float,
                 on_dead: Callable[[Outbox, str], None]) -> None:
        self.name = str(entry["name"])
        self.pid = int(entry["pid"])
        self.started = float(entry["started"])
        self.address = str(entry["address"])
        self.key = (self.name, self.pid, self.started, self.address)
        self._hello = hello
        self.limit = limit
        self.block = block
        self._on_dead = on_dead
        lock = threading.Lock()
        self._has_work = threading.Condition(lock)
        self._has_room = threading.Condition(lock)
        self._lock = lock
        self._queue: deque[tuple[int, str, bytes | Payload]] = deque()
        self._inflight: deque[tuple[int, str, bytes | Payload]] = deque()
        self.seq = 0
        self.acked = 0
        self._congested = False
        self._writer_idle = False
        self.closed = False
        self.retiring = False
        self.counts: dict[str, list[int]] = {}
        self._sock: socket.socket | None = None
        self._writer = spawn_thread(self._write_loop, name="localnet-outbox")

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else "CONGESTED" if self._congested else "OPEN"
        return (f"<Outbox to {self.name!r} sent={self.seq} acked={self.acked} "
                f"queued={len(self._queue)} [{state}]>")

    # -- the trigger side ---------------------------------------------------
    def put(self, event: str, payload: bytes | Payload) -> bool:
        """Queue one event; False when it was dropped (full or closed).

        A :class:`Payload` must have been held once for this outbox; the
        outbox settles it when acknowledged, or at once when dropped.
        """
        with self._lock:
            counts = self.counts.get(event)
            if counts is None:
                counts = self.counts[event] = [0, 0, 0, 0]
            if self.closed or self.retiring or (self.seq - self.acked >= self.limit
                                                and not self._wait_for_room()):
                counts[_DROPPED] += 1
                if type(payload) is not bytes:
                    payload.settle()  # type: ignore[union-attr]
                return False
            self.seq += 1
            self._queue.append((self.seq, event, payload))
            counts[_SENT] += 1
            if self._writer_idle:
                self._writer_idle = False
                self._has_work.notify()
            return True

    def _wait_for_room(self) -> bool:
        # called with the lock held and the outbox full
        if not self._congested and self.block > 0:
            deadline = time.monotonic() + self.block
            while self.seq - self.acked >= self.limit and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._has_room.wait(remaining)
            if self.seq - self.acked < self.limit and not self.closed:
                return True
        if not self._congested:
            self._congested = True
            logger.warning("subscriber %r is not keeping up (%d events unacknowledged); "
                           "dropping its events until it catches up", self.name, self.limit)
        return False

    def wait_delivered(self, seq: int, deadline: float) -> bool:
        """Wait until event ``seq`` was acknowledged (or can never be)."""
        with self._lock:
            while self.acked < seq and not self.closed:
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
        except (OSError, ProtocolError) as exc:
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
                    while not self._queue and not self.closed:
                        self._writer_idle = True
                        self._has_work.wait()
                    if self.closed:
                        return
                    batch = []
                    size = 0
                    while self._queue and size < _BATCH_BYTES:
                        item = self._queue.popleft()
                        batch.append(item)
                        self._inflight.append(item)
                        size += len(item[2])
                self._send(sock, batch)
        except OSError as exc:
            self._fail(f"connection broken: {exc}")

    @staticmethod
    def _send(sock: socket.socket, batch: list[tuple[int, str, bytes | Payload]]) -> None:
        parts: list[bytes] = []
        for seq, _, payload in batch:
            if type(payload) is not bytes:
                if parts:
                    sock.sendall(b"".join(parts))
                    parts = []
                assert isinstance(payload, Payload)
                send_frame(sock, Kind.EVENT, seq, payload.body, payload.fds)
            else:
                parts.append(pack_header(Kind.EVENT, seq, len(payload)))
                parts.append(payload)
        if parts:
            sock.sendall(b"".join(parts))

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
            with self._lock:
                if seq > self.acked:
                    self.acked = seq
                inflight, counts = self._inflight, self.counts
                while inflight and inflight[0][0] <= seq:
                    _, event, payload = inflight.popleft()
                    counts[event][_DELIVERED] += 1
                    if type(payload) is not bytes:
                        payload.settle()  # type: ignore[union-attr]
                if self._congested and self.seq - self.acked <= self.limit // 2:
                    self._congested = False
                    logger.info("subscriber %r caught up", self.name)
                self._has_room.notify_all()
                settled = self.retiring and self.acked >= self.seq
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
            settled = self.acked >= self.seq
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
            for _, event, payload in (*self._inflight, *self._queue):
                self.counts[event][_FAILED] += 1
                if type(payload) is not bytes:
                    payload.abandon()  # type: ignore[union-attr]
            self._inflight.clear()
            self._queue.clear()
            self._has_work.notify_all()
            self._has_room.notify_all()
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the acknowledgement reader, which closes it
            except OSError:
                pass
        return True

    def totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Per event: (sent, delivered, dropped, failed)."""
        with self._lock:
            return {event: (c[_SENT], c[_DELIVERED], c[_DROPPED], c[_FAILED])
                    for event, c in self.counts.items()}

