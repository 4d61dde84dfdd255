"""Scenarios ``call`` and ``call4``: a tiny remote call round trip ("hello" echo).

- ``call``: one client thread makes ``calls`` echo calls after a warm-up. Measured: the
  median and 99th percentile of each call's round trip (µs, ``perf_counter_ns`` around the
  call) and calls/s over the timed loop. ``× floor`` is p50 ÷ the socket floor's p50.
  ``CPU µs/call`` is what the server and the client processes spent, all their threads,
  over the timed loop, divided by its calls (the client's from ``process_time``, the
  server's from its ``/proc`` counters, which tick every 10 ms: about ±0.5 µs here).
- ``call4``: four threads of one client process call at once, ``calls / 4`` each after a
  common barrier. Measured: total calls/s (all calls ÷ wall time from the first thread's
  start to the last thread's end) and the per-call p50/p99 across threads.
  ``× floor`` is the socket floor's calls/s ÷ this system's.

Server and client are separate processes: ``python -m benchmarks.call server|client SYSTEM``.
Every server answers on the thread that read the request (one thread per connection).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks._child import (
    Params,
    load_localnet_module,
    need_module,
    report,
    run_child,
    wait_for_quit,
)
from benchmarks._harness import Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Ratio, Table
from benchmarks._stats import latency_summary

SYSTEMS = ("socket", "mp.connection", "pyzmq", "rpyc", "pyro5", "localnet")
REQUIRES = {
    "pyzmq": ("zmq",),
    "rpyc": ("rpyc",),
    "pyro5": ("Pyro5",),
    "localnet": ("localnet",),
}
FLOOR = "socket"
MESSAGE = "hello"
AUTHKEY = b"localnet-benchmarks"
PYRO_OBJECT = "bench.echo"
HEADER = struct.Struct("!I")

Caller = Callable[[], Any]
CallerFactory = Callable[[], Caller]
Outcome = tuple[int, int, list[int]]  # start ns, end ns, per-call latencies ns
THREAD_NOTES = (
    "socket, mp.connection, rpyc: one connection per thread; the server runs one thread "
    "per connection",
    "pyzmq: one REQ socket per thread, all to one REP socket (which answers one at a time)",
    "pyro5: one proxy per thread (proxies belong to one thread); the daemon uses its pool",
    "localnet: the 4 threads share the process's peer; each call in flight has a connection "
    "of its own (pooled)",
)


# --------------------------------------------------------------------------- servers


def _serve_forever(target: Callable[[], None]) -> None:
    threading.Thread(target=target, daemon=True, name="bench-server").start()


def _accept_loop(listener: socket.socket, session: Callable[[socket.socket], None]) -> None:
    """Accept until the process ends (its lifetime is bounded); one thread per connection."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=session, args=(conn,), daemon=True).start()


def _socket_session(conn: socket.socket) -> None:
    """Read a length-prefixed frame, send it back, on the same thread, until EOF."""
    with conn, conn.makefile("rb") as reader:
        while True:
            head = reader.read(HEADER.size)
            if len(head) < HEADER.size:
                return
            body = reader.read(HEADER.unpack(head)[0])
            conn.sendall(head + body)


def _serve_socket(params: Params) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(params["path"])
    listener.listen(16)
    _serve_forever(lambda: _accept_loop(listener, _socket_session))


def _serve_mp(params: Params) -> None:
    from multiprocessing.connection import Connection, Listener

    listener = Listener(params["path"], family="AF_UNIX", authkey=AUTHKEY)

    def session(conn: Connection) -> None:
        with conn:
            while True:
                try:
                    message = conn.recv()
                except EOFError:
                    return
                conn.send(message)

    def accept_loop() -> None:
        while True:
            conn = listener.accept()
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    _serve_forever(accept_loop)


def _serve_zmq(params: Params) -> None:
    zmq = need_module("zmq")
    rep = zmq.Context().socket(zmq.REP)
    rep.bind("ipc://" + params["path"])

    def loop() -> None:
        while True:
            rep.send_pyobj(rep.recv_pyobj())

    _serve_forever(loop)


def _serve_rpyc(params: Params) -> None:
    rpyc = need_module("rpyc")
    from rpyc.utils.server import ThreadedServer

    class EchoService(rpyc.Service):  # type: ignore[misc, name-defined]
        def exposed_echo(self, message: Any) -> Any:
            return message

    server = ThreadedServer(EchoService, socket_path=params["path"])
    # start() would listen and accept in one blocking call; listening first lets us report
    # readiness only once a client can connect (start() then skips listening again).
    server._listen()
    _serve_forever(server.start)


def _serve_pyro(params: Params) -> None:
    need_module("Pyro5")
    import Pyro5.api

    @Pyro5.api.expose
    class Echo:
        def echo(self, message: Any) -> Any:
            return message

    daemon = Pyro5.api.Daemon(unixsocket=params["path"])
    daemon.register(Echo(), objectId=PYRO_OBJECT)
    _serve_forever(daemon.requestLoop)


SERVERS: dict[str, Callable[[Params], None]] = {
    "socket": _serve_socket,
    "mp.connection": _serve_mp,
    "pyzmq": _serve_zmq,
    "rpyc": _serve_rpyc,
    "pyro5": _serve_pyro,
}


def server(system: str, params: Params) -> None:
    """Serve echo calls until the coordinator says quit."""
    if system == "localnet":
        app = load_localnet_module("_ln_app", "connect")
        with app.localnet.Peer(name=app.SERVER):
            report(ready=True)
            wait_for_quit(params["lifetime"])
        return
    SERVERS[system](params)
    report(ready=True)
    wait_for_quit(params["lifetime"])


# --------------------------------------------------------------------------- clients
# Each context manager yields a factory; a worker thread calls it to get its own caller.


@contextlib.contextmanager
def _socket_callers(params: Params) -> Iterator[CallerFactory]:
    opened: list[Any] = []
    frame = HEADER.pack(len(MESSAGE)) + MESSAGE.encode()

    def make() -> Caller:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(sock)
        sock.connect(params["path"])
        reader = sock.makefile("rb")
        opened.append(reader)  # the socket stays open until its reader is closed too

        def call() -> str:
            sock.sendall(frame)
            return reader.read(HEADER.unpack(reader.read(HEADER.size))[0]).decode()

        return call

    try:
        yield make
    finally:
        for resource in reversed(opened):
            resource.close()


@contextlib.contextmanager
def _mp_callers(params: Params) -> Iterator[CallerFactory]:
    from multiprocessing.connection import Client, Connection

    opened: list[Connection] = []

    def make() -> Caller:
        conn = Client(params["path"], family="AF_UNIX", authkey=AUTHKEY)
        opened.append(conn)

        def call() -> Any:
            conn.send(MESSAGE)
            return conn.recv()

        return call

    try:
        yield make
    finally:
        for conn in opened:
            conn.close()


@contextlib.contextmanager
def _zmq_callers(params: Params) -> Iterator[CallerFactory]:
    zmq = need_module("zmq")
    context = zmq.Context()

    def make() -> Caller:
        req = context.socket(zmq.REQ)
        req.connect("ipc://" + params["path"])

        def call() -> Any:
            req.send_pyobj(MESSAGE)
            return req.recv_pyobj()

        return call

    try:
        yield make
    finally:
        context.destroy(linger=0)


@contextlib.contextmanager
def _rpyc_callers(params: Params) -> Iterator[CallerFactory]:
    need_module("rpyc")
    from rpyc.utils.factory import unix_connect

    opened: list[Any] = []

    def make() -> Caller:
        conn = unix_connect(params["path"])
        opened.append(conn)
        return _bind_message(conn.root.echo)  # bound once: no attribute round trip per call

    try:
        yield make
    finally:
        for conn in opened:
            conn.close()


@contextlib.contextmanager
def _pyro_callers(params: Params) -> Iterator[CallerFactory]:
    need_module("Pyro5")
    import Pyro5.api

    opened: list[Any] = []

    def make() -> Caller:  # called in the thread that will use the proxy
        proxy = Pyro5.api.Proxy(f"PYRO:{PYRO_OBJECT}@./u:{params['path']}")
        opened.append(proxy)
        return _bind_message(proxy.echo)

    try:
        yield make
    finally:
        for proxy in opened:
            with contextlib.suppress(Exception):  # the measurement is done; never mask it
                proxy._pyroClaimOwnership()
                proxy._pyroRelease()


@contextlib.contextmanager
def _localnet_callers(params: Params) -> Iterator[CallerFactory]:
    app = load_localnet_module("_ln_app", "connect")
    echo, target = app.bench_echo, app.SERVER

    def call() -> Any:
        return echo(MESSAGE, peer=target)

    with app.localnet.Peer(name="bench-client"):
        yield lambda: call


def _bind_message(method: Callable[[str], Any]) -> Caller:
    """A caller sending MESSAGE through an already-resolved remote method."""
    return lambda: method(MESSAGE)


CLIENTS: dict[str, Callable[[Params], contextlib.AbstractContextManager[CallerFactory]]] = {
    "socket": _socket_callers,
    "mp.connection": _mp_callers,
    "pyzmq": _zmq_callers,
    "rpyc": _rpyc_callers,
    "pyro5": _pyro_callers,
    "localnet": _localnet_callers,
}


def _timed_loop(make: CallerFactory, warmup: int, calls: int, start: threading.Barrier) -> Outcome:
    call = make()
    reply = None
    for _ in range(warmup):
        reply = call()
    if reply != MESSAGE:
        raise AssertionError(f"echo returned {reply!r}")
    latencies = [0] * calls
    clock = time.perf_counter_ns
    start.wait()
    begin = clock()
    for i in range(calls):
        t0 = clock()
        call()
        latencies[i] = clock() - t0
    return begin, clock(), latencies


class _CpuClock:
    """CPU seconds of this process and of the server, read when the timed calls begin
    (the barrier's action) and when they are all done."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self._server = psutil.Process(server_pid)
        self.start = self.end = 0.0

    def now(self) -> float:
        times = self._server.cpu_times()
        return time.process_time() + times.user + times.system

    def begin(self) -> None:
        self.start = self.now()


def client(system: str, params: Params) -> None:
    """Run the timed calls (``threads`` threads) and report p50/p99/calls per second."""
    threads: int = params["threads"]
    per_thread = params["calls"] // threads
    deadline = time.monotonic() + params["timeout"]
    cpu = _CpuClock(params["server_pid"])
    with CLIENTS[system](params) as make:
        barrier = threading.Barrier(threads, action=cpu.begin, timeout=params["timeout"])
        if threads == 1:
            outcomes = [_timed_loop(make, params["warmup"], per_thread, barrier)]
        else:
            outcomes = _run_threads(make, params["warmup"], per_thread, barrier, deadline)
        cpu.end = cpu.now()
    begin = min(o[0] for o in outcomes)
    end = max(o[1] for o in outcomes)
    latencies = [lat for o in outcomes for lat in o[2]]
    result = latency_summary(latencies)
    result["calls_per_s"] = len(latencies) / ((end - begin) / 1e9)
    result["cpu_us"] = (cpu.end - cpu.start) / len(latencies) * 1e6
    report(result=result)


def _run_threads(
    make: CallerFactory, warmup: int, calls: int, barrier: threading.Barrier, deadline: float
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            outcomes.append(_timed_loop(make, warmup, calls, barrier))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    # Each thread runs in a copy of the main thread's context, so that context-local state
    # (e.g. a current peer kept in a ContextVar) is the same as in a single-threaded client.
    workers = [
        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        for _ in range(barrier.parties)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    if len(outcomes) != len(workers):
        raise TimeoutError("client threads did not finish in time")
    return outcomes


# --------------------------------------------------------------------------- coordinator


def _sizes(cfg: Config) -> tuple[int, int]:
    return (2_000, 200) if cfg.quick else (20_000, 1_000)


def _placement(pin: str | None) -> tuple[list[int] | None, list[int] | None]:
    """The CPUs of the server and the client for ``--pin`` (None: wherever the kernel says)."""
    if pin is None:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "same":
        return cpus[:1], cpus[:1]
    if len(cpus) < 2:
        raise SystemExit("--pin split needs two CPUs")
    return cpus[:1], cpus[1:2]


def _measure(cfg: Config, threads: int) -> Measure:
    calls, warmup = _sizes(cfg)

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        path = ws.path("echo.sock")
        server_cpus, client_cpus = _placement(cfg.pin)
        server_proc = ws.spawn("call", "server", system, {"path": path, "cpus": server_cpus},
                               name="server")
        server_proc.expect("ready", timeout=60)
        timeout = 60 + calls * 0.005
        params = {
            "path": path,
            "threads": threads,
            "calls": calls,
            "warmup": warmup,
            "timeout": timeout,
            "cpus": client_cpus,
            "server_pid": server_proc.pid,
        }
        client_proc = ws.spawn("call", "client", system, params, name="client")
        result: dict[str, float] = client_proc.expect("result", timeout=timeout + 30)["result"]
        return {"": result}

    return measure


def _pinned(cfg: Config) -> str:
    if cfg.pin == "same":
        return "; server and client pinned to one CPU"
    if cfg.pin == "split":
        return "; server and client pinned to two CPUs"
    return ""


def run_call(cfg: Config) -> Table:
    """The ``call`` scenario: one client thread."""
    calls, warmup = _sizes(cfg)
    table = Table(
        "call",
        'tiny remote call round trip ("hello" echo), one client thread',
        [
            Column("p50_us", "p50 µs", spread=True),
            Column("p99_us", "p99 µs"),
            Column("calls_per_s", "calls/s", 0),
            Column("cpu_us", "CPU µs/call"),
        ],
        details=[f"{calls:,} calls after {warmup:,} warm-up, median of {cfg.rounds} round(s)"
                 + _pinned(cfg)],
        notes=[
            "× floor = p50 ÷ socket p50; socket = raw AF_UNIX, 4-byte length prefix, "
            "buffered reader; the others pickle (pyro5: serpent)",
            "CPU µs/call = the server's and the client's CPU time over the timed calls ÷ calls",
        ],
        floor=FLOOR,
        ratio=Ratio("p50_us"),
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS, FLOOR), REQUIRES, _measure(cfg, 1))


def run_call4(cfg: Config) -> Table:
    """The ``call4`` scenario: four client threads in one process."""
    calls, warmup = _sizes(cfg)
    table = Table(
        "call4",
        "the same echo from 4 threads of one client process at once",
        [
            Column("calls_per_s", "calls/s", 0, spread=True),
            Column("p50_us", "p50 µs"),
            Column("p99_us", "p99 µs"),
            Column("cpu_us", "CPU µs/call"),
        ],
        details=[
            f"{calls:,} calls in all ({calls // 4:,} per thread) after {warmup:,} warm-up "
            f"each, median of {cfg.rounds} round(s)" + _pinned(cfg)
        ],
        notes=["× floor = socket calls/s ÷ calls/s", *THREAD_NOTES],
        floor=FLOOR,
        ratio=Ratio("calls_per_s", higher_is_better=True),
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS, FLOOR), REQUIRES, _measure(cfg, 4))


if __name__ == "__main__":
    run_child({"server": server, "client": client})
