"""Listening sockets that survive what happens to them from outside.

Two things can stop a listening Unix socket from taking connections while
its process is fine:

* **No descriptors left** (``EMFILE``, ``ENFILE``): ``accept()`` fails at
  once, again and again, while connections wait in the backlog.  Retrying
  at once spins a core; giving up drops every client.  :class:`Backoff`
  sleeps 1 ms, 2 ms, 4 ms ... up to 1 s between attempts, logs the first
  failure of a run and the recovery, and lets the owner free descriptors
  (a peer closes its idle call connections, see ``Server``).  Both the
  peers' and the registry's accept loops use it.
* **Its socket file removed** (a clean-up script, a ``tmp`` cleaner): the
  socket still accepts on the descriptor, but nobody can connect by path.
  :class:`ListeningSocket` looks at its file every ``CHECK_INTERVAL``
  seconds (one ``stat``); when the file is gone or is no longer its socket,
  it binds a new socket at the same path and accepts there, after taking
  the connections still waiting on the old one.  Established connections
  are not affected either way.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("localnet.server")

CHECK_INTERVAL = 1.0  # seconds between looks at the socket file
BACKLOG = 256
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Backoff:
    """Pacing for an accept loop whose ``accept()`` keeps failing (see the module docstring)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.failures = 0

    def failed(self, exc: OSError, exhausted: Callable[[], None] | None = None) -> None:
        """Log the first failure of a run, call ``exhausted`` when descriptors or
        memory ran out, then sleep before the next attempt."""
        self.failures += 1
        if self.failures == 1:
            logger.warning("accept failed on %s (%s); retrying with back-off", self.where, exc)
        if exhausted is not None and exc.errno in _EXHAUSTED:
            exhausted()
        time.sleep(min(0.001 * 2 ** min(self.failures, 10), 1.0))

    def succeeded(self) -> None:
        if self.failures:
            logger.warning("accepting again on %s after %d failed attempts", self.where,
                           self.failures)
            self.failures = 0


def bind(address: str) -> socket.socket:
    """A listening Unix socket at ``address`` (replacing what is there), mode 0600."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


def _identity(address: str) -> tuple[int, int] | None:
    try:
        st = os.stat(address)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ListeningSocket:
    """A peer's listening socket at ``address``, re-created when its file goes."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = bind(address)
        self._identity = _identity(address)
        self._lock = threading.Lock()
        self._closed = False
        self.rebinds = 0  # how often the socket file had to be made again

    def serve(self, take: Callable[[socket.socket], None],
              exhausted: Callable[[], None] | None = None) -> None:
        """Accept connections and hand each to ``take`` until :meth:`close`."""
        backoff = Backoff(self.address)
        next_check = time.monotonic() + CHECK_INTERVAL
        while not self._closed:
            sock = self.sock
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            ready = poller.poll(max(0.0, next_check - time.monotonic()) * 1000)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL
                self.check(take)
            if not ready or sock is not self.sock:
                continue
            try:
                conn, _ = sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                if sock is self.sock:
                    backoff.failed(exc, exhausted)
                continue
            backoff.succeeded()
            take(conn)

    def check(self, take: Callable[[socket.socket], None]) -> None:
        """Bind again if the socket file is gone or replaced; called by the accepting thread."""
        if self._closed or _identity(self.address) == self._identity:
            return
        try:
            new = bind(self.address)
        except OSError as exc:
            logger.warning("the socket file %s was removed and cannot be made again (%s); "
                           "retrying", self.address, exc)
            return
        made = _identity(self.address)
        with self._lock:
            if self._closed:  # closed meanwhile: its owner may have removed the file already
                if made is not None and _identity(self.address) == made:
                    os.unlink(self.address)
                new.close()
                return
            old, self.sock = self.sock, new
            self._identity = made
            self.rebinds += 1
        logger.warning("the socket file %s was removed or replaced; listening there again",
                       self.address)
        old.setblocking(False)
        try:
            while True:  # connections that reached the old socket before its file went
                conn, _ = old.accept()
                conn.setblocking(True)
                take(conn)
        except OSError:
            pass
        old.close()

    def close(self) -> None:
        """Stop accepting (wakes :meth:`serve`); the socket file stays (the owner removes it)."""
        with self._lock:
            self._closed = True
            sock = self.sock
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _after_fork_in_child(self) -> None:
        """Close this process's copy only (no shutdown: the parent still listens)."""
        self._lock = threading.Lock()
        self._closed = True
        self.sock.close()
