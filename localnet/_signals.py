"""Waiting in the main thread until SIGINT/SIGTERM or an explicit stop.

The kernel may deliver a signal to any thread of a process; Python only
runs its handler when the *main* thread next executes bytecode.  A main
thread blocked in ``accept()`` or ``Event.wait()`` would not notice for a
long time, so :func:`wait_for_stop` blocks on a socket that both the
signal wake-up fd and :meth:`Stopper.stop` write to.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType


class Stopper:
    """A stop flag whose setting wakes :func:`wait_for_stop` at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def is_set(self) -> bool:
        return self._event.is_set()

    def stop(self) -> None:
        """Set the flag and wake the waiter; safe from threads and signal handlers."""
        self._event.set()
        try:
            self._write.send(b"\0")
        except OSError:
            pass

    def close(self) -> None:
        self._read.close()
        self._write.close()


def wait_for_stop(stopper: Stopper,
                  signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                  ready: Callable[[], object] | None = None) -> None:
    """Block the main thread until a signal in ``signals`` arrives or ``stopper.stop()``.

    ``ready`` is called once the handlers are in place.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("wait_for_stop() must run in the main thread")

    def handler(signum: int, frame: FrameType | None) -> None:
        stopper.stop()

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    previous_fd = signal.set_wakeup_fd(stopper._write.fileno(), warn_on_full_buffer=False)
    try:
        if ready is not None:
            ready()
        while not stopper.is_set():
            select.select([stopper._read], [], [])
            try:
                while stopper._read.recv(4096):
                    pass
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, old in previous.items():
            signal.signal(signum, old)


# Asynchronous signals that Python handles in the main thread.  localnet's
# own threads block them, so the kernel delivers them to a thread that can
# act: the main thread, whose blocking call is interrupted at once.
_ASYNC_SIGNALS = {getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
    "SIGWINCH") if hasattr(signal, name)}


def _run_masked(target: Callable[..., object], args: tuple[object, ...]) -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
    target(*args)


def spawn_thread(target: Callable[..., object], *args: object, name: str) -> threading.Thread:
    """Start a daemon thread that leaves asynchronous signals to the main thread."""
    thread = threading.Thread(target=_run_masked, args=(target, args), name=name, daemon=True)
    thread.start()
    return thread
