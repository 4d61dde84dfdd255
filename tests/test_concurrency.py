"""Concurrent and interrupted calls: many threads, nested callbacks, limits,
timeouts and Ctrl-C in the middle of a large reply."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import wait_until

import localnet

SLEEPER = """
import threading

@localnet.connect()
def meet(n):
    # returns only once every caller is inside at the same time
    return barrier.wait()

@localnet.connect()
def nap(seconds):
    time.sleep(seconds)
    return seconds

barrier = threading.Barrier(int(sys.argv[1]), timeout=20)
peer = localnet.Peer(name="sleeper").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

THREADS = 50


def test_fifty_threads_calls_run_at_once(spawn) -> None:
    # Thread ids are page-aligned: picking a connection by id % 8 put every
    # thread past the eighth on one connection, served about 4 at a time.
    spawn(SLEEPER, args=[str(THREADS)])
    errors: list[BaseException] = []
    with localnet.Peer(name="caller"):
        remote = localnet.peer("sleeper")

        def meet() -> None:
            try:
                remote.call("meet", 0, timeout=30)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=meet) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors  # a BrokenBarrierError: they did not all run at once

        def naps() -> None:
            try:
                for _ in range(5):
                    remote.nap(0.1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=naps) for _ in range(THREADS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        took = time.monotonic() - start
        assert not errors
        # 250 calls of 0.1 s, 50 at a time: 0.5 s (about 6 s a few at a time)
        assert took < 3.0, f"took {took:.2f} s"


CHAIN = """
@localnet.connect()
def pong(n):
    if n <= 0:
        return 0
    return ping(n - 1, peer="A") + 1

@localnet.connect()
def ping(n):
    raise AssertionError("runs in A")

@localnet.connect()
def hello():
    return "hi"

@localnet.subscribe("chain_tick")
def on_tick(n):
    say("TICK", n)

peer = localnet.Peer(name="B").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.connect()
def ping(n: int) -> int:
    if n <= 0:
        return 0
    return int(pong(n - 1, peer="B")) + 1


@localnet.connect()
def pong(n: int) -> int:
    raise AssertionError("runs in B")


@localnet.event("chain_tick")
def chain_tick(n: int) -> tuple[tuple[int], dict[str, object]]:
    return (n,), {}


def test_nested_callbacks_to_the_limit_and_beyond(spawn) -> None:
    b = spawn(CHAIN)
    with localnet.Peer(name="A") as me:
        # A calls B, whose handler calls A, ...: each level holds a thread
        # and a connection on each side.
        assert pong.on("B", timeout=30)(70) == 70
        # Beyond the limits (64 calls from A to B at once): a clear error, soon.
        start = time.monotonic()
        with pytest.raises(localnet.TooManyCalls, match=r"max_calls"):
            pong.on("B", timeout=30)(300)
        assert time.monotonic() - start < 15
        # and both peers go on: a fresh call from a third process, events, flush
        third = spawn("""
            with localnet.Peer(name="third") as peer:
                say("HELLO", peer.call("B", "hello", (), {}, timeout=10))
        """, ready=None)
        third.expect("HELLO hi")
        assert third.wait_exit() == 0
        chain_tick(1)
        me.flush(10)
        b.expect("TICK 1")
        assert pong.on("B", timeout=30)(10) == 10


def test_callee_at_max_workers_answers_too_many_calls(spawn) -> None:
    spawn(CHAIN.replace('Peer(name="B")', 'Peer(name="B", max_workers=5)'))
    with localnet.Peer(name="A"):
        assert pong.on("B", timeout=30)(8) == 8  # 4 levels in B
        with pytest.raises(localnet.TooManyCalls, match=r"Peer\(max_workers=\.\.\.\)"):
            pong.on("B", timeout=30)(40)
        assert pong.on("B", timeout=30)(8) == 8


BIG = """
@localnet.connect()
def big(n):
    reply = bytes(n)
    say("SENDING")  # the reply is made: what the caller's memory shows now is its arrival
    return reply

@localnet.connect()
def echo(x):
    return x

peer = localnet.Peer(name="big", shm_threshold=None, max_frame=512 * 1024 * 1024).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""
REPLY = 200 * 1000 * 1000


def _stop_when_growing(caller: psutil.Process, server: Any) -> None:
    """SIGSTOP the server once the caller's memory shows the reply arriving.

    The baseline is taken once the server has made the reply: memory the
    caller gained earlier (for whatever reason) must not pass for it.
    """
    server.expect("SENDING", 30)
    baseline = caller.memory_info().rss
    wait_until(lambda: caller.memory_info().rss > baseline + 16 * 1024 * 1024, 30,
               what="the large reply to start arriving", interval=0.001)
    os.kill(server.pid, signal.SIGSTOP)


def _reading_a_socket(pid: int) -> str | None:
    """"reading" while ``pid``'s main thread waits for bytes on a Unix socket."""
    with open(f"/proc/{pid}/task/{pid}/wchan") as wchan:
        return "reading" if wchan.read() == "unix_stream_read_generic" else None


def test_timeout_in_the_middle_of_a_large_reply(spawn) -> None:
    server = spawn(BIG)
    with localnet.Peer(name="caller", max_frame=512 * 1024 * 1024):
        remote = localnet.peer("big")
        assert remote.echo(1) == 1
        me = psutil.Process()
        baseline = me.memory_info().rss
        stopper = threading.Thread(target=_stop_when_growing, args=(me, server))
        stopper.start()
        try:
            start = time.monotonic()
            with pytest.raises(localnet.Timeout):
                remote.call("big", REPLY, timeout=4)
            took = time.monotonic() - start
            stopper.join(30)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert took < 4 + 1.5, f"a 4 s timeout took {took:.2f} s"
        # the same thread's next call works, and the half reply was freed
        assert remote.echo("after") == "after"
        wait_until(lambda: me.memory_info().rss < baseline + 64 * 1024 * 1024, 10,
                   what="the abandoned reply to be freed")


def test_ctrl_c_in_the_middle_of_a_large_reply(spawn) -> None:
    server = spawn(BIG)
    caller = spawn("""
        # Ctrl-C as in a terminal: a suite started in the background (as a
        # shell's `&` does) runs with SIGINT ignored, and children inherit that.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with localnet.Peer(name="caller", max_frame=512 * 1024 * 1024):
            remote = localnet.peer("big")
            remote.echo(1)
            say("READY")
            while sys.stdin.readline():
                try:
                    remote.big(200 * 1000 * 1000)
                    say("WHOLE REPLY")
                except KeyboardInterrupt:
                    say("INTERRUPTED")
                    break
            say("AFTER", remote.echo("after"))
    """)
    process = psutil.Process(caller.pid)
    for _ in range(5):
        caller.send("go")
        try:
            _stop_when_growing(process, server)
            # The server is stopped. On a loaded machine the whole reply may
            # have arrived before the stop: then this round proves nothing.
            # Half-way, the caller soon waits for bytes that cannot come.
            mid_reply = wait_until(
                lambda: _reading_a_socket(caller.pid) or not caller.lines.empty(), 30,
                what="the caller to wait for the rest of the reply, or to finish")
            if mid_reply == "reading":
                caller.signal(signal.SIGINT)
                # (generous: on a loaded machine the interrupted process may
                # wait long for a core; the bound only keeps a hang from going
                # unnoticed)
                assert caller.expect("", timeout=60) == "INTERRUPTED"
                break
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert caller.expect("", timeout=60) == "WHOLE REPLY"
    else:
        pytest.fail("the large reply never stopped half-way in 5 rounds")
    caller.expect("AFTER after", timeout=60)
    assert caller.wait_exit() == 0
