"""Calls across hosts: request/reply through the NATS server.

The request's body is the call's payload as on one host, inline (shared
memory does not cross hosts); the answer's first byte is its kind (REPLY or
ERROR), then the pickled result or exception, rebuilt as on one host.
Either may exceed the server's message limit, up to ``max_frame``: they
then travel in parts (:mod:`._parts`).  The
calling thread hands the request to the link's loop and waits for the
answer; meanwhile a callee that leaves the directory ends the call with
ConnectionLost.  On the callee, each call runs on a worker thread of its
own (up to ``max_workers``), so calls run at once, as on one host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import _serial
from .._wire import Kind
from ..errors import ConnectionLost, PeerNotFound, SerializationError, Timeout

if TYPE_CHECKING:
    from ._link import NatsLink

logger = logging.getLogger("localnet.nats")

_REPLY, _ERROR = int(Kind.REPLY), int(Kind.ERROR)
#: Seconds a callee may be missing from the directory before its call is given up
#: (one that left is gone from it within 2.5 s; this much more rides out a callee
#: whose presence paused while it held its interpreter in a long operation).
LOST_AFTER = 5.0


class RemoteCalls:
    """A link's calls to other hosts' peers, and its answers to theirs."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=link.peer.max_workers, thread_name_prefix="localnet-nats-call")

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def call(self, name: str, connection: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             deadline: float | None) -> Any:
        """Run ``connection`` in the peer ``name`` (``name@host``) of another host.

        Raises the remote exception, or PeerNotFound, Timeout, ConnectionLost
        (the peer or its host went away during the call), SerializationError.
        """
        qualified, future = self._send(name, connection, args, kwargs, deadline)
        return _answer(self._wait(future, qualified, connection, deadline), qualified,
                       connection)

    async def acall(self, name: str, connection: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any], deadline: float | None) -> Any:
        """:meth:`call`, awaited on any loop (``deadline``: ``time.monotonic()``)."""
        qualified, future = self._send(name, connection, args, kwargs, deadline)
        waiting = asyncio.wrap_future(future)
        missing: list[float] = []
        try:
            while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
                self._check(qualified, connection, deadline, missing)
            return _answer(_outcome(future, qualified, connection), qualified, connection)
        finally:
            if not future.done():
                future.cancel()

    def _send(self, name: str, connection: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              deadline: float | None) -> tuple[str, concurrent.futures.Future[Any]]:
        """Start the request; the callee's ``name@host`` and the future of its answer."""
        record = self._link.lookup(name)
        nc, loop = self._link.nc, self._link.loop
        if record is None or nc is None or loop is None:
            raise PeerNotFound(name, self._link.names())
        qualified = record["name"]
        payload = _serial.dumps_call(connection, args, kwargs, "an argument of", None)
        assert isinstance(payload, bytes)
        limit = self._link.peer.max_frame
        if len(payload) > limit:
            raise SerializationError(
                f"the arguments of {connection!r} are {len(payload)} bytes, over this "
                f"peer's {limit}-byte message limit (max_frame); raise max_frame")
        timeout = 1e9 if deadline is None else max(0.001, deadline - time.monotonic())
        return qualified, asyncio.run_coroutine_threadsafe(
            self._link.parts.request(qualified, payload, timeout), loop)

    def _check(self, qualified: str, connection: str, deadline: float | None,
               missing: list[float]) -> None:
        """Raise Timeout past ``deadline``, ConnectionLost once the callee has been out
        of the directory for ``LOST_AFTER`` s (``missing``: since when, if it is)."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise Timeout(f"peer {qualified!r} did not answer {connection!r} within the "
                          "timeout")
        if self._link.lookup(qualified) is not None:
            missing.clear()
        elif not missing:
            missing.append(now)  # (a callee busy in a long call may miss a presence)
        elif now - missing[0] >= LOST_AFTER:
            raise ConnectionLost(f"peer {qualified!r} went away during the call to "
                                 f"{connection!r}")

    def _wait(self, future: concurrent.futures.Future[Any], qualified: str, connection: str,
              deadline: float | None) -> Any:
        """The answer; meanwhile, a peer that leaves the directory ends the call."""
        missing: list[float] = []
        try:
            while not concurrent.futures.wait([future], timeout=0.25).done:
                self._check(qualified, connection, deadline, missing)
            return _outcome(future, qualified, connection)
        finally:
            if not future.done():
                future.cancel()

    async def on_call(self, msg: Any) -> None:
        # Each call in a task of its own: the subscription's next message does
        # not wait for this one (calls run at once, as on one host).
        asyncio.ensure_future(self._answer(msg))

    async def _answer(self, msg: Any) -> None:
        loop = asyncio.get_running_loop()
        parts = self._link.parts
        try:
            headers, data = msg.headers or {}, msg.data
            if "t" in headers:  # the last part of a large request (see _parts)
                data = await parts.assemble(headers, data)
                if data is None:
                    await msg.respond(bytes([_ERROR]) + _serial.dumps_exception(
                        SerializationError(
                            f"peer {self._link.qualified!r} could not take the call's "
                            f"arguments: larger than its max_frame "
                            f"({self._link.peer.max_frame} bytes), or parts went missing"),
                        ""))
                    return
            answer = await loop.run_in_executor(self._workers, self._serve, data)
            await msg.respond(parts.offer(answer))
        except Exception as exc:  # noqa: BLE001 - one bad call never stops the link
            logger.warning("peer %r could not answer a call from another host: %s",
                           self._link.peer.name, exc)

    def _serve(self, data: bytes | bytearray) -> bytes:
        kind, reply = self._link.peer._receiver.run_call(  # noqa: SLF001
            data if isinstance(data, bytearray) else bytearray(data), [], inline=True)
        assert isinstance(reply, (bytes, bytearray))
        return bytes([int(kind)]) + bytes(reply)


def _answer(data: bytes | bytearray, qualified: str, connection: str) -> Any:
    """The result in an answer, or raise its exception."""
    if not data or data[0] not in (_REPLY, _ERROR):
        raise ConnectionLost(f"peer {qualified!r} sent a malformed answer")
    if data[0] == _REPLY:
        return _serial.loads(memoryview(data)[1:], "the result of", None, connection)
    raise _serial.loads_exception(memoryview(data)[1:])


def _outcome(future: concurrent.futures.Future[Any], qualified: str, connection: str) -> Any:
    """A finished request's answer bytes, or its failure as localnet's."""
    import nats.errors

    try:
        return future.result()
    except (nats.errors.Error, TimeoutError) as exc:
        raise _translate(exc, qualified, connection) from None


def _translate(exc: Exception, qualified: str, connection: str) -> Exception:
    """A nats-py error (or a timeout inside a transfer) of a call, as localnet's."""
    import nats.errors

    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return Timeout(f"peer {qualified!r} did not answer {connection!r} within the timeout")
    if isinstance(exc, nats.errors.NoRespondersError):
        return ConnectionLost(f"peer {qualified!r} is no longer there")
    return ConnectionLost(f"the call to {qualified!r} failed on NATS: {exc}")
