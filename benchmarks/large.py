"""Scenario ``large``: a NumPy array from a sender process to an ndarray in the receiver.

For each size (1 MiB, 16 MiB, 256 MiB and, unless ``--quick``, 1 GiB of float64) the
sender makes a few warm-up transfers of one already-faulted array, then times several
transfers, each from the start of the send until the receiver's acknowledgement is back
(``perf_counter`` round trip). The receiver gets a fresh ndarray each time, reads its first
and last element and acknowledges its size. Reported: the median ms per transfer, GB/s
(10^9 bytes/s) and ``× floor`` = ms ÷ the memcpy floor's ms at that size.

Systems: ``memcpy`` (one ``np.copyto`` into an already-faulted buffer in one process: the
floor), ``pickle5-socket``, ``mp.connection``, ``localnet-call``, ``localnet-event`` (time
trigger → ``peer.flush()``) and ``localnet-alloc`` (the array comes from ``localnet.empty``).
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from benchmarks._child import (
    EOF_COMMAND,
    Params,
    expect_command,
    load_localnet_module,
    need_localnet,
    need_module,
    read_command,
    report,
    run_child,
    wait_for_quit,
)
from benchmarks._harness import Child, Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Ratio, Table
from benchmarks._stats import median

SYSTEMS = (
    "memcpy",
    "pickle5-socket",
    "mp.connection",
    "localnet-call",
    "localnet-event",
    "localnet-alloc",
)
FLOOR = "memcpy"
REQUIRES = {
    system: ("numpy", "localnet") if system.startswith("localnet") else ("numpy",)
    for system in SYSTEMS
}
MIB = 1 << 20
AUTHKEY = b"localnet-benchmarks"
FRAME = struct.Struct("!QQ")  # pickle length, number of out-of-band buffers
ACK = struct.Struct("!Q")  # bytes received
# size in MiB -> (warm-up transfers, timed transfers)
PLAN = {1: (5, 30), 16: (3, 10), 256: (1, 5), 1024: (1, 3)}
QUICK_PLAN = {1: (3, 10), 16: (2, 5), 256: (1, 3)}

Transfer = Callable[[Any], int]


def _label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"


def _touch(array: Any) -> int:
    """What every receiver does with its ndarray: read both ends, return its size."""
    if array.size:
        _ = array.flat[0] + array.flat[-1]
    return int(array.nbytes)


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    """Exactly ``size`` bytes, or None at a clean end of file before the first byte."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise EOFError(f"connection closed after {got} of {size} bytes")
        got += n
    return buffer


def _recv_into_new(sock: socket.socket, size: int) -> Any:
    """Receive ``size`` bytes into a fresh, uninitialised NumPy byte buffer."""
    np = need_module("numpy")
    buffer = np.empty(size, dtype=np.uint8)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError(f"connection closed after {got} of {size} bytes")
        got += n
    return buffer


# --------------------------------------------------------------------------- receivers


def _receive_pickle5(params: Params) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(params["path"])
    listener.listen(1)
    report(ready=True)
    listener.settimeout(params["timeout"])
    conn, _ = listener.accept()
    conn.settimeout(params["timeout"])
    with conn:
        while (head := _recv_exact(conn, FRAME.size)) is not None:
            meta_size, count = FRAME.unpack(head)
            sizes = struct.unpack(f"!{count}Q", _recv_exact(conn, 8 * count) or b"")
            meta = _recv_exact(conn, meta_size)
            buffers = [_recv_into_new(conn, size) for size in sizes]
            array = pickle.loads(meta or b"", buffers=buffers)
            conn.sendall(ACK.pack(_touch(array)))


def _receive_mp(params: Params) -> None:
    np = need_module("numpy")
    from multiprocessing.connection import Listener

    with Listener(params["path"], family="AF_UNIX", authkey=AUTHKEY) as listener:
        report(ready=True)
        with listener.accept() as conn:
            while True:
                try:
                    data = conn.recv_bytes()
                except EOFError:
                    return
                conn.send_bytes(ACK.pack(_touch(np.frombuffer(data, dtype=np.float64))))


def _receive_localnet_call(params: Params) -> None:
    app = load_localnet_module("_ln_app", "connect")
    with app.localnet.Peer(name=app.SERVER):
        report(ready=True)
        wait_for_quit(params["lifetime"])


def _receive_localnet_alloc(params: Params) -> None:
    need_localnet("empty")
    _receive_localnet_call(params)


def _receive_localnet_event(params: Params) -> None:
    subs = load_localnet_module("_ln_subs", "subscribe")
    deadline = time.monotonic() + params["lifetime"]
    with subs.localnet.Peer(name="bench-subscriber"):
        report(ready=True)
        # The coordinator asks for the count after each size, to check every event arrived.
        while (remaining := deadline - time.monotonic()) > 0:
            command = read_command(remaining)
            if command == "report":
                report(count=subs.ARRAYS.snapshot()["count"])
            elif command in (None, EOF_COMMAND):
                return


RECEIVERS: dict[str, Callable[[Params], None]] = {
    "pickle5-socket": _receive_pickle5,
    "mp.connection": _receive_mp,
    "localnet-call": _receive_localnet_call,
    "localnet-alloc": _receive_localnet_alloc,
    "localnet-event": _receive_localnet_event,
}


# --------------------------------------------------------------------------- senders
# Each yields a transfer function: send one array, wait for the receiver, return its size.


@contextmanager
def _send_pickle5(params: Params) -> Iterator[Transfer]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(params["timeout"])
    sock.connect(params["path"])

    def transfer(array: Any) -> int:
        buffers: list[pickle.PickleBuffer] = []
        meta = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
        raws = [buffer.raw() for buffer in buffers]
        sizes = struct.pack(f"!{len(raws)}Q", *(raw.nbytes for raw in raws))
        sock.sendall(FRAME.pack(len(meta), len(raws)) + sizes + meta)
        for raw in raws:
            sock.sendall(raw)
        return int(ACK.unpack(_recv_exact(sock, ACK.size) or b"")[0])

    with sock:
        yield transfer


@contextmanager
def _send_mp(params: Params) -> Iterator[Transfer]:
    from multiprocessing.connection import Client

    with Client(params["path"], family="AF_UNIX", authkey=AUTHKEY) as conn:

        def transfer(array: Any) -> int:
            conn.send_bytes(array)
            return int(ACK.unpack(conn.recv_bytes())[0])

        yield transfer


@contextmanager
def _send_localnet_call(params: Params) -> Iterator[Transfer]:
    app = load_localnet_module("_ln_app", "connect")
    with app.localnet.Peer(name="bench-client"):
        yield app.bench_take_array.on(app.SERVER, timeout=params["timeout"])


@contextmanager
def _send_localnet_event(params: Params) -> Iterator[Transfer]:
    app = load_localnet_module("_ln_app", "event")
    with app.localnet.Peer(name="bench-publisher") as peer:

        def transfer(array: Any) -> int:
            app.bench_array(array)
            peer.flush(timeout=params["timeout"])
            return int(array.nbytes)

        yield transfer


SENDERS: dict[str, Callable[[Params], AbstractContextManager[Transfer]]] = {
    "pickle5-socket": _send_pickle5,
    "mp.connection": _send_mp,
    "localnet-call": _send_localnet_call,
    "localnet-alloc": _send_localnet_call,
    "localnet-event": _send_localnet_event,
}


def _allocate(system: str, items: int) -> Any:
    np = need_module("numpy")
    if system == "localnet-alloc":
        array = need_localnet("empty").empty((items,), np.float64)
    else:
        array = np.empty(items, dtype=np.float64)
    array.fill(1.0)  # fault every page before timing
    return array


def receiver(system: str, params: Params) -> None:
    """Receive arrays until the sender is done (or the coordinator says quit)."""
    RECEIVERS[system](params)


def sender(system: str, params: Params) -> None:
    """Send each size's warm-up and timed transfers; report ms per timed transfer.

    After each size the sender reports ``size_done`` and waits for ``next``, so that the
    coordinator can check the receiver's side; a size that fails is reported as an error
    and the next size is tried.
    """
    with SENDERS[system](params) as transfer:
        for mib, (warmup, timed) in params["plan"]:
            try:
                times = _transfers(system, transfer, mib * MIB // 8, warmup, timed)
            except Exception as exc:  # a size that fails must not hide the other sizes
                report(size_done=mib, failed=f"{type(exc).__name__}: {exc}")
            else:
                report(size_done=mib, ms=times, transfers=warmup + timed)
            expect_command("next", params["timeout"])


def _transfers(system: str, transfer: Transfer, items: int, warmup: int, timed: int) -> list[float]:
    array = _allocate(system, items)
    times = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        received = transfer(array)
        elapsed = time.perf_counter() - start
        if received != array.nbytes:
            raise AssertionError(f"receiver got {received} of {array.nbytes} bytes")
        if i >= warmup:
            times.append(elapsed * 1e3)
    return times


def copy(system: str, params: Params) -> None:
    """The floor: one ``np.copyto`` into an already-faulted buffer, in one process."""
    np = need_module("numpy")
    for mib, (warmup, timed) in params["plan"]:
        source = _allocate(system, mib * MIB // 8)
        target = np.zeros_like(source)
        times = []
        for i in range(warmup + timed):
            start = time.perf_counter()
            np.copyto(target, source)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        del source, target
        report(size_done=mib, ms=times)
        expect_command("next", params["timeout"])


# --------------------------------------------------------------------------- coordinator


def _plan(cfg: Config) -> dict[int, tuple[int, int]]:
    return QUICK_PLAN if cfg.quick else PLAN


def _measure(cfg: Config) -> Measure:
    plan = sorted(_plan(cfg).items())
    timeout = 120.0 if cfg.quick else 300.0
    params = {"plan": plan, "timeout": timeout}
    lifetime = timeout * 2 + 60

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        if system == FLOOR:
            copier = ws.spawn("large", "copy", system, params, name="copy", lifetime=lifetime)
            return _collect(plan, copier, None, timeout)
        common = {**params, "path": ws.path("large.sock")}
        recv = ws.spawn("large", "receiver", system, common, name="receiver", lifetime=lifetime)
        recv.expect("ready", 60)
        send = ws.spawn("large", "sender", system, common, name="sender", lifetime=lifetime)
        return _collect(plan, send, recv if system == "localnet-event" else None, timeout)

    return measure


def _collect(
    plan: list[tuple[int, tuple[int, int]]], sender: Child, subscriber: Child | None, timeout: float
) -> Groups:
    """Read each size's report; for events, check the subscriber handled every one."""
    groups: dict[str, dict[str, float] | str] = {}
    handled = 0
    for mib, _ in plan:
        done = sender.expect("size_done", timeout)
        error = done.get("failed")
        if subscriber is not None:
            transfers = done.get("transfers", 0)
            expected = handled + transfers
            subscriber.send("report")
            handled = subscriber.expect("count", 30)["count"]
            if error is None and handled != expected:
                missing = expected - handled
                error = f"flush() returned, but {missing} of {transfers} events were not handled"
        if error is not None:
            groups[_label(mib)] = error
        else:
            ms = median(done["ms"])
            groups[_label(mib)] = {"ms": ms, "gbps": mib * MIB / (ms / 1e3) / 1e9}
        sender.send("next")
    return groups


def run_large(cfg: Config) -> Table:
    """The ``large`` scenario."""
    plan = _plan(cfg)
    counts = ", ".join(f"{_label(m)}: {w}+{t}" for m, (w, t) in sorted(plan.items()))
    table = Table(
        "large",
        "a float64 NumPy array from a sender process to an ndarray in the receiver",
        [Column("ms", "ms", 3), Column("gbps", "GB/s", 2)],
        details=[
            f"median ms per transfer (round trip to the receiver's ack), warm-up + timed "
            f"transfers: {counts}; median of {cfg.rounds} round(s)"
        ],
        notes=[
            "× floor = ms ÷ memcpy ms at the same size; memcpy = np.copyto into a faulted "
            "buffer, one process",
            "pickle5-socket: protocol-5 out-of-band buffers over AF_UNIX, received into fresh "
            "np.empty buffers; mp.connection: send_bytes / recv_bytes + np.frombuffer",
            "localnet-call: @localnet.connect function .on(peer, timeout)(array); "
            "localnet-event: trigger + peer.flush(); localnet-alloc: localnet.empty array "
            "through the call",
        ],
        floor=FLOOR,
        ratio=Ratio("ms"),
        groups=[_label(m) for m in sorted(plan)],
        group_header="size",
    )
    return run_rounds(cfg, table, cfg.pick(SYSTEMS, FLOOR), REQUIRES, _measure(cfg))


if __name__ == "__main__":
    run_child({"receiver": receiver, "sender": sender, "copy": copy})
