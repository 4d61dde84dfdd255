"""Calls whose arguments or result exceed the NATS server's message limit: in parts.

A NATS message carries at most ``max_payload`` bytes (1 MiB by default); a
call across hosts carries up to ``max_frame`` (the peers' limit, as on one
host).  So:

* a request larger than a message goes as parts on ``<ns>.part.<host>.<name>``
  (headers: the transfer's id, the part's index, the count, the total size),
  every ``WINDOW``-th part as a request the callee answers once it has it
  (flow control: at most ``WINDOW`` parts in flight), and the last part as
  the call itself; the callee writes the parts into one buffer of the
  announced size as they come, and runs the call when the last is in;
* a result larger than a message stays on the callee, which answers with
  its id and its count of parts; the caller pulls them one by one from
  ``<ns>.pull.<host>.<name>`` (flow control by construction), into one
  buffer;
* a message of events larger than a message (one large event) goes as a
  request does, its last part on the subscriber's event subject
  (:meth:`Parts.push`).

Memory: the pickled payload on one side and one buffer of its size on the
other, besides the objects themselves; parts never pile up.  A transfer
left unfinished (a caller or callee gone) is dropped after ``STALE`` s.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from ..errors import SerializationError

if TYPE_CHECKING:
    from ._link import NatsLink

WINDOW = 8  # parts in flight before the sender waits for the receiver
STALE = 60.0  # seconds an unfinished transfer is kept
PARTS = 0  # an answer's first byte: the result waits, in parts, to be pulled
_HEADROOM = 4096  # of max_payload, for headers and framing


class _Incoming:
    """The parts of one request, written into one buffer as they come."""

    def __init__(self, count: int, size: int, part: int) -> None:
        self.buffer = bytearray(size)
        self.missing = set(range(count))
        self.part = part
        self.done = asyncio.Event()
        self.until = time.monotonic() + STALE

    def add(self, index: int, data: bytes) -> None:
        if index in self.missing:
            start = index * self.part
            if start + len(data) > len(self.buffer):
                raise ValueError("a part beyond the announced size")
            self.buffer[start:start + len(data)] = data
            self.missing.discard(index)
            self.until = time.monotonic() + STALE
        if not self.missing:
            self.done.set()


class Parts:
    """A link's transfers in parts, both ways."""

    def __init__(self, link: NatsLink) -> None:
        self._link = link
        self._incoming: dict[str, _Incoming] = {}
        self._outgoing: dict[str, tuple[bytes, int, float]] = {}

    def limit(self) -> int:
        """The most bytes one message carries here."""
        return max(1024, self._link.max_payload() - _HEADROOM)

    # -- the caller ---------------------------------------------------------------
    async def request(self, qualified: str, payload: bytes, timeout: float
                      ) -> bytes | bytearray:
        """Send ``payload`` as a call to ``qualified`` (in parts if large); the
        answer's bytes, pulled in parts if large."""
        nc, limit = self._link.nc, self.limit()
        call = self._link.subject("call", qualified)
        if len(payload) <= limit:
            msg = await nc.request(call, payload, timeout=timeout)
            return await self.pull(qualified, msg.data, timeout)
        transfer = secrets.token_hex(8)
        count = -(-len(payload) // limit)
        part = self._link.subject("part", qualified)
        view = memoryview(payload)
        for index in range(count):
            headers = {"t": transfer, "i": str(index), "k": str(count),
                       "z": str(len(payload)), "c": str(limit)}
            chunk = bytes(view[index * limit:(index + 1) * limit])
            if index == count - 1:
                msg = await nc.request(call, chunk, timeout=timeout, headers=headers)
                return await self.pull(qualified, msg.data, timeout)
            if (index + 1) % WINDOW == 0:
                await nc.request(part, chunk, timeout=min(timeout, STALE), headers=headers)
            else:
                await nc.publish(part, chunk, headers=headers)
        raise AssertionError("unreachable")

    async def push(self, qualified: str, subject: str, body: bytes,
                   headers: dict[str, str]) -> None:
        """Publish ``body`` on ``subject`` (to peer ``qualified``), in parts if large:
        the parts go to its part subject, the last one on ``subject`` with
        ``headers`` (a message of events, see _events)."""
        nc, limit = self._link.nc, self.limit()
        if len(body) <= limit:
            await nc.publish(subject, body, headers=headers)
            return
        transfer = secrets.token_hex(8)
        count = -(-len(body) // limit)
        part = self._link.subject("part", qualified)
        view = memoryview(body)
        for index in range(count):
            announce = {"t": transfer, "i": str(index), "k": str(count),
                        "z": str(len(body)), "c": str(limit)}
            chunk = bytes(view[index * limit:(index + 1) * limit])
            if index == count - 1:
                await nc.publish(subject, chunk, headers={**headers, **announce})
            elif (index + 1) % WINDOW == 0:
                await nc.request(part, chunk, timeout=STALE, headers=announce)
            else:
                await nc.publish(part, chunk, headers=announce)

    async def pull(self, qualified: str, data: bytes, timeout: float) -> bytes | bytearray:
        """``data`` itself, or when it announces a large result, that result."""
        if not data or data[0] != PARTS:
            return data
        meta = json.loads(data[1:])
        result, count, size = str(meta["id"]), int(meta["n"]), int(meta["z"])
        if size > self._link.peer.max_frame:
            raise SerializationError(
                f"peer {qualified!r} answered with {size} bytes, over this peer's "
                f"{self._link.peer.max_frame}-byte message limit (max_frame); raise max_frame")
        buffer = bytearray(size)
        offset = 0
        pull = self._link.subject("pull", qualified)
        for index in range(count):
            msg = await self._link.nc.request(
                pull, json.dumps({"id": result, "i": index}).encode(),
                timeout=min(timeout, STALE))
            buffer[offset:offset + len(msg.data)] = msg.data
            offset += len(msg.data)
        return buffer

    # -- the callee ---------------------------------------------------------------
    async def on_part(self, msg: Any) -> None:
        self._add(msg.headers or {}, msg.data)
        if msg.reply:
            await msg.respond(b"")  # (the sender's window moves on)

    def _add(self, headers: dict[str, str], data: bytes) -> _Incoming | None:
        try:
            transfer, index = headers["t"], int(headers["i"])
            count, size, part = int(headers["k"]), int(headers["z"]), int(headers["c"])
        except (KeyError, ValueError):
            return None
        if size > self._link.peer.max_frame or count < 1 or part < 1:
            return None  # (the call itself is then refused, see assemble)
        incoming = self._incoming.get(transfer)
        if incoming is None:
            incoming = self._incoming[transfer] = _Incoming(count, size, part)
        try:
            incoming.add(index, data)
        except ValueError:
            return None
        return incoming

    def too_large(self, headers: dict[str, str]) -> bool:
        """Whether a transfer announces more than this peer's max_frame."""
        try:
            return int(headers.get("z", "0")) > self._link.peer.max_frame
        except ValueError:
            return False

    async def assemble(self, headers: dict[str, str], data: bytes) -> bytearray | None:
        """The whole request of which ``data`` is the last part; None when it cannot
        be had (over ``max_frame``, malformed, or its parts did not come)."""
        incoming = self._add(headers, data)
        if incoming is None:
            return None
        try:
            await asyncio.wait_for(incoming.done.wait(), STALE)
        except asyncio.TimeoutError:
            return None
        finally:
            self._incoming.pop(headers.get("t", ""), None)
        return incoming.buffer

    def offer(self, answer: bytes) -> bytes:
        """``answer`` if it fits one message, else the message that announces it
        (it waits here to be pulled)."""
        limit = self.limit()
        if len(answer) <= limit:
            return answer
        result = secrets.token_hex(8)
        self._outgoing[result] = (answer, limit, time.monotonic() + STALE)
        count = -(-len(answer) // limit)
        return bytes([PARTS]) + json.dumps({"id": result, "n": count,
                                            "z": len(answer)}).encode()

    async def on_pull(self, msg: Any) -> None:
        try:
            ask = json.loads(msg.data)
            result, index = str(ask["id"]), int(ask["i"])
            answer, limit, _ = self._outgoing[result]
        except (ValueError, KeyError, TypeError):
            await msg.respond(b"")
            return
        count = -(-len(answer) // limit)
        if index >= count - 1:
            self._outgoing.pop(result, None)  # the last part: done with it
        else:
            self._outgoing[result] = (answer, limit, time.monotonic() + STALE)
        await msg.respond(answer[index * limit:(index + 1) * limit])

    def sweep(self, now: float) -> None:
        """Drop transfers nobody finished (a peer went away in the middle)."""
        for key in [k for k, v in self._incoming.items() if v.until < now]:
            self._incoming.pop(key, None)
        for key in [k for k, (_, _, until) in self._outgoing.items() if until < now]:
            self._outgoing.pop(key, None)
