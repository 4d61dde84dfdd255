"""Ready-made dispatchers: where served calls and handlers run in an application.

By default localnet runs the calls other peers make, and the handlers of
the events it receives, on threads of its own.  Toolkits that must only be
touched from their main thread (Qt, Tk, Maya, Houdini, Nuke, Blender) or
code that lives on one asyncio loop want them run *there*: give the peer
(or one connection, or one subscription) a dispatcher::

    app = QApplication([])
    peer = localnet.Peer(name="viewer", dispatcher=localnet.dispatch.QtDispatcher())

    @localnet.subscribe("frame_done")
    def on_done(frame):
        label.setText(f"frame {frame}")   # on Qt's main thread

The serving thread hands the work over and waits: the reply to a call, or
the acknowledgement of an event, goes out once it has run on the
application's thread; events from one publisher are still handled one
after another, in order; errors and statistics are as on threads.

========================= ==========================================================
:class:`AsyncioDispatcher` an asyncio loop (the running one, or ``loop=``); an ``async
                           def`` handler runs as a task of that loop
:class:`QtDispatcher`      Qt's main thread, through a queued signal (PySide6 or
                           PyQt6, whichever is importable; neither is a dependency)
:class:`TkDispatcher`      a Tk root's thread, through a file handler on a pipe
:class:`ManualDispatcher`  whatever thread calls ``run_pending(max_seconds)``: for
                           hosts with an idle or timer hook (Maya, Houdini, Blender)
========================= ==========================================================

Create a dispatcher on the thread it stands for (an asyncio dispatcher
inside its loop, or pass ``loop=``).  A blocking localnet call made on that
thread goes on running dispatched work while it waits, so a peer that
calls back into this thread is served (see :mod:`localnet._dispatch`).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import threading
from inspect import isawaitable
from typing import Any

from ._dispatch import Dispatcher, ManualDispatcher, _Work

__all__ = ["AsyncioDispatcher", "Dispatcher", "ManualDispatcher", "QtDispatcher",
           "TkDispatcher"]


class AsyncioDispatcher(Dispatcher):
    """Runs work on an asyncio loop's thread, between the loop's other callbacks.

    ``loop``: the loop (default: the running one; then create it inside
    the loop).  Work that returns an awaitable (``async def``) runs as a
    task of that loop and counts as done when it finished.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        super().__init__(adopt=False)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._adopt()
        else:
            self.loop.call_soon_threadsafe(self._adopt)

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.run_pending)
        except RuntimeError:  # the loop was closed: nothing will run the work
            self.close()

    def _execute(self, work: _Work) -> None:
        try:
            value = work.func(*work.args, **work.kwargs)
        except BaseException as exc:
            work.finish(False, exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        if not isawaitable(value):
            work.finish(True, value)
            return
        task = asyncio.ensure_future(value, loop=self.loop)

        def done(task: asyncio.Future[Any]) -> None:
            if task.cancelled():
                work.finish(False, asyncio.CancelledError("the handler's task was cancelled"))
            elif task.exception() is not None:
                work.finish(False, task.exception())
            else:
                work.finish(True, task.result())

        task.add_done_callback(done)


def _qt_core() -> Any:
    """QtCore of the binding the application uses: the one whose QCoreApplication
    exists, else PySide6 or PyQt6, whichever imports."""
    bindings = ("PySide6", "PyQt6")
    for package in bindings:
        core = sys.modules.get(f"{package}.QtCore")
        if core is not None and core.QCoreApplication.instance() is not None:
            return core
    for package in bindings:
        try:
            return importlib.import_module(f"{package}.QtCore")
        except ImportError:
            continue
    raise ImportError("QtDispatcher needs PySide6 or PyQt6; install one of them "
                      "(pip install PySide6)")


class _Pipe:
    """A self-pipe: any thread writes a byte, the home thread's loop sees it readable."""

    def __init__(self) -> None:
        self.read, self._write = os.pipe()
        os.set_blocking(self.read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()

    def wake(self) -> None:
        with self._lock:
            if self._write < 0:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the loop is awake already

    def drain(self) -> None:
        try:
            while os.read(self.read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._lock:
            if self._write >= 0:
                os.close(self.read)
                os.close(self._write)
                self.read = self._write = -1


class QtDispatcher(Dispatcher):
    """Runs work on the Qt thread that created it (the main, GUI thread).

    Create it on that thread, after the ``QApplication`` (whose binding,
    PySide6 or PyQt6, it then uses); work runs when Qt's event loop
    (``app.exec()``, or a modal dialog's) processes events.  It is woken
    through a pipe that a ``QSocketNotifier`` of that thread watches.  (Not
    a queued signal or a posted event: PySide6 6.12 loses a reference to
    ``True`` at each ``Signal.emit()``, and one to ``None`` at each call of
    a Python ``event()`` override, which aborts Python 3.11
    after a few hundred wake-ups.)
    """

    def __init__(self) -> None:
        core = _qt_core()
        super().__init__()
        self._pipe = _Pipe()
        self._notifier = core.QSocketNotifier(self._pipe.read, core.QSocketNotifier.Type.Read)
        self._notifier.activated.connect(self._readable)

    def _readable(self, *_: object) -> None:
        self._pipe.drain()
        self.run_pending()

    def _wake(self) -> None:
        self._pipe.wake()

    def close(self) -> None:
        """Fail waiting work and stop watching the pipe (on the Qt thread)."""
        super().close()
        self._notifier.setEnabled(False)
        self._pipe.close()


class TkDispatcher(Dispatcher):
    """Runs work on the thread of a Tk root (its ``mainloop``).

    Create it on that thread with the root.  Woken through a file handler
    on a pipe (``createfilehandler``: Unix only); :meth:`close` removes it.
    """

    def __init__(self, root: Any) -> None:
        import tkinter

        super().__init__()
        self._tk = root.tk
        self._pipe = _Pipe()
        self._tk.createfilehandler(self._pipe.read, tkinter.READABLE, self._readable)

    def _readable(self, fd: int, mask: int) -> None:
        self._pipe.drain()
        self.run_pending()

    def _wake(self) -> None:
        self._pipe.wake()

    def close(self) -> None:
        """Fail waiting work and remove the file handler (on the root's thread)."""
        super().close()
        if self._pipe.read >= 0:
            try:
                self._tk.deletefilehandler(self._pipe.read)
            except Exception:  # noqa: BLE001 - the root may be gone already
                pass
        self._pipe.close()
