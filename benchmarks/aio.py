"""Scenario ``aio``: awaited calls (``localnet.aio``) beside thread calls, zmq.asyncio and Qt.

Two tables, each from its own rounds (within a round its systems run in turn, every
measurement with a fresh server process, a fresh client process and a fresh
``LOCALNET_DIR``):

- ``aio``: the "hello" echo of ``call``, one caller making one call after another, after a
  warm-up. Measured: the median and 99th percentile of each call's round trip (µs,
  ``perf_counter_ns`` around the call or the ``await``) and calls/s over the timed loop.

  - ``localnet``: a thread's blocking call, ``bench_echo.on(server)("hello")``;
  - ``localnet.aio``: the same awaited by one coroutine inside ``async with
    localnet.aio.Peer(...)``: ``await bench_echo.aio.on(server)("hello")``;
  - ``zmq.asyncio``: a REQ socket of a ``zmq.asyncio.Context``, awaited
    (``send_pyobj``/``recv_pyobj``), to a plain zmq REP socket over ``ipc://``;
  - ``localnet+qt``: the thread call of ``localnet``, to a server whose peer has a
    ``localnet.dispatch.QtDispatcher``: every call runs on the Qt main thread of an
    offscreen ``QApplication`` while ``app.exec()`` runs (what handing a call to a Qt
    main loop adds).

  ``× localnet`` is p50 ÷ the ``localnet`` p50.
- ``aio100``: 100 calls in flight at once from one client process, each caller calling in a
  loop (``calls / 100`` each) after a warm-up of every caller at once (so that every
  connection is open). Measured: total calls/s (all calls ÷ wall time from the start of
  the first caller to the end of the last) and the per-call p50/p99 across callers.

  - ``localnet threads``: 100 threads, each making blocking calls (the process's one peer);
  - ``localnet.aio``: one thread, 100 coroutines, each awaiting its calls.

  ``× threads`` is calls/s ÷ the ``localnet threads`` calls/s (above 1: more calls/s).

Server and client are separate processes: ``python -m benchmarks.aio server|client SYSTEM``.
The localnet servers are one peer serving ``bench_echo`` (``_ln_app.py``) with
``max_workers=128``, the clients' peers have ``max_calls=128``, so 100 calls can be in
flight at once (each on a connection of its own).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

from benchmarks import call
from benchmarks._child import (
    Params,
    SystemUnavailable,
    load_localnet_module,
    need_localnet,
    need_module,
    report,
    run_child,
    wait_for_quit,
)
from benchmarks._harness import Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Ratio, Table
from benchmarks._stats import latency_summary

SEQUENTIAL = ("socket", "asyncio socket", "localnet", "localnet.aio", "zmq.asyncio",
              "localnet+qt")
CONCURRENT = ("localnet threads", "localnet.aio")
SYSTEMS = ("socket", "asyncio socket", "localnet", "localnet.aio", "zmq.asyncio",
           "localnet+qt", "localnet threads")
REQUIRES = {
    "localnet": ("localnet",),
    "localnet.aio": ("localnet",),
    "zmq.asyncio": ("zmq",),
    "localnet+qt": ("localnet", "PySide6"),
    "localnet threads": ("localnet",),
}
# What ``--systems`` selects each row by, besides its own name.
FAMILY = {
    "asyncio socket": "socket",
    "localnet.aio": "localnet",
    "localnet+qt": "localnet",
    "localnet threads": "localnet",
    "zmq.asyncio": "pyzmq",
}
SEQUENTIAL_FLOOR = "localnet"
CONCURRENT_FLOOR = "localnet threads"
IN_FLIGHT = 100
MAX_CALLS = 128  # > IN_FLIGHT: client max_calls and server max_workers
MESSAGE = call.MESSAGE
CLIENT = "bench-client"

Outcome = tuple[int, int, list[int]]  # start ns, end ns, per-call latencies ns
AsyncCaller = Callable[[], Awaitable[Any]]


# --------------------------------------------------------------------------- localnet


def _localnet_part(module: str, name: str) -> Any:
    """``module.name`` of localnet (``localnet.aio.Peer``), or the system is unavailable."""
    need_localnet("connect")
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception as exc:
        raise SystemUnavailable(f"not available ({type(exc).__name__}: {exc})") from exc
    return found


def _ln_app() -> ModuleType:
    return load_localnet_module("_ln_app", "connect")


# --------------------------------------------------------------------------- servers


def _serve_qt(params: Params) -> None:
    """The echo peer, with every served call dispatched onto Qt's main thread."""
    os.environ["QT_QPA_PLATFORM"] = "offscreen"  # no display; never a window
    pyside = need_module("PySide6")
    widgets = need_module("PySide6.QtWidgets")
    core = need_module("PySide6.QtCore")
    app = _ln_app()
    qt_dispatcher = _localnet_part("localnet.dispatch", "QtDispatcher")
    qapp = widgets.QApplication([])
    dispatcher = qt_dispatcher()  # on the main thread, after the QApplication
    # The coordinator's quit (end of file on stdin) ends app.exec().
    notifier = core.QSocketNotifier(0, core.QSocketNotifier.Type.Read)

    def readable(*_: Any) -> None:
        try:
            chunk = os.read(0, 4096)
        except OSError:
            chunk = b""
        if not chunk or b"quit" in chunk:
            notifier.setEnabled(False)
            qapp.quit()

    def ready() -> None:  # once the loop runs
        report(ready={"pyside": str(pyside.__version__)})

    notifier.activated.connect(readable)
    with app.localnet.Peer(name=app.SERVER, max_workers=MAX_CALLS, dispatcher=dispatcher):
        core.QTimer.singleShot(0, ready)
        qapp.exec()


def server(system: str, params: Params) -> None:
    """Serve echo calls until the coordinator says quit."""
    if system == "zmq.asyncio":
        need_module("zmq")
        call.SERVERS["pyzmq"](params)  # a plain REP socket on a thread
        report(ready=True)
        wait_for_quit(params["lifetime"])
        return
    if system in ("socket", "asyncio socket"):
        call.SERVERS["socket"](params)  # a thread per connection, length-prefixed echo
        report(ready=True)
        wait_for_quit(params["lifetime"])
        return
    if system == "localnet+qt":
        _serve_qt(params)
        return
    app = _ln_app()
    with app.localnet.Peer(name=app.SERVER, max_workers=MAX_CALLS):
        report(ready=True)
        wait_for_quit(params["lifetime"])


# --------------------------------------------------------------------------- clients


def _check(reply: Any) -> None:
    if reply != MESSAGE:
        raise AssertionError(f"echo returned {reply!r}")


async def _atimed_loop(call_once: AsyncCaller, warmup: int, calls: int) -> Outcome:
    """The awaited twin of ``call._timed_loop``: warm-up, then ``calls`` timed awaits."""
    reply = None
    for _ in range(warmup):
        reply = await call_once()
    _check(reply)
    latencies = [0] * calls
    clock = time.perf_counter_ns
    begin = clock()
    for i in range(calls):
        t0 = clock()
        await call_once()
        latencies[i] = clock() - t0
    return begin, clock(), latencies


async def _aconcurrent(call_once: AsyncCaller, warmup: int, calls: int, tasks: int) -> Outcome:
    """``tasks`` coroutines at once, ``calls`` timed awaits each, after a common warm-up."""

    async def warm() -> None:
        reply = None
        for _ in range(warmup):
            reply = await call_once()
        _check(reply)

    await asyncio.gather(*(warm() for _ in range(tasks)))  # every connection opens
    clock = time.perf_counter_ns
    latencies: list[int] = []

    async def work() -> None:
        mine = [0] * calls
        for i in range(calls):
            t0 = clock()
            await call_once()
            mine[i] = clock() - t0
        latencies.extend(mine)

    begin = clock()
    await asyncio.gather(*(work() for _ in range(tasks)))
    return begin, clock(), latencies


async def _localnet_aio(params: Params) -> Outcome:
    app = _ln_app()
    aio_peer = _localnet_part("localnet.aio", "Peer")
    per_caller = params["calls"] // params["callers"]
    async with aio_peer(name=CLIENT, max_calls=MAX_CALLS):
        echo = app.bench_echo.aio.on(app.SERVER)

        def call_once() -> Awaitable[Any]:
            return echo(MESSAGE)  # type: ignore[no-any-return]

        if params["callers"] == 1:
            return await _atimed_loop(call_once, params["warmup"], per_caller)
        return await _aconcurrent(call_once, params["warmup"], per_caller, params["callers"])


async def _zmq_asyncio(params: Params) -> Outcome:
    zmq = need_module("zmq")
    zmq_asyncio = need_module("zmq.asyncio")
    context = zmq_asyncio.Context()
    try:
        req = context.socket(zmq.REQ)
        req.connect("ipc://" + params["path"])

        async def call_once() -> Any:
            await req.send_pyobj(MESSAGE)
            return await req.recv_pyobj()

        return await _atimed_loop(call_once, params["warmup"], params["calls"])
    finally:
        context.destroy(linger=0)


async def _asyncio_socket(params: Params) -> Outcome:
    """The raw socket echo awaited on a loop: what asyncio itself costs a round trip."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(params["path"])
    sock.setblocking(False)
    frame = call.HEADER.pack(len(MESSAGE)) + MESSAGE.encode()
    pending: list[Any] = [None, b""]  # the future waiting, the bytes received

    def readable() -> None:
        data = sock.recv(65536)
        future = pending[0]
        if not data:
            if future is not None and not future.done():
                future.set_exception(EOFError("the server closed the connection"))
            return
        pending[1] += data
        if len(pending[1]) >= len(frame) and future is not None:
            reply, pending[1] = pending[1][:len(frame)], pending[1][len(frame):]
            future.set_result(reply[call.HEADER.size:].decode())

    loop.add_reader(sock.fileno(), readable)
    try:
        def call_once() -> Awaitable[Any]:
            future = pending[0] = loop.create_future()
            sock.send(frame)  # (a few bytes into an empty buffer: never partial)
            return future  # type: ignore[no-any-return]

        return await _atimed_loop(call_once, params["warmup"], params["calls"])
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


def _socket(params: Params) -> Outcome:
    with call._socket_callers(params) as make:
        return call._timed_loop(make, params["warmup"], params["calls"],
                                threading.Barrier(1, timeout=params["timeout"]))


def _localnet_threads(params: Params) -> list[Outcome]:
    """Blocking calls from ``callers`` threads sharing the process's peer."""
    app = _ln_app()
    callers: int = params["callers"]
    deadline = time.monotonic() + params["timeout"]
    barrier = threading.Barrier(callers, timeout=params["timeout"])
    with app.localnet.Peer(name=CLIENT, max_calls=MAX_CALLS):
        echo = app.bench_echo.on(app.SERVER)

        def make() -> call.Caller:
            return lambda: echo(MESSAGE)

        per_caller = params["calls"] // callers
        if callers == 1:
            return [call._timed_loop(make, params["warmup"], per_caller, barrier)]
        return call._run_threads(make, params["warmup"], per_caller, barrier, deadline)


def client(system: str, params: Params) -> None:
    """Run the timed calls and report p50/p99/calls per second."""
    if system in ("localnet", "localnet+qt", "localnet threads"):
        outcomes = _localnet_threads(params)
    elif system == "socket":
        outcomes = [_socket(params)]
    else:
        run = {"localnet.aio": _localnet_aio, "zmq.asyncio": _zmq_asyncio,
               "asyncio socket": _asyncio_socket}[system]
        outcomes = [asyncio.run(asyncio.wait_for(run(params), params["timeout"]))]
    begin = min(o[0] for o in outcomes)
    end = max(o[1] for o in outcomes)
    latencies = [lat for o in outcomes for lat in o[2]]
    result = latency_summary(latencies)
    result["calls_per_s"] = len(latencies) / ((end - begin) / 1e9)
    report(result=result)


# --------------------------------------------------------------------------- coordinator


def _sequential_sizes(cfg: Config) -> tuple[int, int]:
    return (2_000, 200) if cfg.quick else (20_000, 1_000)


def _concurrent_sizes(cfg: Config) -> tuple[int, int]:
    """Calls in all and warm-up calls per caller."""
    return (IN_FLIGHT * 100, 5) if cfg.quick else (IN_FLIGHT * 300, 10)


def _pick(cfg: Config, systems: Sequence[str], floor: str) -> list[str]:
    """As ``Config.pick``; ``--systems localnet`` (or ``pyzmq``) selects its variants here."""
    if cfg.systems is None:
        return list(systems)
    return [s for s in systems if s == floor or cfg.wants(s) or cfg.wants(FAMILY.get(s, s))]


def _measure(cfg: Config, callers: int, servers: list[dict[str, Any]]) -> Measure:
    """Measure one system; what a server says when ready (if anything) goes to ``servers``."""
    calls, warmup = _concurrent_sizes(cfg) if callers > 1 else _sequential_sizes(cfg)

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        path = ws.path("echo.sock")
        server_cpus, client_cpus = call._placement(cfg.pin)
        server_proc = ws.spawn("aio", "server", system, {"path": path, "cpus": server_cpus},
                               name="server")
        ready = server_proc.expect("ready", timeout=60)["ready"]
        if isinstance(ready, dict):
            servers.append(ready)
        timeout = 60 + calls * 0.005
        params = {
            "path": path,
            "callers": callers,
            "calls": calls,
            "warmup": warmup,
            "timeout": timeout,
            "cpus": client_cpus,
        }
        client_proc = ws.spawn("aio", "client", system, params, name="client")
        result: dict[str, float] = client_proc.expect("result", timeout=timeout + 30)["result"]
        return {"": result}

    return measure


def run_aio(cfg: Config) -> list[Table]:
    """The ``aio`` scenario: one awaited caller, then 100 calls in flight."""
    calls, warmup = _sequential_sizes(cfg)
    sequential = Table(
        "aio",
        'tiny remote call ("hello" echo), one caller, sequential: awaited vs thread vs Qt',
        [
            Column("p50_us", "p50 µs", spread=True),
            Column("p99_us", "p99 µs"),
            Column("calls_per_s", "calls/s", 0),
        ],
        details=[f"{calls:,} calls after {warmup:,} warm-up, median of {cfg.rounds} round(s)"
                 + call._pinned(cfg)],
        notes=[
            "× localnet = p50 ÷ localnet p50 (a thread's blocking call to the same kind "
            "of server)",
            "socket: the raw AF_UNIX ping-pong of the call scenario (a blocking thread); "
            "asyncio socket: the same echo awaited on a loop (add_reader), the floor of "
            "any awaited call",
            "localnet.aio: one coroutine awaiting bench_echo.aio.on(server) in asyncio.run",
            "zmq.asyncio: awaited REQ socket to a plain REP socket (one thread), ipc://",
            "localnet+qt: blocking call; the server's peer has a QtDispatcher, each call "
            "runs on the main thread of an offscreen QApplication in app.exec()",
        ],
        floor=SEQUENTIAL_FLOOR,
        ratio=Ratio("p50_us", header="× localnet"),
    )
    servers: list[dict[str, Any]] = []
    run_rounds(cfg, sequential, _pick(cfg, SEQUENTIAL, SEQUENTIAL_FLOOR), REQUIRES,
               _measure(cfg, 1, servers))
    calls, warmup = _concurrent_sizes(cfg)
    concurrent = Table(
        "aio100",
        f"the same echo, {IN_FLIGHT} calls in flight at once from one client process",
        [
            Column("calls_per_s", "calls/s", 0, spread=True),
            Column("p50_us", "p50 µs"),
            Column("p99_us", "p99 µs"),
        ],
        details=[
            f"{calls:,} calls in all ({calls // IN_FLIGHT:,} per caller) after {warmup:,} "
            f"warm-up each, median of {cfg.rounds} round(s)" + call._pinned(cfg)
        ],
        notes=[
            "× threads = calls/s ÷ localnet threads calls/s (above 1: more calls per second)",
            f"localnet threads: {IN_FLIGHT} threads making blocking calls through the "
            "process's one peer",
            f"localnet.aio: {IN_FLIGHT} coroutines on one thread; each call in flight has "
            "a connection of its own (max_calls=128)",
        ],
        floor=CONCURRENT_FLOOR,
        ratio=Ratio("calls_per_s", header="× threads"),
    )
    run_rounds(cfg, concurrent, _pick(cfg, CONCURRENT, CONCURRENT_FLOOR), REQUIRES,
               _measure(cfg, IN_FLIGHT, servers))
    return [sequential, concurrent]


if __name__ == "__main__":
    run_child({"server": server, "client": client})
