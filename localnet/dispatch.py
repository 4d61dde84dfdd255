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


def _qt_core() -> tuple[Any, Any]:
    """QtCore and its signal maker, from PySide6 or PyQt6."""
    for package, signal in (("PySide6", "Signal"), ("PyQt6", "pyqtSignal")):
        try:
            core = importlib.import_module(f"{package}.QtCore")
        except ImportError:
            continue
        return core, getattr(core, signal)
    raise ImportError("QtDispatcher needs PySide6 or PyQt6; install one of them "
                      "(pip install PySide6)")


class QtDispatcher(Dispatcher):
    """Runs work on the Qt thread that created it (the main, GUI thread).

    Create it on that thread, after the ``QApplication``; work runs when
    Qt's event loop (``app.exec()``, or a modal dialog's) processes events.
    """

    def __init__(self) -> None:
        super().__init__()
        core, signal = _qt_core()
        dispatcher = self

        class _Waker(core.QObject):  # type: ignore[misc, name-defined]
            poke = signal()

            def run(self) -> None:
                dispatcher.run_pending()

        self._waker = _Waker()
        # A signal emitted on another thread reaches this object's thread as
        # a queued event (Qt's AutoConnection).
        self._waker.poke.connect(self._waker.run)

    def _wake(self) -> None:
        self._waker.poke.emit()


class TkDispatcher(Dispatcher):
    """Runs work on the thread of a Tk root (its ``mainloop``).

    Create it on that thread with the root.  Woken through a file handler
    on a pipe (``createfilehandler``: Unix only); :meth:`close` removes it.
    """

    def __init__(self, root: Any) -> None:
        import tkinter

        super().__init__()
        self._tk = root.tk
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._write_lock = threading.Lock()
        self._tk.createfilehandler(self._read, tkinter.READABLE, self._readable)

    def _readable(self, fd: int, mask: int) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        self.run_pending()

    def _wake(self) -> None:
        with self._write_lock:
            if self._write < 0:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the loop is awake already

    def close(self) -> None:
        """Fail waiting work and remove the file handler (on the root's thread)."""
        super().close()
        with self._write_lock:
            if self._write < 0:
                return
            try:
                self._tk.deletefilehandler(self._read)
            except Exception:  # noqa: BLE001 - the root may be gone already
                pass
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = -1
