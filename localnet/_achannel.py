"""An awaited call's connection: a call channel driven by an asyncio loop.

The thread API's :class:`~localnet._remote.CallChannel` blocks its thread
in the socket; an :class:`AsyncChannel` is the same connection (the same
HELLO, the same CALL/TIMED_CALL, REPLY, ERROR and TAKEN frames, see
:mod:`localnet._wire`) on a non-blocking socket that the loop watches:
sending writes what the socket takes and awaits room for the rest, and the
loop's reader callback parses the answer and completes the call's future.
So any number of awaited calls wait on one thread, a connection each.

A call that is cancelled (``asyncio.wait_for``, ``Task.cancel``) returns at
once.  The channel then stays usable: when the whole request had left, it
reads and discards the late answer (closing any descriptors it carries)
before it takes the next call (:attr:`ready` is set again); when only
part of the request had left, nothing else can follow it on that socket
and the channel is closed.

One loop uses a channel; :meth:`close` may come from any thread.
"""

from __future__ import annotations

import array
import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from . import _liveness
from ._wire import (
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    VERSION,
    Kind,
    close_fds,
    encode_control,
)
from .errors import ConnectionLost, PeerClosed, SerializationError, Timeout

_CALL, _TIMED, _REPLY, _ERROR = int(Kind.CALL), int(Kind.TIMED_CALL), int(Kind.REPLY), \
    int(Kind.ERROR)
_TAKEN, _HELLO = int(Kind.TAKEN), int(Kind.HELLO)
_TIMED_HEAD = struct.Struct("<BBHIQd")
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: A request up to this size goes out at once (start_small).
SMALL_REQUEST = 32 * 1024

try:  # the C side of small frames (see localnet._fastcall); None where not built
    from ._fastcall import recv_frame as _recv_frame
    from ._fastcall import send_frame as _send_small
except ImportError:
    _recv_frame = _send_small = None  # type: ignore[assignment]
_CHUNK = 64 * 1024
_ANSWER = (_REPLY, _ERROR)

#: What an answer is: (kind, body, descriptors, request id).
Answer = tuple[int, bytearray, list[int], int]


class NotSentAsync(ConnectionLost):
    """The connection was found closed before any of the request left: safe to retry."""


async def open_channel(address: str, target: str, hello: dict[str, Any], max_frame: int,
                       deadline: float | None) -> AsyncChannel:
    """Connect to ``address`` and say HELLO, by ``deadline`` (``loop.time()``) when given.

    A listener whose backlog is full (its peer stopped or overloaded) refuses
    a non-blocking connect with EAGAIN; it is tried again, backing off, until
    the deadline.  Raises ConnectionLost or Timeout.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    pause = 0.001
    try:
        while True:
            try:
                sock.connect(address)
                break
            except (BlockingIOError, InterruptedError):
                if deadline is not None and loop.time() + pause > deadline:
                    raise Timeout(f"peer {target!r} did not accept a connection within the "
                                  "timeout (it is stopped or overloaded)") from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
        if not _liveness.same_user(sock):
            raise ConnectionLost(f"peer {target!r} runs as another user; refusing it")
        channel = AsyncChannel(loop, sock, target, max_frame)
        body = encode_control(hello)
        await channel.send(HEADER.pack(VERSION, _HELLO, 0, len(body), 0), body, (), deadline)
        return channel
    except OSError as exc:
        sock.close()
        raise ConnectionLost(f"cannot connect to peer {target!r}: {exc}") from exc
    except BaseException:
        sock.close()
        raise


class AsyncChannel:
    """One connection to a peer for awaited calls, one call at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, target: str,
                 max_frame: int) -> None:
        self.loop = loop
        self.target = target
        self._sock = sock
        self._fd = sock.fileno()
        self.max_frame = max_frame
        self._buf = bytearray(_CHUNK)
        self._end = 0
        self._fds: list[int] = []
        self._large: bytearray | None = None  # a body too large for _buf, while it arrives
        self._got = 0
        self._head: tuple[int, int, int, int] | None = None  # kind, nfds, length, id
        self._next = 1
        self._waiting: asyncio.Future[Answer] | None = None
        self._expect = 0  # the id of the answer the call (or the drain) waits for
        self._draining = False  # a cancelled call's answer is still to come
        self._sent = 0  # bytes of the current frame that left
        self._total = 0  # ... of how many
        self._refused = 0  # the length of a frame refused as too large
        self.broken: BaseException | None = None
        #: Called when a cancelled call's answer was read and dropped (see usable).
        self.on_ready: Callable[[AsyncChannel], None] | None = None
        loop.add_reader(self._fd, self._readable)

    def __repr__(self) -> str:
        state = "BROKEN" if self.broken else "DRAINING" if self._draining else "OK"
        return f"<AsyncChannel to {self.target!r} [{state}]>"

    @property
    def usable(self) -> bool:
        """Neither broken nor still waiting for a cancelled call's answer."""
        return self.broken is None and not self._draining

    # -- a call ------------------------------------------------------------------
    def start_small(self, payload: bytes, deadline: float | None
                    ) -> asyncio.Future[Answer] | None:
        """Send a small call at once and return the future of its answer; None when
        this path does not apply (a large payload, a deadline, no C extension): use
        :meth:`request`.

        The send cannot wait: the channel is usable, so the callee has read
        every request sent on it before (it answered them), and the socket
        buffer takes a frame of up to ``SMALL_REQUEST`` bytes whole.  Await the
        future, then call :meth:`answered`, and :meth:`failed` first if the
        await raised.  Raises NotSentAsync.
        """
        if _send_small is None or deadline is not None or len(payload) > SMALL_REQUEST:
            return None  # (the C send would write its own deadline into a TIMED_CALL)
        if self.broken is not None:
            raise NotSentAsync(f"the connection to peer {self.target!r} is closed")
        ident = self._next
        self._next = ident + 1
        future: asyncio.Future[Answer] = self.loop.create_future()
        self._waiting, self._expect = future, ident
        try:
            _send_small(self._fd, _CALL, ident, payload)
        except OSError as exc:
            self._waiting = None
            self.close()
            raise NotSentAsync(f"peer {self.target!r} went away: {exc}") from None
        self._sent = self._total = HEADER_SIZE + len(payload)
        return future

    def failed(self, error: BaseException) -> None:
        """Awaiting a :meth:`start_small` call raised ``error``."""
        if isinstance(error, asyncio.CancelledError):
            self._cancelled(self._total)
        elif isinstance(error, (Timeout, ConnectionLost)):
            self.close()

    def answered(self) -> None:
        """A :meth:`start_small` call ended (answered or not)."""
        self._waiting = None

    async def request(self, payload: bytes, deadline: float | None,
                      fds: list[int] | tuple[int, ...] = ()) -> Answer:
        """Send one call and await its answer ``(kind, body, fds, id)``.

        ``deadline`` is ``loop.time()`` based (the monotonic clock).  Raises
        NotSentAsync (nothing left: safe to send again), ConnectionLost,
        PeerClosed or Timeout; after those the channel is broken.
        """
        if self.broken is not None:
            raise NotSentAsync(f"the connection to peer {self.target!r} is closed")
        ident = self._next
        self._next = ident + 1
        length = len(payload)
        if deadline is None:
            head = HEADER.pack(VERSION, _CALL, len(fds), length, ident)
        else:  # (loop.time() is time.monotonic(): the deadline the callee checks)
            head = _TIMED_HEAD.pack(VERSION, _TIMED, len(fds), 8 + length, ident, deadline)
        future: asyncio.Future[Answer] = self.loop.create_future()
        self._waiting, self._expect = future, ident
        timer = None
        if deadline is not None:
            timer = self.loop.call_at(deadline, self._expire, future)
        try:
            await self.send(head, payload, fds, deadline, future)
            return await future
        except asyncio.CancelledError:
            self._cancelled(len(head) + length)
            raise
        except NotSentAsync:
            raise
        except (Timeout, ConnectionLost):
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiting is future:
                self._waiting = None

    def _expire(self, future: asyncio.Future[Answer]) -> None:
        if not future.done():
            future.set_exception(Timeout(f"peer {self.target!r} did not answer within the "
                                         "timeout"))

    def _cancelled(self, total: int) -> None:
        """A call was cancelled: keep the channel usable if its socket allows."""
        if self.broken is not None or self._sent == 0:
            return  # closed already, or nothing left: the channel is as it was
        if self._sent < total:
            self.close()  # half a request: nothing else can follow it
            return
        future = self._waiting
        if future is not None and future.done() and not future.cancelled() \
                and future.exception() is None:
            close_fds(future.result()[2])  # answered as it was cancelled
            return
        self._draining = True  # the answer comes later: read and drop it

    async def send(self, head: bytes, body: bytes | bytearray | memoryview,
                   fds: list[int] | tuple[int, ...], deadline: float | None,
                   answer: asyncio.Future[Answer] | None = None) -> int:
        """Send one frame (``head`` + ``body``, ``fds`` with its first bytes); the
        bytes sent.  Waits for room without blocking the loop."""
        views = [memoryview(head), memoryview(body).cast("B")]
        total = len(views[0]) + len(views[1])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
            if fds else []
        sent = self._sent = 0
        while True:
            try:
                n = self._sock.sendmsg(views, ancillary) if ancillary or len(views) > 1 \
                    else self._sock.send(views[0])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                if sent == 0:
                    self.close()
                    raise NotSentAsync(f"peer {self.target!r} went away: {exc}") from None
                self.close()
                raise ConnectionLost(f"peer {self.target!r} went away: {exc}") from None
            if n:
                ancillary = []
                sent += n
                self._sent = sent
                if sent >= total:
                    return sent
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                views[0] = views[0][n:]
            await self._writable(deadline, sent, answer)

    async def _writable(self, deadline: float | None, sent: int,
                        answer: asyncio.Future[Answer] | None) -> None:
        room: asyncio.Future[Any] = self.loop.create_future()

        def ready() -> None:
            if not room.done():
                room.set_result(None)

        self.loop.add_writer(self._fd, ready)
        try:
            if answer is not None:  # (an early failure, a timeout, completes it)
                either: list[asyncio.Future[Any]] = [room, answer]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if answer.done() and not room.done():
                    answer.result()  # raises its Timeout or ConnectionLost
            else:
                remaining = None if deadline is None else deadline - self.loop.time()
                if remaining is not None and remaining <= 0:
                    raise Timeout(f"peer {self.target!r} did not take the call within the "
                                  "timeout (it is stopped or overloaded)")
                await asyncio.wait_for(room, remaining)
        except asyncio.TimeoutError:
            raise Timeout(f"peer {self.target!r} did not take the call within the timeout "
                          "(it is stopped or overloaded)") from None
        finally:
            if self.broken is None:
                self.loop.remove_writer(self._fd)

    def taken(self, ident: int) -> None:
        """Tell the callee we mapped the shared memory of answer ``ident``."""
        try:
            self._sock.send(HEADER.pack(VERSION, _TAKEN, 0, 0, ident))
        except OSError:
            pass  # (a full buffer or a dead peer: the callee settles its segments itself)

    # -- reading -------------------------------------------------------------------
    def _readable(self) -> None:
        """The loop's reader callback: read what arrived; complete a whole answer."""
        try:
            frame = self._read()
        except (OSError, EOFError, ValueError) as exc:
            self._fail(exc)
            return
        if frame is None:
            return
        kind, ident, body, fds = frame
        if kind not in _ANSWER or ident != self._expect:
            close_fds(fds)
            self._fail(ValueError(f"unexpected {kind} frame (id {ident}) on a call channel"))
            return
        if self._draining:  # a cancelled call's answer: drop it
            self._draining = False
            close_fds(fds)
            if self.on_ready is not None:
                self.on_ready(self)
            return
        future = self._waiting
        if future is None or future.done():
            close_fds(fds)
            return
        future.set_result((kind, body, fds, ident))

    def _read(self) -> tuple[int, int, bytearray, list[int]] | None:
        """One receive; a whole frame, or None while it is incomplete."""
        if self._large is not None:
            return self._read_large()
        if self._end == 0 and _recv_frame is not None:
            # (the loop saw the socket readable: this receive does not wait)
            got = _recv_frame(self._fd, self._buf, self.max_frame)
            if got[0]:
                return got  # a whole small frame
            n = got[1]
            if n < 0:
                raise ValueError("too many descriptors in one message")
            if got[2]:
                self._fds.extend(got[2])
            if n == 0:
                raise EOFError("connection closed")
            self._end = n
            return self._parse()
        view = memoryview(self._buf)
        with view[self._end:] as free:
            n, ancdata, flags, _ = self._sock.recvmsg_into([free], _CMSG_SPACE)
        del view
        if ancdata:
            self._take_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ValueError("too many descriptors in one message")
        if n == 0:
            raise EOFError("connection closed")
        self._end += n
        return self._parse()

    def _parse(self) -> tuple[int, int, bytearray, list[int]] | None:
        """The frame in ``_buf[:_end]`` if whole; a large one goes on in ``_large``."""
        if self._end < HEADER_SIZE:
            return None
        version, kind, nfds, length, ident = HEADER.unpack_from(self._buf)
        if version != VERSION or length > self.max_frame or nfds > MAX_FDS:
            if length > self.max_frame:
                self._refused = length
            raise ValueError(f"a frame of version {version}, {length} bytes and {nfds} "
                             "descriptors was refused")
        total = HEADER_SIZE + length
        if self._end < total:
            if total > len(self._buf):
                self._large = bytearray(length)
                self._large[: self._end - HEADER_SIZE] = self._buf[HEADER_SIZE: self._end]
                self._got = self._end - HEADER_SIZE
                self._head = (kind, nfds, length, ident)
                self._end = 0
            return None
        if self._end > total:
            raise ValueError("bytes after the answer on a call channel")
        body = self._buf[HEADER_SIZE: total]
        self._end = 0
        return kind, ident, body, self._pop_fds(nfds)

    def _read_large(self) -> tuple[int, int, bytearray, list[int]] | None:
        large, head = self._large, self._head
        assert large is not None and head is not None
        with memoryview(large) as view, view[self._got:] as free:
            n, ancdata, flags, _ = self._sock.recvmsg_into([free], _CMSG_SPACE)
        if ancdata:
            self._take_fds(ancdata)
        if n == 0:
            raise EOFError("connection closed in the middle of a frame")
        self._got += n
        if self._got < len(large):
            return None
        kind, nfds, _, ident = head
        self._large = self._head = None
        return kind, ident, large, self._pop_fds(nfds)

    def _take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, ctype, data in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                self._fds.extend(fds)

    def _pop_fds(self, nfds: int) -> list[int]:
        if len(self._fds) < nfds:
            raise ValueError(f"a frame declares {nfds} descriptors but {len(self._fds)} came")
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        return fds

    def _fail(self, exc: BaseException) -> None:
        refused = self._refused
        if refused:
            error: BaseException = SerializationError(
                f"peer {self.target!r} answered with {refused} bytes inline, over this "
                f"peer's {self.max_frame}-byte message limit (its max_frame); raise max_frame "
                "here, or return large data as NumPy arrays/bytearrays so it goes through "
                "shared memory")
        elif isinstance(exc, EOFError):
            error = ConnectionLost(f"peer {self.target!r} closed the connection")
        else:
            error = ConnectionLost(f"peer {self.target!r} went away: {exc}")
        self.close(error)

    # -- the end -------------------------------------------------------------------
    def close(self, error: BaseException | None = None) -> None:
        """Close the channel (from the loop's thread); a waiting call gets ``error``."""
        if self.broken is None:
            self.broken = error or ConnectionLost(
                f"the connection to peer {self.target!r} was closed")
            try:
                self.loop.remove_reader(self._fd)
                self.loop.remove_writer(self._fd)
            except (RuntimeError, ValueError):  # the loop is closed
                pass
            self._sock.close()
            close_fds(self._fds)
            self._fds = []
            self._large = None
        future = self._waiting
        if future is not None and not future.done():
            future.set_exception(self.broken)

    def forget(self) -> None:
        """After fork(), in the child: close this process's copy of the socket only."""
        if self.broken is None:
            self.broken = ConnectionLost(f"the connection to peer {self.target!r} was the "
                                         "parent process's")
            self._sock.close()

    def close_threadsafe(self, error: PeerClosed) -> None:
        """Close from another thread: on the loop's own, or at once if it has stopped."""
        try:
            self.loop.call_soon_threadsafe(self.close, error)
        except RuntimeError:  # the loop is closed: no callback will ever run
            if self.broken is None:
                self.broken = error
                self._sock.close()
