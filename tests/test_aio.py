"""The awaitable API (localnet.aio): awaited calls, triggers, discovery and flush,
against real peer processes, on real event loops."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from helpers import wait_until

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


def _run_queue_seconds() -> float:
    """Time this process's threads have spent runnable but waiting for a CPU, summed
    (Linux schedstat): the loop also waits when a thread holding the interpreter
    was put aside by the kernel."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stats:
                total += int(stats.read().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # (a thread that ended meanwhile)
    return total / 1e9


def test_the_loop_never_stalls_while_ten_thousand_calls_and_events_flow(spawn) -> None:
    """A lag monitor (a 1 ms sleep, and how late it wakes) runs beside 5,000 awaited
    calls from 50 coroutines and 5,000 awaited triggers into a queue of 100 events
    (so triggers wait for room): the loop is never held up for 10 ms.

    What the process's threads spent waiting for a CPU meanwhile (the
    kernel's run-queue time, /proc/self/task/*/schedstat) is not the loop's
    doing but the machine's (two cores, three busy processes, and whatever
    else runs), and is not counted: what is left is time spent in callbacks
    or blocked in the process (a blocking wait)."""
    spawn(CALLEE)

    async def main() -> list[float]:
        async with localnet.aio.Peer(name="me", event_queue=100) as me:
            loop = asyncio.get_running_loop()
            lags: list[float] = []
            done = asyncio.Event()

            async def monitor() -> None:
                while not done.is_set():
                    before, queued = loop.time(), _run_queue_seconds()
                    await asyncio.sleep(0.001)
                    lags.append(max(0.0, loop.time() - before - 0.001
                                    - (_run_queue_seconds() - queued)))

            echo = localnet.Connection(lambda v: v, "echo").aio.on("callee", timeout=60)

            async def calls(first: int) -> None:
                for i in range(first, 5000, 50):
                    assert await echo(i) == i

            async def events() -> None:
                for i in range(5000):
                    await tick.aio(i)

            watching = asyncio.ensure_future(monitor())
            await asyncio.gather(*(calls(k) for k in range(50)), events())
            await me.flush(timeout=60)
            done.set()
            await watching
            assert await me.call("callee", "ticks", (), {}) == list(range(5000))
            counts = me.stats().published["tick"]
            assert (counts.delivered, counts.dropped, counts.failed) == (5000, 0, 0)
            return lags

    lags = asyncio.run(main())
    assert len(lags) > 20
    print(f"max lag {max(lags) * 1e3:.2f} ms over {len(lags)} samples")
    assert max(lags) < 0.010, f"the loop stalled {max(lags) * 1e3:.1f} ms"


def _pool_worker(value: int) -> tuple[int, int]:
    async def main() -> int:
        callee = await localnet.aio.peer("callee")
        return await callee.echo(value)  # type: ignore[no-any-return]

    return os.getpid(), asyncio.run(main())


def test_fork_pools_and_new_loops_after_awaited_calls(spawn, runtime_dir) -> None:
    """Awaited calls from a parent's loop, then from fork-pool workers (each a loop of
    its own, in a peer of its own), then from new loops in the parent: all work; the
    parent's connections of the loops that closed are let go of."""
    import multiprocessing

    spawn(CALLEE)

    async def calls(n: int) -> list[int]:
        callee = await localnet.aio.peer("callee")
        return list(await asyncio.gather(*(callee.echo(i) for i in range(n))))

    with localnet.Peer(name="parent"):
        assert asyncio.run(calls(20)) == list(range(20))
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map(_pool_worker, range(8))
        assert [value for _, value in got] == list(range(8))
        pids = {pid for pid, _ in got}
        assert os.getpid() not in pids
        assert asyncio.run(calls(20)) == list(range(20))
        open_fds = len(os.listdir("/proc/self/fd"))
        for _ in range(5):  # loops come and go: their connections do not pile up
            assert asyncio.run(calls(20)) == list(range(20))
        assert len(os.listdir("/proc/self/fd")) <= open_fds + 25
    # Pool workers leave through os._exit, like a crash: the registry removes
    # their socket files once their deaths are confirmed.
    wait_until(lambda: not any(p.name.split("-")[1] in map(str, pids)
                               for p in runtime_dir.glob("p-*.sock")),
               what="the workers' socket files to be removed")


PURE_CALLER = """
import asyncio
import localnet.aio
assert sys.modules.get("localnet._fastcall", None) is None

async def main():
    async with localnet.aio.Peer(name="pure") as me:
        callee = await localnet.aio.peer("callee")
        assert await asyncio.gather(*(callee.echo(i) for i in range(200))) == list(range(200))
        assert await callee.call("echo", "timed", timeout=10) == "timed"
        assert await callee.big(500_000) == b"x" * 500_000
        try:
            await callee.fail("gone")
        except KeyError:
            pass
        else:
            raise AssertionError("no KeyError")
        try:
            await asyncio.wait_for(callee.slow(0.3, "late"), 0.05)
        except asyncio.TimeoutError:
            pass
        assert await callee.echo("after") == "after"
asyncio.run(main())
say("AIO OK")
"""


def test_awaited_calls_without_the_c_extensions(spawn, tmp_path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['localnet._fastcall'] = None  # as if not built\n"
        "sys.modules['localnet._speedups'] = None\n"
        "sys.modules['localnet._trigger'] = None\n")
    spawn(CALLEE)
    caller = spawn(PURE_CALLER, ready=None,
                   PYTHONPATH=os.pathsep.join([str(tmp_path), spawn.env()["PYTHONPATH"]]))
    caller.expect("AIO OK", timeout=60)
    assert caller.wait_exit() == 0
