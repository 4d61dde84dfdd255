"""Dispatchers: calls and handlers run on an application's main thread, with its
real event loop running (asyncio, Qt offscreen, Tk under Xvfb, a manual pump).

Each test runs an "app" process whose main thread runs its host's loop and
whose peer has that host's dispatcher.  Its connections and handlers check
that they run on the main thread (raising otherwise) and touch the host's
state (a Qt label, a Tk label).  The re-entrant cases: the main thread makes
a blocking call to this test's peer, which calls back a connection of the
app dispatched onto that same, waiting, main thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from helpers import end_pid, wait_until

import localnet
import localnet.dispatch

APP = """
import asyncio, threading
import localnet, localnet.dispatch as dispatch

host = sys.argv[1]
main = threading.main_thread()
text = ["-"]

if host == "qt":
    import importlib
    widgets = importlib.import_module(os.environ["QT_BINDING"] + ".QtWidgets")
    QApplication, QLabel = widgets.QApplication, widgets.QLabel
    app = QApplication([])
    label = QLabel("-")
    dispatcher = dispatch.QtDispatcher()
    run, stop = app.exec, app.quit
    def set_text(value): label.setText(value)
    def get_text(): return label.text()
elif host == "tk":
    import tkinter
    root = tkinter.Tk()
    label = tkinter.Label(root, text="-")
    label.pack()
    dispatcher = dispatch.TkDispatcher(root)
    run, stop = root.mainloop, root.quit
    def set_text(value): label.configure(text=value)
    def get_text(): return label.cget("text")
elif host == "asyncio":
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    dispatcher = dispatch.AsyncioDispatcher(loop)
    run, stop = loop.run_forever, loop.stop
    def set_text(value): text[0] = value
    def get_text(): return text[0]
else:  # a host with a timer hook: it calls run_pending itself
    dispatcher = dispatch.ManualDispatcher()
    stopping = threading.Event()
    def run():
        while not stopping.is_set():
            dispatcher.run_pending(0.05)
            stopping.wait(0.001)
    stop = stopping.set
    def set_text(value): text[0] = value
    def get_text(): return text[0]

def on_main():
    if threading.current_thread() is not main:
        raise RuntimeError(f"ran on {threading.current_thread().name}, not the main thread")

@localnet.connect()
def where():
    on_main()
    return threading.current_thread().name

@localnet.connect()
def show(value):
    on_main()
    set_text(value)
    return get_text()

@localnet.connect()
async def ashow(value):
    await asyncio.sleep(0)
    return value

@localnet.connect()
def roundtrip(value):
    on_main()  # a blocking call from the main thread, whose peer calls back here
    return localnet.peer("driver").call("bounce", value, timeout=10)

@localnet.connect()
def inner(value):
    on_main()
    return value + 1

@localnet.connect()
def boom():
    on_main()
    raise ValueError("raised on the main thread")

@localnet.connect()
def hold(seconds):
    on_main()
    time.sleep(seconds)
    return seconds

shown, bounced = [], []

@localnet.subscribe("shown")
def on_shown(n):
    on_main()
    shown.append(n)
    set_text(str(n))

@localnet.subscribe("bounced")
def on_bounced(n):
    on_main()  # a handler that calls back its publisher, which calls back here
    bounced.append(localnet.peer("driver").call("bounce", n, timeout=10))

@localnet.connect()
def seen():
    on_main()
    return list(shown), list(bounced), get_text()

@localnet.connect()
def quit():
    stop()
    return True

peer = localnet.Peer(name="app", dispatcher=dispatcher).start()
say("READY")
run()
peer.close()
say("DONE")
"""


@localnet.connect()
def bounce(value: int) -> int:
    return localnet.peer("app").call("inner", value, timeout=10)


@localnet.event("shown")
def shown(n: int):
    return (n,), {}


@localnet.event("bounced")
def bounced(n: int):
    return (n,), {}


def _drive(spawn, host: str, **env: str) -> None:
    app = spawn(APP, args=[host], **env)
    with localnet.Peer(name="driver") as driver:
        remote = driver.peer("app")
        assert remote.where() == "MainThread"
        assert remote.show("hello") == "hello"
        assert remote.ashow("async") == "async"
        # hundreds of wake-ups of the host's loop (PySide6 6.12 lost a reference to
        # True or None per wake-up through a signal or an event() override, which
        # aborted the app after a few hundred)
        for i in range(600):
            assert remote.inner(i) == i + 1
        # re-entrant: app's main thread calls us, we call back onto that thread
        assert remote.call("roundtrip", 41, timeout=20) == 42
        with pytest.raises(ValueError, match="raised on the main thread"):
            remote.boom()
        with pytest.raises(localnet.Timeout):  # the main thread is busy past the timeout
            remote.call("hold", 0.5, timeout=0.1)
        assert remote.call("hold", 0.01, timeout=10) == 0.01
        for n in range(50):
            shown(n)
        bounced(7)
        driver.flush(timeout=20)
        got, back, label = remote.seen()
        assert got == list(range(50))
        assert back == [8]
        assert label == "49"
        counts = driver.stats().published["shown"]
        assert (counts.delivered, counts.failed, counts.dropped) == (50, 0, 0)
        assert remote.quit() is True
    app.expect("DONE")
    assert app.wait_exit() == 0


def test_asyncio_dispatcher(spawn) -> None:
    _drive(spawn, "asyncio")


def test_manual_dispatcher(spawn) -> None:
    _drive(spawn, "manual")


@pytest.mark.parametrize("binding", ["PySide6", "PyQt6"])
def test_qt_dispatcher_on_the_offscreen_platform(spawn, binding: str) -> None:
    pytest.importorskip(f"{binding}.QtWidgets", reason=f"{binding} comes with the test extra")
    _drive(spawn, "qt", QT_QPA_PLATFORM="offscreen", QT_BINDING=binding)


@pytest.fixture
def display():
    """A display for Tk: the one given, or an Xvfb started (and ended) here."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no display and no Xvfb: the Tk dispatcher needs an X server "
                    "(apt-get install xvfb)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-nolisten", "tcp",
                             "-screen", "0", "640x480x24"], pass_fds=[write],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            chunk = os.read(read, 16)
            if not chunk:
                break
            number += chunk
        if not number.strip():
            pytest.skip("Xvfb did not start")
        yield f":{number.decode().strip()}"
    finally:
        os.close(read)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            end_pid(proc.pid)


def test_tk_dispatcher(spawn, display) -> None:
    tkinter = pytest.importorskip("tkinter")
    del tkinter
    _drive(spawn, "tk", DISPLAY=display)


def test_a_dispatcher_in_this_process_runs_work_only_when_pumped(spawn) -> None:
    dispatcher = localnet.dispatch.ManualDispatcher()
    ran_on: list[str] = []

    def work(value: int) -> int:
        ran_on.append(threading.current_thread().name)
        return value * 3

    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(dispatcher.run(work, (5,), {})))
    worker.start()
    wait_until(dispatcher.pending, what="work to be queued")
    assert results == [] and ran_on == []  # nothing runs until the host pumps
    assert dispatcher.run_pending(1.0) == 1
    worker.join(10)
    assert results == [15] and ran_on == [threading.current_thread().name]
    dispatcher.close()
    with pytest.raises(localnet.PeerStopping):
        dispatcher.run(work, (1,), {})


def test_a_bad_dispatcher_is_refused_where_it_is_given() -> None:
    with pytest.raises(localnet.ConfigurationError, match="dispatcher"):
        localnet.Peer(name="x", dispatcher=object())  # type: ignore[arg-type]
    with pytest.raises(localnet.ConfigurationError, match="dispatcher"):
        localnet.connect(dispatcher="qt")  # type: ignore[arg-type]


OVERRIDE = """
import threading
import localnet, localnet.dispatch as dispatch

pump = dispatch.ManualDispatcher()  # this (main) thread runs its work
main = threading.main_thread()

@localnet.connect()
def on_threads():
    return threading.current_thread() is main

@localnet.connect(dispatcher=pump)
def on_main():
    return threading.current_thread() is main

handled = []

@localnet.subscribe("shown", dispatcher=pump)
def on_shown(n):
    handled.append((n, threading.current_thread() is main))

@localnet.connect()
def seen():
    return list(handled)

stop = threading.Event()

@localnet.connect()
def quit():
    stop.set()
    return True

with localnet.Peer(name="app"):
    say("READY")
    while not stop.is_set():
        pump.run_pending(0.05)
        stop.wait(0.001)
say("DONE")
"""


def test_a_connection_or_subscription_of_its_own_dispatcher(spawn) -> None:
    app = spawn(OVERRIDE)
    with localnet.Peer(name="driver") as driver:
        remote = driver.peer("app")
        assert remote.on_threads() is False  # the peer has no dispatcher: a localnet thread
        assert remote.on_main() is True  # this connection's own dispatcher
        for n in range(20):
            shown(n)
        driver.flush(timeout=20)
        assert remote.seen() == [(n, True) for n in range(20)]
        assert remote.quit() is True
    app.expect("DONE")
    assert app.wait_exit() == 0
