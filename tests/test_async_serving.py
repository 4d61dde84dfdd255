"""Connections written as ``async def`` are awaited to their end on the loop localnet
owns, in the callee's own process; the caller gets their result or exception as for a
plain function."""

from __future__ import annotations

import threading

import pytest

import localnet

CALLEE = """
import asyncio, threading

@localnet.connect()
async def aecho(value, delay=0.0):
    await asyncio.sleep(delay)
    return value, threading.current_thread().name

@localnet.connect()
async def afail(kind):
    await asyncio.sleep(0)
    if kind == "value":
        raise ValueError("async failure")
    raise SystemExit(3)

inside = 0
everyone = None

@localnet.connect()
async def meet(count):
    # returns once `count` of these coroutines are running at the same time
    global inside, everyone
    if everyone is None:
        everyone = asyncio.Event()
    inside += 1
    if inside == count:
        everyone.set()
    await asyncio.wait_for(everyone.wait(), 20)
    return True

async def _later(value):
    await asyncio.sleep(0)
    return value * 2

@localnet.connect()
def returns_a_coroutine(value):
    return _later(value)

peer = localnet.Peer(name="async-callee").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_async_connections_are_awaited_and_return_their_result(spawn) -> None:
    spawn(CALLEE)
    with localnet.Peer(name="me") as me:
        value, thread = me.call("async-callee", "aecho", ({"k": [1, 2]},), {"delay": 0.01},
                                timeout=10)
        assert value == {"k": [1, 2]} and thread == "localnet-loop"
        assert me.call("async-callee", "returns_a_coroutine", (21,), {}) == 42
        with pytest.raises(ValueError, match="async failure"):
            me.call("async-callee", "afail", ("value",), {})
        with pytest.raises(localnet.RemoteError, match="SystemExit"):
            me.call("async-callee", "afail", ("exit",), {})
        # the callee and its loop are still there
        assert me.call("async-callee", "aecho", ("after",), {}, timeout=10)[0] == "after"


def test_concurrent_calls_run_their_coroutines_at_the_same_time(spawn) -> None:
    spawn(CALLEE)
    count = 8
    results: list[object] = []
    with localnet.Peer(name="me") as me:

        def one() -> None:
            try:
                results.append(me.call("async-callee", "meet", (count,), {}, timeout=30))
            except Exception as exc:  # noqa: BLE001 - reported through results
                results.append(exc)

        threads = [threading.Thread(target=one) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
    # each coroutine returned only once all `count` were inside at once
    assert results == [True] * count


def test_a_forked_child_awaits_on_a_loop_of_its_own() -> None:
    import asyncio
    import os

    from localnet import _loop

    async def which() -> asyncio.AbstractEventLoop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    parents = _loop.await_result(which())
    pid = os.fork()
    if pid == 0:  # the child: the parent's loop thread did not come along
        code = 1
        try:
            code = 0 if _loop.await_result(which()) is not parents else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _loop.await_result(which()) is parents  # the parent's loop still runs
