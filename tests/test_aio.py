"""The awaitable API (localnet.aio): awaited calls, triggers, discovery and flush,
against real peer processes, on real event loops."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import localnet
import localnet.aio

CALLEE = """
import asyncio, threading

@localnet.connect()
def echo(value):
    return value

@localnet.connect()
def slow(seconds, value=None):
    time.sleep(seconds)
    return value

@localnet.connect()
async def aecho(value, delay=0.0):
    await asyncio.sleep(delay)
    return value

@localnet.connect()
def fail(message):
    raise KeyError(message)

@localnet.connect()
def big(n):
    return b"x" * n

@localnet.connect()
def array(n):
    import numpy
    return numpy.arange(n, dtype="int64")

seen = []

@localnet.subscribe("tick")
def on_tick(n):
    seen.append(n)

@localnet.connect()
def ticks():
    return list(seen)

peer = localnet.Peer(name="callee").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.connect()
def here(value):
    return value * 2


@localnet.event("tick")
def tick(n):
    return (n,), {}


def test_awaited_calls_in_every_form_return_results_and_raise_remote_errors(spawn) -> None:
    spawn(CALLEE)

    async def main() -> None:
        async with localnet.aio.Peer(name="me") as me:
            assert await me.call("callee", "echo", ({"k": [1, 2]},), {}) == {"k": [1, 2]}
            assert await here.aio(21) == 42  # no peer: runs here
            assert await here.aio(21, peer="me") == 42  # this very peer, through its socket
            assert await localnet.Connection(lambda v: v, "aecho").aio(
                "x", peer="callee") == "x"
            callee = await localnet.aio.peer("callee")
            assert isinstance(callee, localnet.aio.AsyncRemotePeer)
            assert await callee.echo(5) == 5
            assert await callee.fn.aecho(6, delay=0.01) == 6
            assert await callee.call("echo", 7, timeout=5) == 7
            with pytest.raises(KeyError, match="missing"):
                await callee.fail("missing")
            with pytest.raises(localnet.UnknownConnection):
                await me.call("callee", "nothing", (), {})
            with pytest.raises(localnet.PeerNotFound):
                await me.call("nobody", "echo", (1,), {})
            assert await callee.big(3_000_000) == b"x" * 3_000_000  # inline, read in pieces
            values = await callee.array(1_000_000)  # through shared memory
            assert int(values.sum()) == sum(range(1_000_000))
            names = [p.name for p in await localnet.aio.peers()]
            assert names == ["callee"]
            described = await localnet.aio.info("callee")
            assert "echo" in described.connections
            assert me.stats().calls_made >= 10

    asyncio.run(main())


def test_a_thousand_concurrent_awaited_calls_from_one_thread(spawn) -> None:
    spawn(CALLEE)

    async def main() -> None:
        async with localnet.aio.Peer(name="me", max_calls=16) as me:
            echo = localnet.Connection(lambda v: v, "echo").aio.on("callee", timeout=60)
            results = await asyncio.gather(*(echo(i) for i in range(1000)))
            assert results == list(range(1000))
            # they shared max_calls connections, all on this one thread
            assert len(me.sync._caller.channels("callee")) == 0  # none of the thread API's

    threads = []

    async def watched() -> None:
        threads.append(len(__import__("threading").enumerate()))
        await main()
        threads.append(len(__import__("threading").enumerate()))

    asyncio.run(watched())
    assert threads[1] - threads[0] < 16  # not a thread per call


def test_timeouts_and_cancellation_free_the_call_at_once_and_the_connection_goes_on(
        spawn) -> None:
    spawn(CALLEE)

    async def main() -> None:
        async with localnet.aio.Peer(name="me", max_calls=1) as me:
            slow = localnet.Connection(lambda *a: None, "slow").aio
            started = time.monotonic()
            with pytest.raises(localnet.Timeout):
                await slow.on("callee", timeout=0.2)(5, "late")
            assert time.monotonic() - started < 2
            # cancelled by wait_for: returns at once; the one connection is
            # usable again once the late answer came and was dropped
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(slow(0.5, "late", peer="callee"), 0.05)
            assert time.monotonic() - started < 0.4
            assert await me.call("callee", "echo", ("next",), {}, timeout=10) == "next"
            # cancelled task
            task = asyncio.ensure_future(slow(0.3, "x", peer="callee"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await me.call("callee", "echo", (1,), {}, timeout=10) == 1
            assert len(await asyncio.gather(*(me.call("callee", "echo", (i,), {}, timeout=10)
                                             for i in range(20)))) == 20

    asyncio.run(main())


def test_awaited_triggers_and_flush(spawn) -> None:
    spawn(CALLEE)

    async def main() -> None:
        async with localnet.aio.Peer(name="me") as me:
            for i in range(200):
                await tick.aio(i)
            await me.flush(timeout=10)
            assert await me.call("callee", "ticks", (), {}) == list(range(200))
            await me.publish("tick", (200,), {})
            await localnet.aio.flush(timeout=10)
            assert (await me.call("callee", "ticks", (), {}))[-1] == 200

    asyncio.run(main())


def test_async_handlers_run_on_the_loop_the_peer_was_started_in(spawn) -> None:
    caller = spawn("""
        import asyncio
        peer = localnet.Peer(name="remote").start()
        say("READY")
        for line in sys.stdin:
            if line.startswith("call"):
                say("GOT", peer.call("svc", "where", (), {}, timeout=10))
            elif line.startswith("quit"):
                break
        peer.close()
    """, ready="READY")

    @localnet.connect()
    async def where() -> tuple[int, int]:
        await asyncio.sleep(0)
        return os.getpid(), id(asyncio.get_running_loop())

    async def main() -> None:
        async with localnet.aio.Peer(name="svc"):
            loop_id = id(asyncio.get_running_loop())
            caller.send("call")
            line = await asyncio.get_running_loop().run_in_executor(None, caller.expect, "GOT")
            assert str((os.getpid(), loop_id)) in line

    asyncio.run(main())
    caller.send("quit")
    assert caller.wait_exit() == 0
