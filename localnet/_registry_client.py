"""A peer's side of the registry: find it or start it, and stay registered.

:func:`connect_registry` connects to the directory's registry and, when none
answers, starts one as a detached process.  A ``spawn.lock`` file lock makes
the many peers that may start at once spawn one registry between them (and
the registry's own lock makes a second one give up at once should two ever
start).  The new registry says ``ready`` on a pipe once it listens, so
nobody polls the socket.

:class:`RegistryClient` keeps the peer registered: a background thread reads
the registry's answers and subscription pushes, and when the registry dies
it starts a new one and registers again, subscriptions included.  Requests
made meanwhile wait for the new registry (bounded by their timeout) instead
of failing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _fork, _paths
from ._registry import DEFAULT_IDLE_EXIT
from ._signals import current_mask, spawn_thread, thread_mask
from ._wire import (
    FrameReader,
    Kind,
    ProtocolError,
    decode_control,
    encode_control,
    pack_header,
    send_frame,
)
from .errors import (
    ConnectionLost,
    LocalnetError,
    NameTaken,
    PeerClosed,
    RegistryUnavailable,
)

logger = logging.getLogger("localnet.registry")

# Not "-m localnet._registry": the package imports that module first, and
# runpy would warn about running a second copy of it.
_REGISTRY_MAIN = "import sys; from localnet._registry import main; sys.exit(main())"
_RETRY = object()


def _python() -> str:
    """The interpreter that runs a spawned registry.

    ``LOCALNET_PYTHON`` wins; an embedding application (whose
    ``sys.executable`` is not a Python) falls back to ``python3`` on PATH.
    """
    explicit = os.environ.get("LOCALNET_PYTHON")
    if explicit:
        return explicit
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return shutil.which("python3") or sys.executable


def _try_connect(address: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    return sock


def _brief_close(fd: int) -> None:
    """Close a descriptor opened by :func:`_lock` or :func:`_spawn`."""
    with _fork.brief_lock:
        _fork.brief_fds.discard(fd)
        os.close(fd)


def _lock(path: Path, deadline: float) -> int:
    """Take an exclusive flock on ``path`` before ``deadline``; returns the fd.

    A child forked meanwhile closes its copy (see localnet._fork): the lock
    lives as long as any copy, and a long-lived child would keep it from
    every other peer.  Close it with :func:`_brief_close`.
    """
    with _fork.brief_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        _fork.brief_fds.add(fd)
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                _brief_close(fd)
                raise RegistryUnavailable(f"timed out waiting for {path}") from None
            time.sleep(delay)  # flock has no timed wait; back off while another peer spawns
            delay = min(delay * 2, 0.02)


def _spawn(directory: Path, deadline: float, mask: frozenset[int]) -> None:
    """Start a registry that is nobody's child, and wait for it to say ready.

    ``/bin/sh`` starts it in the background and exits at once, so the
    registry belongs to init (or the nearest subreaper), not to the peer
    that happened to start it: no zombie if it dies while this process
    lives, and it outlives this process as the others need.  It starts
    with ``mask`` (not the blocked mask of localnet's thread that may be
    calling), and its ``main()`` clears what it inherited.
    """
    with _fork.brief_lock:  # a forked child's copy would hide the registry's exit (no EOF)
        read_end, write_end = os.pipe()
        _fork.brief_fds.update((read_end, write_end))
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    idle = os.environ.get("LOCALNET_REGISTRY_IDLE_EXIT", str(DEFAULT_IDLE_EXIT))
    try:
        with thread_mask(mask):
            launcher = subprocess.Popen(
                ["/bin/sh", "-c", '"$@" &', "sh", _python(), "-c", _REGISTRY_MAIN,
                 "--directory", str(directory), "--ready-fd", str(write_end),
                 "--idle-exit", idle, "--detach"],
                pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env,
            )
        launcher.wait(max(0.1, deadline - time.monotonic()))
    except (OSError, subprocess.TimeoutExpired) as exc:
        _brief_close(read_end)
        raise RegistryUnavailable(f"cannot start the registry: {exc}") from exc
    finally:
        _brief_close(write_end)
    try:
        answer = b""
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        while not answer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise RegistryUnavailable("the registry did not start in time")
            chunk = os.read(read_end, 512)
            if not chunk:
                break
            answer += chunk
    finally:
        _brief_close(read_end)
    text = answer.decode(errors="replace").strip()
    if text not in ("ready", "busy"):
        raise RegistryUnavailable(
            f"the registry failed to start ({text or 'it exited'}); "
            "run 'localnet registry' in a terminal to see why"
        )


def connect_registry(directory: Path, timeout: float = 5.0,
                     mask: frozenset[int] | None = None) -> socket.socket:
    """Connect to the directory's registry, starting one when none answers.

    A registry it starts inherits ``mask`` as its signal mask (by default
    the calling thread's).

    Raises:
        RegistryUnavailable: no registry could be reached or started in time.
    """
    address = str(directory / _paths.REGISTRY_SOCKET)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        sock = _try_connect(address)
        if sock is not None:
            return sock
        fd = _lock(directory / _paths.SPAWN_LOCK, deadline)
        try:
            sock = _try_connect(address)
            if sock is None:
                _spawn(directory, deadline, current_mask() if mask is None else mask)
                sock = _try_connect(address)
        finally:
            _brief_close(fd)
        if sock is not None:
            return sock
        # The registry started answered "busy": another one holds the
        # directory's lock without listening.  It is starting (run by hand),
        # or it was just killed and the kernel has not released its lock
        # yet; either way the next round finds a registry that answers.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RegistryUnavailable(f"no registry answers on {address}")
        time.sleep(min(delay, remaining))  # bounded back-off while the other one starts or ends
        delay = min(delay * 2, 0.1)


def _send_whole(sock: socket.socket, kind: int, ident: int, body: bytes) -> bool:
    """Send a frame now, or not at all (False: the socket's buffer is full).

    A frame of one socket buffer (as requests are) leaves whole or not at
    all; a longer one that left in part is finished, waiting if need be.
    Raises OSError when the socket is broken.
    """
    frame = pack_header(kind, ident, len(body)) + body
    try:
        sent = sock.send(frame, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    if sent < len(frame):
        sock.sendall(frame[sent:])  # the rest of a started frame must follow
    return True


def _wait_writable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has room to send within ``timeout`` seconds (or is broken)."""
    if timeout <= 0:
        return False
    fd = sock.fileno()
    if fd < 0:  # closed meanwhile (the registry was lost): try again
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000.0))


class _Waiter:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None


def _raise_for(reply: dict[str, Any]) -> None:
    code, message = reply.get("error"), str(reply.get("message"))
    details = reply.get("details") or {}
    if code == "NameTaken":
        raise NameTaken(details.get("name", "?"), details.get("pid"))
    raise LocalnetError(f"the registry refused the request: {message}")


class RegistryClient:
    """A peer's registration, kept alive across registry restarts.

    ``registration()`` returns ``{"info": ..., "subs": [...]}`` and is called
    at every (re)registration; ``on_push(changes)`` applies subscription
    changes, in order, on the client's thread.
    """

    def __init__(self, directory: Path, registration: Callable[[], dict[str, Any]],
                 on_push: Callable[[list[Any]], None]) -> None:
        self.directory = directory
        self._registration = registration
        self._on_push = on_push
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._next_id = 0
        self._sock: socket.socket | None = None
        self._connected = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.recoveries = 0
        # The starting thread's mask: a registry restarted from the client's
        # own thread (which blocks signals) must not inherit that thread's.
        self._mask = current_mask()

    def __repr__(self) -> str:
        state = "CLOSED" if self._closing else "CONNECTED" if self._connected.is_set() \
            else "RECONNECTING"
        return f"<RegistryClient {str(self.directory)!r} [{state}]>"

    def start(self, timeout: float) -> None:
        """Connect (spawning the registry if needed) and register.

        Raises NameTaken or RegistryUnavailable.
        """
        deadline = time.monotonic() + timeout
        delay = 0.0
        while True:
            sock = connect_registry(self.directory, max(0.05, deadline - time.monotonic()),
                                    self._mask)
            try:
                reader = self._handshake(sock, deadline)
                break
            except (OSError, EOFError, ConnectionLost) as exc:
                # The registry died under us (killed while we registered):
                # a new one is started on the next round, as after a crash.
                sock.close()
                if time.monotonic() >= deadline:
                    raise RegistryUnavailable(
                        f"the registry in {self.directory} kept failing while this peer "
                        f"registered: {exc}") from exc
            except BaseException:
                sock.close()
                raise
            delay = min(max(delay * 2, 0.01), 0.2)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # back off, bounded
        self._thread = spawn_thread(self._run, sock, reader, name="localnet-registry-client")

    def _handshake(self, sock: socket.socket, deadline: float,
                   again: bool = False) -> FrameReader:
        """Register on a fresh connection; pushes that arrive first are applied.

        ``again``: registering with a new registry after the old one died
        (the registry holds new peers' answers until those are back).
        """
        reader = FrameReader(sock, with_fds=False)
        send_frame(sock, Kind.HELLO, 0, encode_control({"role": "registry-client"}))
        send_frame(sock, Kind.REQUEST, 0,
                   encode_control(["register", {**self._registration(), "again": again}]))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RegistryUnavailable("the registry did not answer the registration in time")
            try:
                kind, ident, body, _ = reader.read(remaining)
            except TimeoutError:
                continue
            except EOFError as exc:
                raise ConnectionLost("the registry closed the connection") from exc
            if kind == Kind.PUSH:
                self._apply_push(sock, ident, body)
            elif kind == Kind.RESPONSE and ident == 0:
                reply = decode_control(body)
                if not isinstance(reply, dict):
                    raise ProtocolError("malformed registry reply")
                if not reply.get("ok"):
                    _raise_for(reply)
                with self._lock:
                    self._sock = sock
                    self._connected.set()
                return reader

    def _apply_push(self, sock: socket.socket, ident: int, body: bytes | bytearray) -> None:
        changes = decode_control(body)
        if isinstance(changes, list):
            try:
                self._on_push(changes)
            except Exception:
                logger.exception("applying subscription changes failed")
        with self._lock:
            send_frame(sock, Kind.PUSH_ACK, ident)

    def _run(self, sock: socket.socket, reader: FrameReader) -> None:
        while True:
            try:
                while True:
                    kind, ident, body, _ = reader.read()
                    if kind == Kind.PUSH:
                        self._apply_push(sock, ident, body)
                    elif kind == Kind.RESPONSE:
                        with self._lock:
                            waiter = self._pending.pop(ident, None)
                        if waiter is not None:
                            waiter.value = decode_control(body)
                            waiter.event.set()
            except (EOFError, OSError, ConnectionLost) as exc:
                if self._closing:
                    self._disconnect(sock)
                    sock.close()
                    return
                logger.info("lost the registry (%s); restarting it", exc or type(exc).__name__)
            self._disconnect(sock)
            sock.close()
            reconnected = self._reconnect()
            if reconnected is None:
                return
            sock, reader = reconnected
            self.recoveries += 1

    def _disconnect(self, sock: socket.socket) -> None:
        with self._lock:
            self._connected.clear()
            self._sock = None
            waiters = list(self._pending.values())
            self._pending.clear()
        for waiter in waiters:
            waiter.value = _RETRY
            waiter.event.set()

    def _reconnect(self) -> tuple[socket.socket, FrameReader] | None:
        delay = 0.0
        while not self._closing:
            try:
                sock = connect_registry(self.directory, 5.0, self._mask)
            except LocalnetError as exc:
                logger.warning("cannot restart the registry yet: %s", exc)
            else:
                try:
                    return sock, self._handshake(sock, time.monotonic() + 5.0, again=True)
                except (LocalnetError, OSError) as exc:
                    sock.close()
                    logger.warning("cannot register again yet: %s", exc)
            delay = min(max(delay * 2, 0.05), 1.0)
            time.sleep(delay)  # bounded back-off between attempts to restore the registry
        return None

    def request(self, op: str, timeout: float = 10.0, **args: Any) -> Any:
        """Send one request and return its value.

        Waits (up to ``timeout``) through a registry restart.

        Raises:
            NameTaken, LocalnetError: the registry refused the request.
            RegistryUnavailable: no registry answered in time.
            PeerClosed: this client was closed.
        """
        deadline = time.monotonic() + timeout
        body = encode_control([op, args])
        while True:
            if self._closing:
                raise PeerClosed("this peer is closed")
            if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                raise RegistryUnavailable(
                    f"the registry in {self.directory} did not answer within {timeout:g} s"
                )
            waiter = _Waiter()
            with self._lock:
                sock = self._sock
                if sock is None:
                    continue
                self._next_id += 1
                ident = self._next_id
                self._pending[ident] = waiter
                try:
                    full = not _send_whole(sock, Kind.REQUEST, ident, body)
                except OSError:
                    full = False
                    self._pending.pop(ident, None)
                    waiter.value = _RETRY
                    waiter.event.set()
                if full:
                    self._pending.pop(ident, None)
            if full:  # a stopped registry: its queue is full; wait for room, not the lock
                if not _wait_writable(sock, deadline - time.monotonic()):
                    raise RegistryUnavailable(
                        f"the registry did not take {op!r} within {timeout:g} s (it is "
                        "stopped or overloaded)")
                continue
            if not waiter.event.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    self._pending.pop(ident, None)
                raise RegistryUnavailable(
                    f"the registry did not answer {op!r} within {timeout:g} s"
                )
            reply = waiter.value
            if reply is _RETRY:
                if self._closing:
                    raise PeerClosed("this peer is closed")
                if time.monotonic() >= deadline:
                    raise RegistryUnavailable(f"the registry was lost during {op!r}")
                continue
            if not isinstance(reply, dict):
                raise LocalnetError("malformed registry reply")
            if not reply.get("ok"):
                _raise_for(reply)
            return reply.get("value")

    def request_nowait(self, op: str, **args: Any) -> None:
        """Send one request without waiting for its answer (nor for a reconnection).

        It is queued behind every request sent before it, so it can undo
        one that timed out while the registry was stopped.  A registry that
        is gone needs no undoing: the peer registers its state afresh with
        the next one.
        """
        with self._lock:
            sock = self._sock
            if sock is None or self._closing:
                return
            self._next_id += 1
            try:
                send_frame(sock, Kind.REQUEST, self._next_id, encode_control([op, args]))
            except OSError:
                pass

    def close(self, timeout: float = 2.0) -> None:
        """Unregister and disconnect; idempotent."""
        if self._closing:
            return
        if self._connected.is_set():
            try:
                self.request("unregister", timeout=timeout)
            except LocalnetError as exc:
                logger.debug("unregister failed: %s", exc)
        self._closing = True
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._connected.set()  # wake requests waiting for a reconnection; they see _closing
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- fork (see localnet._fork) ---------------------------------------------
    def _after_fork_in_child(self) -> None:
        """Leave the parent's registration alone: close this process's copy of its socket.

        No unregister and no shutdown(): both would end the parent's session.
        """
        self._closing = True
        self._lock = threading.Lock()
        self._pending = {}
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
