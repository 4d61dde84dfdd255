"""Polling before sleeping (``spin``): a call's answer, or a lone caller's next call,
taken by a running thread (localnet/_frames.c, ``recv_some``), over real socket pairs
and real peers; and the ``spin`` setting."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until

import localnet
from localnet import ConfigurationError, _settings, _wire
from localnet._wire import Kind, pack_header

try:
    from localnet import _fastcall
except ImportError:  # not built here
    _fastcall = None  # type: ignore[assignment]

needs_fastcall = pytest.mark.skipif(_fastcall is None, reason="localnet._fastcall is not built")
MAX = _wire.DEFAULT_MAX_FRAME
REPLY = int(Kind.REPLY)


def reply(ident: int, body: bytes) -> bytes:
    return pack_header(REPLY, ident, len(body), 0) + body


def in_thread(work: Callable[[], Any]) -> Any:
    """``work()`` on a new thread (a thread's record of its spins in vain starts
    empty), its result or exception returned or raised here."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, work()))
        except BaseException as exc:  # handed to the test's thread
            out.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert out, "the call did not return within 30 s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


def later(seconds: float, action: Callable[[], Any]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


# -- the C side ------------------------------------------------------------------------------

@needs_fastcall
def test_an_answer_that_comes_while_it_polls_is_taken(pair) -> None:
    ours, theirs = pair
    seen: list[tuple[int, int, int]] = []

    def answer() -> None:
        # the caller is inside its round trip, polling: one thread in a call, one spinning
        wait_until(lambda: _fastcall.calls_state()[1] == 1, 10)
        seen.append(_fastcall.calls_state())
        theirs.sendall(reply(5, b"soon"))

    helper = threading.Thread(target=answer)
    helper.start()
    got = in_thread(lambda: _fastcall.roundtrip(ours.fileno(), 5, b"x", None, MAX, 20.0))
    helper.join(10)
    assert got == (REPLY, 5, b"soon", [])
    assert seen == [(1, 1, 0)]
    assert _fastcall.calls_state() == (0, 0, 0)


@needs_fastcall
def test_an_answer_after_the_spin_is_waited_for(pair) -> None:
    ours, theirs = pair
    timer = later(0.2, lambda: theirs.sendall(reply(2, b"late")))
    try:
        got = in_thread(lambda: _fastcall.roundtrip(ours.fileno(), 2, b"x", None, MAX, 0.01))
    finally:
        timer.join(10)
    assert got == (REPLY, 2, b"late", [])
    assert _fastcall.calls_state() == (0, 0, 0)


@needs_fastcall
def test_the_deadline_ends_the_spin(pair) -> None:
    ours, _ = pair
    start = time.monotonic()
    got = in_thread(lambda: _fastcall.roundtrip(ours.fileno(), 1, b"x", start + 0.1, MAX, 600.0))
    assert got == (_fastcall.RECV_TIMEOUT, None, None, None)
    assert time.monotonic() - start < 60  # the deadline's, not the spin's ten minutes


@needs_fastcall
def test_the_gil_is_free_while_it_polls(pair) -> None:
    ours, theirs = pair
    ticks, stop = [0], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1

    thread = threading.Thread(target=tick)
    thread.start()
    timer = later(0.3, lambda: theirs.sendall(reply(1, b"done")))
    try:
        before = ticks[0]
        assert _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX, 20.0)[2] == b"done"
        assert ticks[0] - before > 1000
    finally:
        stop.set()
        thread.join(10)
        timer.join(10)


@needs_fastcall
def test_a_signal_that_came_while_it_polled_interrupts_the_wait_after(pair) -> None:
    # the signal arrives while the thread runs, so no system call is interrupted:
    # without a look at the signals when the spin ends, the wait would go on to the
    # answer (sent here after 20 s, so a failure is a failure, not a hang)
    ours, theirs = pair

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    sent = threading.Event()

    def answer() -> None:
        sent.set()
        theirs.sendall(reply(1, b"too late"))

    old = signal.signal(signal.SIGALRM, interrupt)
    timer = later(20, answer)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX, 0.5)
        assert not sent.is_set()  # raised in the wait, not once the answer ended it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        timer.cancel()
    assert _fastcall.calls_state() == (0, 0, 0)


@needs_fastcall
def test_no_poll_while_another_thread_of_the_process_is_in_a_call() -> None:
    first, first_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    second, second_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[tuple[int, int, int]] = []
    try:
        blocked = threading.Thread(target=_fastcall.roundtrip,
                                   args=(first.fileno(), 1, b"x", None, MAX, 0.0))
        blocked.start()
        wait_until(lambda: _fastcall.calls_state()[0] == 1, 10)

        def answer() -> None:
            wait_until(lambda: _fastcall.calls_state()[0] == 2, 10)
            seen.append(_fastcall.calls_state())
            second_end.sendall(reply(1, b"second"))

        helper = threading.Thread(target=answer)
        helper.start()
        assert in_thread(lambda: _fastcall.roundtrip(second.fileno(), 1, b"y", None, MAX,
                                                     20.0))[2] == b"second"
        helper.join(10)
        assert seen == [(2, 0, 0)]  # two in calls, neither polling
        first_end.sendall(reply(1, b"first"))
        blocked.join(10)
        assert not blocked.is_alive()
    finally:
        for sock in (first, first_end, second, second_end):
            sock.close()


@needs_fastcall
def test_after_a_spin_in_vain_the_thread_sleeps_at_once_next_time(pair) -> None:
    ours, theirs = pair
    polled: list[int] = []

    def two_calls() -> None:
        timer = later(0.2, lambda: theirs.sendall(reply(1, b"late")))
        assert _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX, 0.01)[2] == b"late"
        timer.join(10)

        def answer() -> None:
            wait_until(lambda: _fastcall.calls_state()[0] == 1, 10)
            time.sleep(0.05)  # what is being shown: nobody polls meanwhile
            polled.append(_fastcall.calls_state()[1])
            theirs.sendall(reply(2, b"next"))

        helper = threading.Thread(target=answer)
        helper.start()
        assert _fastcall.roundtrip(ours.fileno(), 2, b"y", None, MAX, 20.0)[2] == b"next"
        helper.join(10)

    in_thread(two_calls)
    assert polled == [0]


@needs_fastcall
def test_a_child_forked_during_a_call_starts_with_no_call_of_its_own() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        blocked = threading.Thread(target=_fastcall.roundtrip,
                                   args=(ours.fileno(), 1, b"x", None, MAX, 0.0))
        blocked.start()
        wait_until(lambda: _fastcall.calls_state()[0] == 1, 10)
        pid = os.fork()
        if pid == 0:  # the child: only this thread; report and leave at once
            os.write(write_end, repr(_fastcall.calls_state()).encode())
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(read_end, 100) == b"(0, 0, 0)"
        assert _fastcall.calls_state()[0] == 1
        theirs.sendall(reply(1, b"done"))
        blocked.join(10)
        assert not blocked.is_alive()
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


# -- the setting -----------------------------------------------------------------------------

@pytest.mark.parametrize("spin", [-1e-6, 0.5, True, "50e-6", float("nan")])
def test_a_bad_spin_is_refused_where_it_is_given(spin: Any) -> None:
    with pytest.raises(ConfigurationError, match="spin="):
        localnet.Peer(name="p", spin=spin)


def test_spin_from_the_environment_and_the_keyword_wins(monkeypatch) -> None:
    assert localnet.Peer(name="p").spin == _settings.DEFAULT_SPIN
    monkeypatch.setenv("LOCALNET_SPIN", "0")
    assert localnet.Peer(name="p").spin == 0.0
    assert localnet.Peer(name="p", spin=1e-5).spin == 1e-5
    monkeypatch.setenv("LOCALNET_SPIN", "fifty")
    with pytest.raises(ConfigurationError, match="LOCALNET_SPIN"):
        localnet.Peer(name="p")
    monkeypatch.setenv("LOCALNET_SPIN", "50")  # microseconds meant: refused, not obeyed
    with pytest.raises(ConfigurationError, match="LOCALNET_SPIN=50.0: give seconds"):
        localnet.Peer(name="p")


@pytest.mark.parametrize("spin", ["0", "0.001"])
def test_calls_between_processes_with_and_without_polling(spawn, spin: str) -> None:
    server = spawn("""
        import threading
        from localnet import _fastcall
        @localnet.connect()
        def echo(value): return value
        @localnet.connect()
        def state(): return _fastcall.calls_state() if _fastcall else None
        with localnet.Peer(name="server"):
            say("READY")
            input()
    """, LOCALNET_SPIN=spin)
    with localnet.Peer(name="client", spin=float(spin)) as peer:
        for i in range(200):
            assert peer.call("server", "echo", (i,), {}) == i
        values = [{"n": i, "blob": b"x" * i} for i in range(50)]
        errors: list[BaseException] = []

        def many(offset: int) -> None:
            try:
                for value in values:
                    assert peer.call("server", "echo", ((offset, value),), {}) == (offset, value)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=many, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors and not any(t.is_alive() for t in threads)
        if _fastcall is not None:  # the server's connections are served in C
            assert peer.call("server", "state", (), {})[2] >= 1
    server.send("")
    assert server.wait_exit() == 0


@needs_fastcall
def test_roundtrip_with_a_wrong_number_of_arguments_says_how_many(pair) -> None:
    ours, _ = pair
    with pytest.raises(TypeError, match=r"takes 5 or 6 arguments \(7 given\)"):
        _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX, 0.0, 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="must be real number"):
        _fastcall.roundtrip(ours.fileno(), 1, b"x", None, MAX, "50e-6")  # type: ignore[arg-type]
