"""Signals: waiting in the main thread, and the signal masks of localnet's threads.

The kernel may deliver a signal to any thread of a process; Python only
runs its handler when the *main* thread next executes bytecode.  A main
thread blocked in ``accept()`` or ``Event.wait()`` would not notice for a
long time, so :func:`wait_for_stop` blocks on a socket that both the
signal wake-up fd and :meth:`Stopper.stop` write to.

Masks.  Threads inherit their creator's signal mask, and processes inherit
the mask of the thread that starts them, across ``exec``.  So:

* localnet's internal threads (accepting, writing events, reading acks,
  the registry connection, the watchdog, shared-memory trimming) block the
  asynchronous signals on top of what they inherited: a signal goes
  wherever it would go without localnet (on Linux, to the main thread
  unless it blocks it), never to a thread that cannot act on it.  Where the
  application blocks a signal in its own threads (a ``sigwait()`` design),
  an unmasked localnet thread would take it instead, and with the default
  action that ends the process.
* threads that run user code (served calls, subscription handlers) are
  started with ``mask=``: the mask of the thread that started the peer
  (for most programs, nothing blocked), as if that thread had started
  them.  Processes they start can be signalled as usual.
* a process localnet starts itself (the registry) is started with that
  mask too (:func:`thread_mask`), and clears its mask and resets inherited
  ``SIG_IGN`` dispositions when it starts (:func:`reset_inherited`).
"""

from __future__ import annotations

import select
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


# Asynchronous signals that Python handles in the main thread.
_ASYNC_SIGNALS = frozenset(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
    "SIGWINCH") if hasattr(signal, name))
_HAS_MASKS = hasattr(signal, "pthread_sigmask")


def current_mask() -> frozenset[int]:
    """The calling thread's signal mask (empty where threads have none)."""
    if not _HAS_MASKS:
        return frozenset()
    return frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ()))


@contextmanager
def thread_mask(mask: Iterable[int]) -> Iterator[None]:
    """Run the block with the calling thread's signal mask set to ``mask``.

    For starting a process from one of localnet's threads: the process
    inherits the mask of the thread that starts it.
    """
    if not _HAS_MASKS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reset_inherited(dispositions: bool = True) -> None:
    """Give a process localnet started a clean signal state.

    Clears the calling thread's mask (call it before starting threads) and,
    with ``dispositions``, restores the default action of the asynchronous
    signals that were ignored on the way here (a shell ignores SIGINT and
    SIGQUIT for a command it puts in the background; ``exec`` keeps
    ``SIG_IGN``).
    """
    if _HAS_MASKS:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if not dispositions:
        return
    for signum in _ASYNC_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)


def _run_masked(target: Callable[..., object], args: tuple[object, ...],
                mask: frozenset[int] | None) -> None:
    if _HAS_MASKS:
        if mask is None:
            signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        else:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    target(*args)


def spawn_thread(target: Callable[..., object], *args: object, name: str,
                 mask: Iterable[int] | None = None) -> threading.Thread:
    """Start a daemon thread running ``target(*args)``.

    Without ``mask`` the thread is one of localnet's own and blocks the
    asynchronous signals.  A thread that runs user code gets the mask of
    the thread that started the peer (see :func:`current_mask`).
    """
    frozen = None if mask is None else frozenset(mask)
    thread = threading.Thread(target=_run_masked, args=(target, args, frozen), name=name,
                              daemon=True)
    thread.start()
    return thread
