"""A peer's link to the peers of other hosts, through a NATS server or cluster.

One :class:`NatsLink` per peer that has a NATS setting, on the event loop
localnet owns (:mod:`localnet._loop`).  On one host nothing changes: the
registry and the Unix sockets carry everything between its peers.  The link
adds what crosses hosts:

* presence: every ``HEARTBEAT`` seconds the peer publishes its record (name,
  host, pid, group, connections, events ...) on ``<ns>.hb.<host>.<name>``
  and says goodbye on ``<ns>.bye.<host>.<name>`` when it closes; every link
  keeps a directory of the other hosts' peers, each forgotten ``EXPIRY``
  seconds after its last heartbeat (a host that lost power, its cable or
  all its processes at once thus leaves every listing within ``EXPIRY +
  HEARTBEAT``);
* calls: request/reply on ``<ns>.call.<host>.<name>`` (:mod:`._calls`);
* events: ``<ns>.ev.<host>.<name>`` and their acknowledgements on
  ``<ns>.ack.<host>.<name>`` (:mod:`._events`); ``<ns>.ctl.<host>.<name>``
  takes a peer's record at once, when its subscriptions changed.

Subject tokens are the host's and the peer's names in URL-safe base64, so
any name is a valid subject.  When the server cannot be reached the peer
works on its own host, says so once in the log, and joins when it is back.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import _loop
from ._calls import RemoteCalls
from ._config import NatsConfig
from ._events import Inboxes, RemoteEvents
from ._parts import Parts

if TYPE_CHECKING:
    from .._peer import Peer

logger = logging.getLogger("localnet.nats")

HEARTBEAT = 0.5  # seconds between a peer's presence messages
EXPIRY = 2.0  # a peer not heard of for this long has left
#: What a remote record keeps of a peer's registration (the rest is local).
_SHARED = ("name", "pid", "started", "since", "user", "group", "hub", "connections",
           "events", "executable")


def token(text: str) -> str:
    """``text`` as one NATS subject token."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "-"


class NatsLink:
    """Presence, the directory of other hosts' peers, and calls across hosts."""

    def __init__(self, peer: Peer, config: NatsConfig) -> None:
        self._peer = self.peer = peer
        self.config = config
        self.host = config.host
        self.qualified = f"{peer.name}@{config.host}"
        self.session = f"{os.getpid()}-{secrets.token_hex(6)}"  # this run's event numbering
        self._hb = self.subject("hb", self.qualified)
        self._bye = self.subject("bye", self.qualified)
        self._calls = self.subject("call", self.qualified)
        self.events = RemoteEvents(self)
        self.inboxes = Inboxes(self)
        self.calls = RemoteCalls(self)
        self.parts = Parts(self)
        self._lock = threading.Lock()
        self._directory: dict[str, tuple[dict[str, Any], float]] = {}  # name@host -> record
        self.version = 0  # changes whenever a peer comes, goes or changes its subscriptions
        self._nc: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._closed = False
        self._joined = threading.Event()  # connected at least once
        self._joined_at = 0.0
        self._ticked = 0.0  # the presence loop's last round (see _sweep)

    @property
    def nc(self) -> Any:
        """The NATS connection (None until joined)."""
        return self._nc

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the connection lives on."""
        return self._loop

    def subject(self, kind: str, qualified: str) -> str:
        """``<ns>.<kind>.<host>.<name>`` for the peer ``name@host``."""
        name, _, host = qualified.rpartition("@")
        return f"{self.config.namespace}.{kind}.{token(host)}.{token(name)}"

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Connect (in the background: an unreachable server delays nothing)."""
        self._loop = _loop.owned()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    def wait_joined(self, timeout: float) -> bool:
        """True once connected to the server (for tests and tools)."""
        return self._joined.wait(timeout)

    def wait_directory(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) until the directory has heard every other peer at
        least once: one presence period after joining.  True if joined."""
        deadline = time.monotonic() + timeout
        if not self._joined.wait(timeout):
            return False
        remaining = self._joined_at + HEARTBEAT * 1.5 - time.monotonic()
        if remaining > 0:
            time.sleep(min(remaining, max(0.0, deadline - time.monotonic())))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Say goodbye and disconnect; idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._leave(), loop).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError) as exc:
                logger.debug("leaving NATS: %s", exc)
            except Exception as exc:  # noqa: BLE001 - closing goes on whatever the server does
                logger.debug("leaving NATS: %s", exc)
        if self._task is not None:
            self._task.cancel()  # (still connecting, to a server that is not there)
        self.calls.close()
        self.events.close()
        self.inboxes.close()

    async def _run(self) -> None:
        import nats

        told: list[bool] = [False]

        def unreachable(reason: object) -> None:
            if not told[0] and not self._joined.is_set() and not self._closed:
                told[0] = True
                logger.warning("peer %r cannot reach NATS at %s (%s); it works on its own "
                               "host and joins when the server is back", self._peer.name,
                               ", ".join(self.config.servers), reason)

        # (nats-py keeps trying to connect by itself: say so once if it takes long)
        later = asyncio.get_running_loop().call_later(
            2.5, unreachable, "no answer within 2.5 s")
        nc = None
        while not self._closed:
            try:
                nc = await nats.connect(
                    list(self.config.servers), name=f"localnet {self._peer.name}@{self.host}",
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                    **self.config.options)
                break
            except Exception as exc:  # noqa: BLE001 - retried until it works or we close
                unreachable(exc)
                await asyncio.sleep(1.0)
        later.cancel()
        if nc is None:
            return
        if self._closed:
            await nc.close()
            return
        self._nc = nc
        ns = self.config.namespace
        await nc.subscribe(f"{ns}.hb.>", cb=self._on_heartbeat)
        await nc.subscribe(f"{ns}.bye.>", cb=self._on_bye)
        await nc.subscribe(self._calls, cb=self.calls.on_call)
        await nc.subscribe(self.subject("part", self.qualified), cb=self.parts.on_part)
        await nc.subscribe(self.subject("pull", self.qualified), cb=self.parts.on_pull)
        await nc.subscribe(self.subject("ev", self.qualified), cb=self._on_events)
        await nc.subscribe(self.subject("ack", self.qualified), cb=self._on_ack)
        await nc.subscribe(self.subject("ctl", self.qualified), cb=self._on_control)
        if told[0]:
            logger.warning("peer %r joined NATS at %s", self._peer.name, nc.connected_url)
        self._joined_at = self._ticked = time.monotonic()
        self._joined.set()
        while not self._closed:
            now = time.monotonic()
            stalled = now - self._ticked - HEARTBEAT
            if stalled > HEARTBEAT / 2:
                # This process held the loop up (a long pickle, say): the others'
                # presence waits unread; it does not count against them.
                with self._lock:
                    self._directory = {k: (r, until + stalled)
                                       for k, (r, until) in self._directory.items()}
            self._ticked = now
            if nc.is_connected:
                try:
                    await nc.publish(self._hb, self._presence())
                except Exception as exc:  # noqa: BLE001 - the next beat tries again
                    logger.debug("heartbeat not sent: %s", exc)
            self._sweep()
            with self._lock:
                present = set(self._directory)
            self.events.tick(time.monotonic(), present)
            self.parts.sweep(time.monotonic())
            await asyncio.sleep(HEARTBEAT)

    async def _leave(self) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            if nc.is_connected:
                await nc.publish(self._bye, b"")
                await nc.flush(timeout=1)
        finally:
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        logger.debug("NATS: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("peer %r lost its NATS server; it works on its own host until it "
                           "reconnects", self._peer.name)

    async def _on_reconnected(self) -> None:
        logger.warning("peer %r reconnected to NATS", self._peer.name)
        self.events.resend_all()  # what was on its way may be lost: again, from the unacked

    # -- the directory ------------------------------------------------------------
    def _presence(self) -> bytes:
        registration = self._peer._local.registration()  # noqa: SLF001 - its own record
        info = registration["info"]
        record = {key: info.get(key) for key in _SHARED}
        record["host"] = self.host
        record["subs"] = registration["subs"]  # (this process's, if this peer receives)
        return json.dumps(record, separators=(",", ":")).encode()

    async def _on_heartbeat(self, msg: Any) -> None:
        self._learn(msg.data, msg.subject)

    async def _on_control(self, msg: Any) -> None:
        """A peer's record, sent to us to be known at once (see :meth:`confirm`)."""
        self._learn(msg.data, msg.subject)
        await msg.respond(b"ok")

    def _learn(self, data: bytes, subject: str) -> None:
        try:
            record = json.loads(data)
            name, host = record["name"], record["host"]
            if not isinstance(name, str) or not isinstance(host, str):
                raise ValueError("name and host are strings")
        except (ValueError, KeyError, TypeError) as exc:
            logger.debug("ignoring a malformed presence on %s: %s", subject, exc)
            return
        if host == self.host:
            return  # this host's peers are the registry's
        key = f"{name}@{host}"
        with self._lock:
            old = self._directory.get(key)
            if old is None or old[0].get("pid") != record.get("pid") \
                    or old[0].get("subs") != record.get("subs"):
                self.version += 1  # (who subscribes to what changed: routes again)
            self._directory[key] = (record, time.monotonic() + EXPIRY)

    async def _on_bye(self, msg: Any) -> None:
        parts = msg.subject.split(".")
        with self._lock:
            for key, (record, _) in list(self._directory.items()):
                if token(record["host"]) == parts[-2] and token(record["name"]) == parts[-1]:
                    del self._directory[key]
                    self.version += 1

    def _sweep(self) -> None:
        """Forget the peers not heard of for ``EXPIRY`` s; not while this process's
        own loop is behind (its unread messages may hold their presence)."""
        now = time.monotonic()
        if now - self._ticked > 2 * HEARTBEAT:
            return
        with self._lock:
            for key in [k for k, (_, until) in self._directory.items() if until < now]:
                del self._directory[key]
                self.version += 1

    def peers(self) -> list[dict[str, Any]]:
        """The other hosts' live peers, as records named ``name@host``."""
        self._sweep()
        with self._lock:
            return [_as_remote(key, record) for key, (record, _) in self._directory.items()]

    def lookup(self, name: str) -> dict[str, Any] | None:
        """The record of ``name@host``, or of a bare ``name`` only one other host has."""
        self._sweep()
        with self._lock:
            found = self._directory.get(name)
            if found is not None:
                return _as_remote(name, found[0])
            if "@" not in name:
                matches = [(k, r) for k, (r, _) in self._directory.items()
                           if r["name"] == name]
                if len(matches) == 1:
                    return _as_remote(*matches[0])
        return None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._directory)

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name@host, record)`` of every other host's live peer."""
        with self._lock:
            return [(key, record) for key, (record, _) in self._directory.items()]

    def confirm(self, timeout: float) -> None:
        """Send this peer's record to every other host's peer and wait (up to
        ``timeout``) until each has it: from then on their triggers reach our new
        subscriptions.  (Peers that do not answer in time learn it from the next
        presence message.)"""
        nc, loop = self._nc, self._loop
        if nc is None or loop is None or not nc.is_connected:
            return
        presence = self._presence()
        targets = [self.subject("ctl", key) for key, _ in self.records()]

        async def ask() -> None:
            await asyncio.gather(*(nc.request(subject, presence, timeout=timeout)
                                   for subject in targets), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout + 1.0)
        except Exception as exc:  # noqa: BLE001 - the presence messages go on anyway
            logger.debug("confirming subscriptions: %s", exc)

    # -- events ---------------------------------------------------------------------
    def max_payload(self) -> int:
        """The server's message limit (NATS's default until connected)."""
        nc = self._nc
        return int(nc.max_payload) if nc is not None and nc.max_payload else 1024 * 1024

    def soon(self, send: Any) -> bool:
        """Run ``send()`` (a coroutine function) on the link's loop, if connected;
        False when not."""
        loop, nc = self._loop, self._nc
        if loop is None or nc is None or not nc.is_connected or self._closed:
            return False
        asyncio.run_coroutine_threadsafe(send(), loop)
        return True

    async def publish(self, subject: str, body: bytes,
                      headers: dict[str, str] | None = None) -> None:
        nc = self._nc
        if nc is not None:
            await nc.publish(subject, body, headers=headers)

    async def _on_events(self, msg: Any) -> None:
        headers, data = msg.headers or {}, msg.data
        if "t" in headers:  # the last part of one large event (see _parts)
            whole = await self.parts.assemble(headers, data)
            if whole is None and self.parts.too_large(headers):
                self.inboxes.on_events(headers, None)  # failed, and acknowledged so
            elif whole is not None:  # (parts missing: unacknowledged, sent again)
                self.inboxes.on_events(headers, whole)
            return
        self.inboxes.on_events(headers, data)

    async def _on_ack(self, msg: Any) -> None:
        self.events.on_ack(msg.data)

    def acknowledge(self, publisher: str, session: str, upto: int,
                    failed: list[list[int]]) -> None:
        """Tell ``publisher`` (any thread) which of its events this peer handled."""
        body = json.dumps({"sub": self.qualified, "s": session, "upto": upto,
                           "failed": failed}).encode()
        subject = self.subject("ack", publisher)

        async def send() -> None:
            await self.publish(subject, body)

        self.soon(send)

    # -- calls ------------------------------------------------------------------------
def _as_remote(key: str, record: dict[str, Any]) -> dict[str, Any]:
    """A directory record as a RemotePeer's info: named ``name@host``, no local address."""
    info = dict(record)
    info["name"] = key
    info["address"] = ""
    info.setdefault("started", 0.0)
    return info
