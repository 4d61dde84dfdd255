"""Scenario ``fanout``: one publisher process, K subscriber processes, M small events.

Each event is a small pickled tuple ``(i, "payload")``. Measured, per K:

- events/s delivered end to end: M ÷ (the moment the last subscriber counted its M-th
  event − the moment the publisher started sending). Both are ``time.monotonic()``
  (CLOCK_MONOTONIC, one clock for all processes of the machine);
- sent/s: M ÷ the publisher's own send loop (how fast ``send`` / the trigger returns);
- lost: M·K − the events the subscribers counted before their deadline (worst round);
- publisher CPU per event: the publisher process's CPU time (every thread, user and
  system) from its first send until every subscriber had counted its M events, ÷ M.
  This is the figure that should not grow with K once subscribers share a payload.

Every subscriber is connected (and, for pyzmq, has received a probe) before the counted
stream starts, so the slow joiner costs nothing here; see the table notes per system.
"""

from __future__ import annotations

import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from benchmarks._child import (
    EOF_COMMAND,
    Params,
    expect_command,
    load_localnet_module,
    need_module,
    read_command,
    report,
    run_child,
    wait_for_quit,
)
from benchmarks._harness import Child, Config, Groups, Measure, Workspace, run_rounds
from benchmarks._report import Column, Table

SYSTEMS = ("pyzmq", "socket", "localnet")
REQUIRES = {"pyzmq": ("zmq",), "localnet": ("localnet",)}
KS = (1, 4, 16)
PAYLOAD = "payload"
PROBE = pickle.dumps(("probe",), protocol=5)
HEADER = struct.Struct("!I")
PROBE_INTERVAL = 0.002
READY_TIMEOUT = 60.0


# --------------------------------------------------------------------------- publishers


def _publish_zmq(params: Params) -> None:
    zmq = need_module("zmq")
    pub = zmq.Context().socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("ipc://" + params["path"])
    report(ready=True)
    expect_command("probe", READY_TIMEOUT)
    # The slow-joiner barrier: probe until the coordinator, told by every subscriber that a
    # probe arrived, says go. Subscribers ignore probes; PUB/SUB keeps order per connection.
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        pub.send(PROBE)
        command = read_command(PROBE_INTERVAL)
        if command == "go":
            break
        if command is not None or time.monotonic() > deadline:
            raise RuntimeError(f"probe barrier failed (command {command!r})")
    first = time.monotonic()
    cpu = time.process_time()
    for i in range(params["events"]):
        pub.send(pickle.dumps((i, PAYLOAD), protocol=5))
    report(result={"first": first, "sent": time.monotonic()})
    report_cpu_until_quit(cpu, params["lifetime"])


def _publish_socket(params: Params) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(params["path"])
    listener.listen(64)
    report(ready=True)
    expect_command("go", READY_TIMEOUT)
    listener.settimeout(READY_TIMEOUT)
    subscribers = [listener.accept()[0] for _ in range(params["k"])]
    for sub in subscribers:
        sub.settimeout(params["timeout"])
    first, cpu = time.monotonic(), time.process_time()
    for i in range(params["events"]):
        data = pickle.dumps((i, PAYLOAD), protocol=5)
        frame = HEADER.pack(len(data)) + data
        for sub in subscribers:
            sub.sendall(frame)
    report(result={"first": first, "sent": time.monotonic()})
    report_cpu_until_quit(cpu, params["lifetime"])


def stream_ticks(app: Any, peer: Any, params: Params) -> None:
    """A localnet publisher's counted stream: ready, then on "go" every event, a flush,
    the times reported; then wait for quit."""
    report(ready=True)
    expect_command("go", READY_TIMEOUT)
    tick = app.bench_tick
    first, cpu = time.monotonic(), time.process_time()
    for i in range(params["events"]):
        tick(i, PAYLOAD)
    sent = time.monotonic()
    peer.flush(timeout=params["timeout"])
    report(result={"first": first, "sent": sent, "flushed": time.monotonic()})
    report_cpu_until_quit(cpu, params["lifetime"])


def report_cpu_until_quit(cpu: float, lifetime: float) -> None:
    """Answer "cpu" with the process's CPU seconds since ``cpu``; return on quit."""
    deadline = time.monotonic() + lifetime
    while (remaining := deadline - time.monotonic()) > 0:
        command = read_command(remaining)
        if command == "cpu":
            report(cpu=time.process_time() - cpu)
        elif command == EOF_COMMAND:
            return


def _publish_localnet(params: Params) -> None:
    app = load_localnet_module("_ln_app", "event")
    with app.localnet.Peer(name="bench-publisher") as peer:
        stream_ticks(app, peer, params)


# --------------------------------------------------------------------------- subscribers


def _subscribe_zmq(params: Params) -> None:
    zmq = need_module("zmq")
    sub = zmq.Context().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.RCVTIMEO, 200)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("ipc://" + params["path"])
    report(ready=True)
    expected, deadline = params["events"], time.monotonic() + params["timeout"]
    count, probed, first, last = 0, False, None, None
    while count < expected and time.monotonic() < deadline:
        try:
            message = pickle.loads(sub.recv())
        except zmq.Again:
            continue
        if len(message) == 1:
            if not probed:
                probed = True
                report(probed=True)
            continue
        count += 1
        if first is None:
            first = time.monotonic()
    if count == expected:
        last = time.monotonic()
    report(result={"count": count, "first": first, "last": last})
    wait_for_quit(params["lifetime"])


def _subscribe_socket(params: Params) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(params["path"])
    report(ready=True)
    expected, deadline = params["events"], time.monotonic() + params["timeout"]
    sock.settimeout(params["timeout"])
    count, first, last = 0, None, None
    with sock.makefile("rb") as reader:
        while count < expected:
            head = reader.read(HEADER.size)
            if len(head) < HEADER.size:
                break
            pickle.loads(reader.read(HEADER.unpack(head)[0]))
            count += 1
            if first is None:
                first = time.monotonic()
            if count % 1024 == 0 and time.monotonic() > deadline:
                break
    if count == expected:
        last = time.monotonic()
    report(result={"count": count, "first": first, "last": last})
    wait_for_quit(params["lifetime"])


def _subscribe_localnet(params: Params) -> None:
    subs = load_localnet_module("_ln_subs", "subscribe")
    subs.TICKS.expect(params["events"])
    with subs.localnet.Peer(name=params["name"]):
        report(ready=True)  # subscribed: the peer has started (DESIGN.md section 2)
        subs.TICKS.wait(params["timeout"])
        report(result=subs.TICKS.snapshot())
        # Stay until told: the publisher's flush() waits for our acknowledgements.
        wait_for_quit(params["lifetime"])


PUBLISHERS: dict[str, Callable[[Params], None]] = {
    "pyzmq": _publish_zmq,
    "socket": _publish_socket,
    "localnet": _publish_localnet,
}
SUBSCRIBERS: dict[str, Callable[[Params], None]] = {
    "pyzmq": _subscribe_zmq,
    "socket": _subscribe_socket,
    "localnet": _subscribe_localnet,
}


def publisher(system: str, params: Params) -> None:
    """Send ``events`` events to every subscriber once the coordinator says go."""
    PUBLISHERS[system](params)


def subscriber(system: str, params: Params) -> None:
    """Count events until ``events`` arrived or the deadline passed; report the count."""
    SUBSCRIBERS[system](params)


# --------------------------------------------------------------------------- coordinator


def _events(cfg: Config) -> int:
    return 5_000 if cfg.quick else 50_000


def _measure(cfg: Config) -> Measure:
    events = _events(cfg)
    timeout = 60.0 if cfg.quick else 180.0

    def measure(system: str, variant: str, ws: Workspace) -> Groups:
        k = int(variant.removeprefix("K="))
        common = {"path": ws.path("fanout.sock"), "events": events, "timeout": timeout, "k": k}
        lifetime = timeout + 120

        def spawn_subscribers() -> list[Child]:
            subs = [
                ws.spawn(
                    "fanout",
                    "subscriber",
                    system,
                    {**common, "name": f"bench-sub-{i}"},
                    name=f"sub{i}",
                    lifetime=lifetime,
                )
                for i in range(k)
            ]
            for sub in subs:
                sub.expect("ready", READY_TIMEOUT)
            return subs

        # localnet: subscribers first, the publisher finds them when it starts; the others
        # need the publisher's socket to exist before subscribers connect.
        subs = spawn_subscribers() if system == "localnet" else []
        pub = ws.spawn("fanout", "publisher", system, common, name="pub", lifetime=lifetime)
        pub.expect("ready", READY_TIMEOUT)
        if system != "localnet":
            subs = spawn_subscribers()
        if system == "pyzmq":
            pub.send("probe")
            for sub in subs:
                sub.expect("probed", READY_TIMEOUT)
        pub.send("go")
        sent = pub.expect("result", timeout + 30)["result"]
        counted = [sub.expect("result", timeout + 30)["result"] for sub in subs]
        pub.send("cpu")  # every subscriber is done: what the publisher spent on them
        sent["cpu"] = pub.expect("cpu", 30)["cpu"]
        return {variant: _metrics(events, k, sent, counted)}

    return measure


def _metrics(
    events: int, k: int, sent: dict[str, Any], counted: list[dict[str, Any]]
) -> dict[str, float]:
    received = sum(c["count"] for c in counted)
    metrics = {
        "sent_per_s": events / (sent["sent"] - sent["first"]),
        "lost": float(events * k - received),
    }
    if "cpu" in sent:  # (the fan-out across hosts, benchmarks/nats.py, does not ask for it)
        metrics["pub_cpu_us"] = sent["cpu"] / events * 1e6
    if all(c["last"] is not None for c in counted):
        elapsed = max(c["last"] for c in counted) - sent["first"]
        metrics["events_per_s"] = events / elapsed
        metrics["deliveries_per_s"] = events * k / elapsed
    return metrics


def run_fanout(cfg: Config) -> Table:
    """The ``fanout`` scenario for K = 1, 4, 16 subscribers."""
    events = _events(cfg)
    table = Table(
        "fanout",
        "one publisher, K subscriber processes, small pickled events, all counted",
        [
            Column("events_per_s", "events/s", 0, spread=True),
            Column("deliveries_per_s", "deliveries/s", 0),
            Column("sent_per_s", "sent/s", 0),
            Column("pub_cpu_us", "pub CPU µs/event", 2),
            Column("lost", "lost", 0, worst=True),
        ],
        details=[
            f"{events:,} events (i, 'payload') per run; events/s = events ÷ (last subscriber "
            f"done − first send); deliveries/s = events/s × K; median of {cfg.rounds} round(s)"
        ],
        notes=[
            "pyzmq: PUB/SUB over ipc://, SNDHWM/RCVHWM 0 (unlimited); publisher probes until "
            "every subscriber saw a probe, then the counted stream",
            "socket: one AF_UNIX connection per subscriber, 4-byte length + pickle frame, "
            "sendall to each in turn",
            "localnet: @localnet.event publisher started after the subscribers' peers; "
            "publisher calls peer.flush() at the end",
            "lost = events × K − counted (worst round)",
        ],
        groups=[f"K={k}" for k in KS],
        group_header="K",
    )
    variants = [f"K={k}" for k in KS]
    return run_rounds(cfg, table, cfg.pick(SYSTEMS), REQUIRES, _measure(cfg), variants)


if __name__ == "__main__":
    run_child({"publisher": publisher, "subscriber": subscriber})
