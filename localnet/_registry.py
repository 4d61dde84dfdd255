"""The registry server: naming, discovery and the subscription table.

One registry process serves one runtime directory, on ``registry.sock``.
It holds an exclusive ``flock`` on ``registry.lock`` for its whole life (so
two can never serve one directory; the kernel drops the lock when it dies)
and writes its pid to ``registry.pid``.

Peers keep one connection open to it.  Over that connection a peer sends
``REQUEST`` frames (JSON ``[operation, arguments]``) and gets ``RESPONSE``
frames (JSON ``{"ok": ..., "value" | "error": ...}``); the registry sends
``PUSH`` frames (lists of subscription changes) that the peer acknowledges
with ``PUSH_ACK``.  Operations:

=============== ============================================ =======================
operation       arguments                                    value
=============== ============================================ =======================
register        info (name, pid, started, ...), subs         null
unregister      {}                                           null
update          connections, events                          null
subscribe       sub (id, event, peers, group, hubs_only)     null
unsubscribe     id                                           null
hand_over       to (a peer of the requester's own process)   null
list            {}                                           [info, ...]
lookup          name                                         info or null
=============== ============================================ =======================

The registry never relays calls or events: it tells each publisher which
subscribers match it (``["add", event, subscriber]`` / ``["remove", event,
name]``), and waits for every live publisher to acknowledge a change before
answering the ``subscribe`` or ``register`` that caused it.  That is what
lets a subscription reach publishers that exist now *and* ones that start
later, with no window in between.  ``hand_over`` moves the requester's
subscriptions to another peer of the same process in one change, so each
publisher switches from one to the other between two events: none goes to
both, none to neither.

A peer is forgotten when its connection closes or when psutil shows its
process (pid + creation time) has gone; the publishers are told at once.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import math
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import _liveness, _paths
from ._listen import Backoff
from ._signals import Stopper, reset_inherited, spawn_thread, wait_for_stop
from ._wire import FrameReader, Kind, ProtocolError, decode_control, encode_control, send_frame

logger = logging.getLogger("localnet.registry")

PUSH_ACK_TIMEOUT = 2.0  # how long a subscribe waits for one publisher's acknowledgement
SWEEP_INTERVAL = 0.5  # psutil liveness sweep
RECOVERY_GRACE = 2.0  # how long, from its first accept, a new registry holds joins for the others
SEND_TIMEOUT = 2.0  # a peer that does not drain its socket for this long is dropped
DEFAULT_IDLE_EXIT = 30.0  # a spawned registry exits after this long with no peers


_Waits = list[tuple["_Conn", threading.Event]]
# Operations answered only once the peers expected after a registry restart
# are back (see Registry._await_recovery); a peer's own re-registration says
# "again" and is not held.
_AFTER_RECOVERY = frozenset({"register", "subscribe", "list"})
_Answer = tuple[Any, _Waits]


_DONE = threading.Event()
_DONE.set()


class RequestError(Exception):
    """An operation refused; ``code`` names the public exception the client raises."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


@dataclass
class _Sub:
    id: str
    event: str
    peers: list[str] | None
    group: str | None
    hubs_only: bool

    def matches(self, publisher: dict[str, Any]) -> bool:
        if self.peers is not None and publisher["name"] not in self.peers:
            return False
        if self.group is not None and publisher.get("group") != self.group:
            return False
        return not self.hubs_only or bool(publisher.get("hub"))

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "peers": self.peers,
                "group": self.group, "hubs_only": self.hubs_only}


@dataclass
class _Member:
    conn: _Conn
    info: dict[str, Any]
    subs: dict[str, _Sub] = field(default_factory=dict)
    # (event, subscriber name) -> the subscriber process it was told about
    told: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    def subscriber_entry(self) -> dict[str, Any]:
        keys = ("name", "pid", "started", "ticks", "address", "group", "hub")
        return {k: self.info.get(k) for k in keys}

    @property
    def identity(self) -> tuple[Any, ...]:
        """Which process holds the name: a name taken over is another subscriber."""
        return (self.info["pid"], self.info["started"], self.info.get("ticks"),
                self.info["address"])

    def public_info(self) -> dict[str, Any]:
        info = dict(self.info)
        info["subscriptions"] = [s.describe() for s in self.subs.values()]
        return info


class _Conn:
    """One peer's connection to the registry."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.reader = FrameReader(sock, max_frame=max_frame, with_fds=False)
        self.send_lock = threading.Lock()
        self.acks: dict[int, threading.Event] = {}
        self.member: _Member | None = None
        self.closed = False
        self._next_push = 0

    def send(self, kind: Kind, ident: int, obj: object) -> None:
        body = encode_control(obj)
        with self.send_lock:
            send_frame(self.sock, kind, ident, body)

    def push(self, changes: list[list[Any]]) -> threading.Event:
        done = threading.Event()
        with self.send_lock:
            self._next_push += 1
            ident = self._next_push
            self.acks[ident] = done
            try:
                send_frame(self.sock, Kind.PUSH, ident, encode_control(changes))
            except OSError:
                self.acks.pop(ident, None)
                done.set()
                self.shutdown()
        return done

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _requester(conn: _Conn, args: dict[str, Any]) -> int | None:
    """The pid of the process behind a request, as far as it says."""
    if conn.member is not None:
        return int(conn.member.info["pid"])
    info = args.get("info")
    pid = info.get("pid") if isinstance(info, dict) else None
    return pid if type(pid) is int else None


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RequestError("ProtocolError", f"{what} must be a string or null")


def _parse_sub(raw: Any) -> _Sub:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) \
            or not isinstance(raw.get("event"), str):
        raise RequestError("ProtocolError", "a subscription needs string 'id' and 'event'")
    peers = raw.get("peers")
    if peers is not None and not (isinstance(peers, list)
                                  and all(isinstance(p, str) for p in peers)):
        raise RequestError("ProtocolError", "subscription 'peers' must be a list of names")
    return _Sub(raw["id"], raw["event"], peers, _opt_str(raw.get("group"), "group"),
                bool(raw.get("hubs_only", False)))


_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "pid": (int,), "started": (int, float), "address": (str,),
}


def _parse_info(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RequestError("ProtocolError", "registration info must be an object")
    for key, types in _INFO_TYPES.items():
        if not isinstance(raw.get(key), types) or isinstance(raw.get(key), bool):
            raise RequestError("ProtocolError", f"registration info needs {key!r}")
    if not raw["name"] or len(raw["name"]) > 255:
        raise RequestError("ProtocolError", "peer names are 1 to 255 characters")
    if raw["pid"] <= 0 or not math.isfinite(raw["started"]):
        raise RequestError("ProtocolError", "registration info needs a real pid and start time")
    _opt_str(raw.get("group"), "group")
    ticks = raw.get("ticks")
    if ticks is not None and (type(ticks) is not int or ticks < 0):
        raise RequestError("ProtocolError", "'ticks' is a process start time in clock ticks")
    for key in ("connections", "events"):
        value = raw.setdefault(key, [])
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RequestError("ProtocolError", f"{key!r} must be a list of strings")
    return raw


class Registry:
    """The registry server for one runtime directory.

    ``serve_forever()`` blocks until ``stop()`` (or SIGINT/SIGTERM when run
    from the command line).  ``idle_exit`` (seconds) makes it stop once no
    peer has been registered for that long; ``None`` serves forever.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 idle_exit: float | None = None,
                 max_frame: int = 1024 * 1024) -> None:
        self.directory = _paths.runtime_dir(directory)
        self.address = str(self.directory / _paths.REGISTRY_SOCKET)
        self.idle_exit = idle_exit
        self.max_frame = max_frame
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._recovering_until = 0.0
        # After replacing a dead registry: pid -> None until that live peer
        # registered again, then the event set once it applied its first
        # push (its routes to the subscribers known by then).
        self._expected: dict[int, threading.Event | None] = {}
        self._members: dict[str, _Member] = {}
        self._conns: set[_Conn] = set()
        self._stopping = threading.Event()
        self._stopper = Stopper()
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._idle_since: float | None = time.monotonic()
        self._departed: list[tuple[float, dict[str, Any]]] = []

    def __repr__(self) -> str:
        state = "STOPPED" if self._stopping.is_set() else "SERVING"
        return f"<Registry {self.address!r} peers={len(self._members)} [{state}]>"

    # -- life cycle -----------------------------------------------------
    def acquire(self) -> bool:
        """Take the directory's registry lock and bind; False when another registry holds it."""
        fd = os.open(self.directory / _paths.REGISTRY_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        os.chmod(self.address, 0o600)
        listener.listen(256)
        self._listener = listener
        pid_file = self.directory / _paths.REGISTRY_PID
        if pid_file.exists():
            # The previous registry died without cleaning up: its peers are
            # about to register again.  Lookups of names not back yet wait a
            # moment instead of answering "not found".
            self._recovering_until = time.monotonic() + RECOVERY_GRACE
            logger.info("replacing a registry that died; peers are expected back")
        pid_file.write_text(f"{os.getpid()}\n")
        live = self._remove_stale_sockets()
        if self._recovering_until:
            self._expected = dict.fromkeys(live - {os.getpid()})
        return True

    def _remove_stale_sockets(self) -> set[int]:
        """Remove socket files left by peers whose process no longer exists.

        Returns the pids of the processes whose socket files remain.
        """
        live = set()
        for path in self.directory.glob("p-*.sock"):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if psutil.pid_exists(pid):
                live.add(pid)
            else:
                self._remove_socket(str(path))
        return live

    def _await_recovery(self, requester: int | None) -> None:
        """After a registry restart, wait until the peers that were live are back.

        A peer that joins, subscribes or lists right after a registry
        restart must not be answered before the live publishers registered
        again and applied their routes: events they trigger after the
        answer would otherwise not reach the newcomer.  Bounded by
        ``RECOVERY_GRACE`` from the registry's start; peers that die
        meanwhile are not waited for, nor is the requester's own process
        (a new peer's socket file may predate the registry).
        """
        with self._lock:
            while True:
                remaining = self._recovering_until - time.monotonic()
                if remaining <= 0 or not self._expected:
                    if self._expected:
                        logger.warning("peers %s did not register again in time; going on",
                                       sorted(p for p, e in self._expected.items()
                                              if e is None or not e.is_set()))
                    self._expected.clear()
                    return
                for pid in [p for p, e in self._expected.items() if e is None]:
                    if not psutil.pid_exists(pid):
                        del self._expected[pid]  # died meanwhile: nothing to wait for
                waiting = [e for p, e in self._expected.items() if p != requester]
                if None not in waiting:
                    applied = [e for e in waiting if e is not None]
                    break
                self._registered.wait(min(remaining, 0.05))
        for done in applied:
            if not done.wait(max(0.0, self._recovering_until - time.monotonic())):
                return

    def serve_forever(self) -> None:
        """Accept peers until :meth:`stop` or SIGINT/SIGTERM; call :meth:`acquire` first.

        Run from the main thread, it handles the signals itself.
        """
        assert self._listener is not None, "acquire() first"
        if self._recovering_until:
            # The grace counts from the first accept, not from acquire():
            # a registry started on a loaded machine may take seconds to get
            # here, and the peers cannot register again before it does.
            self._recovering_until = time.monotonic() + RECOVERY_GRACE
        spawn_thread(self._sweep_loop, name="localnet-registry-sweep")
        logger.info("registry serving %s (pid %d)", self.address, os.getpid())
        if threading.current_thread() is not threading.main_thread():
            self._accept_loop()
            return
        acceptor = spawn_thread(self._accept_loop, name="localnet-registry-accept")
        try:
            wait_for_stop(self._stopper)
        finally:
            self.stop()
            acceptor.join(5.0)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        # Out of descriptors, accept() fails at once until some are freed:
        # back off instead of spinning, or of giving up on every peer.
        backoff = Backoff(self.address)
        try:
            while not self._stopping.is_set():
                try:
                    sock, _ = self._listener.accept()
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    backoff.failed(exc)
                    continue
                backoff.succeeded()
                if not _liveness.same_user(sock):
                    logger.warning("refused a registry connection from another user")
                    sock.close()
                    continue
                spawn_thread(self._serve_conn, sock, name="localnet-registry-conn")
        finally:
            self._cleanup()

    def stop(self) -> None:
        """Stop serving; idempotent and safe from any thread or signal handler."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stopper.stop()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _cleanup(self) -> None:
        self._bury()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        if self._listener is not None:
            self._listener.close()
        for name in (_paths.REGISTRY_SOCKET, _paths.REGISTRY_PID):
            try:
                os.unlink(self.directory / name)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        logger.info("registry stopped")

    # -- connections ----------------------------------------------------
    def _serve_conn(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), 0))
        conn = _Conn(sock, self.max_frame)
        with self._lock:
            self._conns.add(conn)
        try:
            while True:
                kind, ident, body, _ = conn.reader.read()
                if kind == Kind.REQUEST:
                    self._answer(conn, ident, body)
                elif kind == Kind.PUSH_ACK:
                    done = conn.acks.pop(ident, None)
                    if done is not None:
                        done.set()
                elif kind != Kind.HELLO:
                    raise ProtocolError(f"unexpected {Kind(kind).name} frame at the registry")
        except EOFError:
            pass
        except (ProtocolError, OSError) as exc:
            logger.warning("closing a registry connection: %s", exc)
        except Exception:
            logger.exception("registry connection failed")
        finally:
            conn.closed = True
            for done in list(conn.acks.values()):
                done.set()
            with self._lock:
                self._conns.discard(conn)
                member = conn.member
                if member is not None and self._members.get(member.name) is member:
                    self._forget(member, "disconnected")
                    self._sync()  # removals need no acknowledgement
            sock.close()
            conn.reader.close()

    def _answer(self, conn: _Conn, ident: int, body: bytes | bytearray) -> None:
        waits: _Waits = []
        try:
            message = decode_control(body)
            if not (isinstance(message, list) and len(message) == 2
                    and isinstance(message[0], str) and isinstance(message[1], dict)):
                raise RequestError("ProtocolError", "a request is [operation, {arguments}]")
            op, args = message
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise RequestError("ProtocolError", f"unknown registry operation {op!r}")
            if self._expected and op in _AFTER_RECOVERY and not args.get("again"):
                self._await_recovery(_requester(conn, args))
            with self._lock:
                value, waits = handler(conn, args)
            deadline = time.monotonic() + PUSH_ACK_TIMEOUT
            for target, done in waits:
                if target is conn:
                    # The requester reads its own pushes before this answer, in
                    # order; its acknowledgement is read by this very thread.
                    continue
                if not done.wait(max(0.0, deadline - time.monotonic())):
                    logger.warning("a peer did not acknowledge a subscription change in time")
            reply: dict[str, Any] = {"ok": True, "value": value}
        except RequestError as exc:
            reply = {"ok": False, "error": exc.code, "message": str(exc), "details": exc.details}
        except ProtocolError as exc:
            reply = {"ok": False, "error": "ProtocolError", "message": str(exc), "details": {}}
        conn.send(Kind.RESPONSE, ident, reply)

    # -- operations (called with self._lock held) ------------------------
    def _member_of(self, conn: _Conn) -> _Member:
        if conn.member is None or self._members.get(conn.member.name) is not conn.member:
            raise RequestError("NotRegistered", "register first")
        return conn.member

    def _op_register(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        info = _parse_info(args.get("info"))
        if os.path.dirname(os.path.abspath(info["address"])) != str(self.directory):
            raise RequestError("ProtocolError", "a peer's address is a socket in the "
                               "registry's directory")
        subs = args.get("subs", [])
        if not isinstance(subs, list):
            raise RequestError("ProtocolError", "'subs' must be a list")
        parsed = [_parse_sub(s) for s in subs]
        if conn.member is not None:
            raise RequestError("ProtocolError", "this connection already registered a peer")
        name = info["name"]
        holder = self._members.get(name)
        if holder is not None:
            if not holder.conn.closed and _liveness.is_alive(holder.info["pid"],
                                                             holder.info["started"],
                                                             holder.info.get("ticks")):
                raise RequestError("NameTaken", f"peer name {name!r} is taken",
                                   name=name, pid=holder.info["pid"])
            logger.info("reclaiming name %r from dead pid %s", name, holder.info["pid"])
            self._forget(holder, "dead")
        member = _Member(conn, info, {s.id: s for s in parsed})
        self._members[name] = member
        self._registered.notify_all()
        conn.member = member
        self._idle_since = None
        # The new peer's own table goes out as its first push, under the lock,
        # so that it is ordered before every later change.
        waits = self._sync()
        if info["pid"] in self._expected:
            own = [done for target, done in waits if target is conn]
            self._expected[info["pid"]] = own[-1] if own else _DONE
            self._registered.notify_all()
        logger.debug("registered %r (pid %s)", name, info["pid"])
        return None, waits

    def _op_unregister(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        member = self._member_of(conn)
        self._forget(member, "unregistered")
        conn.member = None
        return None, self._sync()

    def _op_update(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        member = self._member_of(conn)
        for key in ("connections", "events"):
            value = args.get(key)
            if value is not None:
                if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise RequestError("ProtocolError", f"{key!r} must be a list of strings")
                member.info[key] = value
        return None, []

    def _op_subscribe(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        member = self._member_of(conn)
        sub = _parse_sub(args.get("sub"))
        member.subs[sub.id] = sub
        return None, self._sync()

    def _op_unsubscribe(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        member = self._member_of(conn)
        member.subs.pop(str(args.get("id")), None)
        return None, self._sync()

    def _op_hand_over(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        member = self._member_of(conn)
        name = str(args.get("to"))
        heir = self._members.get(name)
        if heir is None or heir.conn.closed:
            raise RequestError("PeerNotFound", f"no live peer named {name!r}", name=name)
        if (heir.info["pid"], heir.info["started"]) != (member.info["pid"],
                                                       member.info["started"]):
            raise RequestError("ProtocolError", "subscriptions are handed over only to a "
                               "peer of the same process")
        heir.subs.update(member.subs)
        member.subs = {}
        return None, self._sync()

    def _op_list(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        hung_up = self._hung_up()
        return [m.public_info() for m in self._members.values() if m.conn not in hung_up], []

    def _hung_up(self) -> set[_Conn]:
        """Members whose connection has closed but whose thread has not caught up yet.

        A peer killed a moment ago must not be listed: one poll() over every
        member's socket tells, without a psutil call per peer.
        """
        poller = select.poll()
        by_fd = {}
        for member in self._members.values():
            try:
                fd = member.conn.sock.fileno()
            except OSError:
                continue
            if fd >= 0:
                by_fd[fd] = member.conn
                poller.register(fd, select.POLLRDHUP)
        return {by_fd[fd] for fd, events in poller.poll(0)
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)}

    def _op_lookup(self, conn: _Conn, args: dict[str, Any]) -> _Answer:
        name = str(args.get("name"))
        member = self._members.get(name)
        while member is None and time.monotonic() < self._recovering_until:
            self._registered.wait(self._recovering_until - time.monotonic())
            member = self._members.get(name)
        return (member.public_info() if member is not None else None), []

    # -- the subscription table -----------------------------------------
    def _desired(self, publisher: _Member) -> dict[tuple[str, str], _Member]:
        """Every (event, subscriber) pair whose subscription matches ``publisher``."""
        wanted: dict[tuple[str, str], _Member] = {}
        for subscriber in self._members.values():
            for sub in subscriber.subs.values():
                key = (sub.event, subscriber.name)
                if key not in wanted and sub.matches(publisher.info):
                    wanted[key] = subscriber
        return wanted

    def _sync(self) -> _Waits:
        """Push to every publisher the difference between what it knows and what matches.

        A pair is compared by name *and* process: when a new process took a
        name over before the old holder's departure was pushed, the publisher
        is told to remove the old one and add the new one, in that order.
        """
        waits = []
        for publisher in self._members.values():
            if publisher.conn.closed:
                continue
            desired = self._desired(publisher)
            told = publisher.told
            changes: list[list[Any]] = [
                ["remove", event, name] for (event, name), identity in told.items()
                if (event, name) not in desired or desired[(event, name)].identity != identity
            ]
            changes += [["add", event, subscriber.subscriber_entry()]
                        for (event, name), subscriber in desired.items()
                        if told.get((event, name)) != subscriber.identity]
            if changes:
                publisher.told = {key: s.identity for key, s in desired.items()}
                waits.append((publisher.conn, publisher.conn.push(changes)))
        return waits

    def _forget(self, member: _Member, why: str) -> None:
        if self._members.get(member.name) is member:
            del self._members[member.name]
            logger.debug("forgot %r (%s)", member.name, why)
        if why != "unregistered":
            # A peer that died leaves its socket file; remove it once psutil
            # confirms the death (a dying process may still look alive briefly).
            self._departed.append((time.monotonic() + 10.0, member.info))
        if not self._members:
            self._idle_since = time.monotonic()

    def _remove_socket(self, address: str, pid: int | None = None) -> None:
        """Remove a dead peer's socket file: only ``p-<pid>-*.sock`` in this directory.

        The pid in the name must be the dead peer's own, so a registration
        naming somebody else's socket cannot get it deleted.
        """
        path = os.path.abspath(address)
        name = os.path.basename(path)
        prefix = "p-" if pid is None else f"p-{pid}-"
        if os.path.dirname(path) == str(self.directory) and name.startswith(prefix) \
                and name.endswith(".sock"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _bury(self) -> None:
        with self._lock:
            departed, self._departed = self._departed, []
        keep = []
        now = time.monotonic()
        for until, info in departed:
            if not _liveness.is_alive(info["pid"], info["started"], info.get("ticks")):
                self._remove_socket(str(info["address"]), int(info["pid"]))
            elif now < until:
                keep.append((until, info))
        with self._lock:
            self._departed.extend(keep)

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(SWEEP_INTERVAL):
            with self._lock:
                members = list(self._members.values())
            dead = [m for m in members
                    if not _liveness.is_alive(m.info["pid"], m.info["started"],
                                              m.info.get("ticks"))]
            if dead:
                with self._lock:
                    for member in dead:
                        self._forget(member, "process gone")
                    self._sync()
                for member in dead:
                    member.conn.shutdown()
            self._bury()
            with self._lock:
                idle = self._idle_since
                busy = bool(self._members) or bool(self._conns)
            if (self.idle_exit is not None and idle is not None and not busy
                    and time.monotonic() - idle > self.idle_exit):
                logger.info("no peers for %.0f s; exiting", self.idle_exit)
                self.stop()


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    A registry started by a peer inherits that peer's limit, whatever it is,
    and holds a descriptor per live peer (plus a thread): it takes all the
    kernel allows the user.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            logger.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard,
                           exc)


def main(argv: list[str] | None = None) -> int:
    """Run a registry: ``python -m localnet._registry [--spawned] [--ready-fd N]``."""
    parser = argparse.ArgumentParser(prog="localnet-registry")
    parser.add_argument("--directory", default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--idle-exit", type=float, default=None)
    parser.add_argument("--detach", action="store_true",
                        help="start a new session (when spawned by a peer)")
    options = parser.parse_args(argv)
    # A registry that blocks SIGTERM could not be stopped: clear the mask.
    # Started by a peer (--detach), it went through a shell that ignores
    # SIGINT and SIGQUIT for background commands: undo that too.  In the
    # foreground, dispositions the user chose (nohup) stay.
    reset_inherited(dispositions=options.detach)
    _raise_descriptor_limit()
    if options.detach:
        os.setsid()
    if os.environ.get("LOCALNET_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        # A detached registry has no terminal: it logs to a file beside its socket.
        target = {"filename": os.path.join(_paths.runtime_dir(options.directory),
                                           "registry.log")} if options.detach \
            else {"stream": sys.stderr}
        logging.basicConfig(level=logging.DEBUG,
                            format="%(asctime)s registry[%(process)d] %(message)s", **target)
    ready = os.fdopen(options.ready_fd, "w") if options.ready_fd is not None else None
    try:
        registry = Registry(options.directory, idle_exit=options.idle_exit)
        acquired = registry.acquire()
    except Exception as exc:
        if ready is not None:
            ready.write(f"error {exc}\n")
            ready.close()
        raise
    if not acquired:
        if ready is not None:
            ready.write("busy\n")
            ready.close()
        print(f"another registry already serves {registry.directory}", file=sys.stderr)
        return 1
    if ready is not None:
        ready.write("ready\n")
        ready.close()
    registry.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
