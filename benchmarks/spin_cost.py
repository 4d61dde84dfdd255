"""What polling before sleeping costs: ``python -m benchmarks.spin_cost [ROUNDS] [US ...]``.

One server process offers ``work(us)``, a call whose handler keeps its CPU busy for
``us`` microseconds (default 0, 20, 50, 100, 300 and 1,000), and ``cpu()``, its own
process CPU time. One client process calls ``work(us)`` one call after another, through
two peers: one with ``spin=0`` (the thread sleeps at once while it waits), one with the
default ``spin``; the server runs both ways too, one server process each. For each
duration the two alternate ``ROUNDS`` times (default 3). Printed per duration and way:
the median over rounds of the wall time per call, of the client's CPU per call, and of
the server's CPU per call beyond the handler's own ``us`` (its ``cpu()`` before and
after; ``time.process_time`` on both sides, every thread).

Run it from the repository root. The runtime directory is a fresh temporary one; the
servers are ended by their pids.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from benchmarks.slow_calls import end_server

SERVER = textwrap.dedent("""
    import sys, time
    import localnet

    @localnet.connect()
    def work(us):
        end = time.perf_counter() + us / 1e6
        while time.perf_counter() < end:
            pass
        return us

    @localnet.connect()
    def cpu():
        return time.process_time()

    peer = localnet.Peer(name=sys.argv[1], spin=float(sys.argv[2])).start()
    localnet.serve_forever(peer, ready=lambda: print("READY", flush=True))
""")


def main(argv: list[str]) -> None:
    rounds = int(argv[0]) if argv else 3
    durations = [float(a) for a in argv[1:]] or [0, 20, 50, 100, 300, 1000]
    directory = tempfile.mkdtemp(prefix="ln-bench-", dir="/tmp")
    os.environ["LOCALNET_DIR"] = directory
    os.environ["LOCALNET_REGISTRY_IDLE_EXIT"] = "1"  # the spawned registry leaves soon after
    import localnet
    from localnet._settings import DEFAULT_SPIN

    ways = {"spin=0": 0.0, f"spin={DEFAULT_SPIN * 1e6:g} µs": DEFAULT_SPIN}
    servers: list[subprocess.Popen[str]] = []
    try:
        for index, spin in enumerate(ways.values()):
            server = subprocess.Popen([sys.executable, "-c", SERVER, f"worker-{index}",
                                       str(spin)], stdout=subprocess.PIPE, text=True,
                                      env=dict(os.environ))
            servers.append(server)
            assert server.stdout is not None
            if server.stdout.readline().strip() != "READY":
                raise SystemExit("a server did not start")
        peers = [localnet.Peer(name=f"client-{i}", spin=spin).start()
                 for i, spin in enumerate(ways.values())]
        samples: dict[tuple[float, str], list[tuple[float, float, float]]] = {}
        try:
            for us in durations:
                calls = max(200, min(5000, int(0.5e6 / (us + 20))))
                for _ in range(rounds):
                    for index, way in enumerate(ways):
                        samples.setdefault((us, way), []).append(
                            _measure(peers[index], f"worker-{index}", us, calls))
        finally:
            for peer in peers:
                peer.close()
        print(f"one call after another; median of {rounds} rounds "
              "(server CPU: beyond the handler's own)")
        print(f"{'handler µs':>10}  {'way':<14} {'wall µs/call':>12} {'client CPU µs':>14} "
              f"{'server CPU µs':>14}")
        for (us, way), rows in samples.items():
            wall, client, server_cpu = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"{us:>10g}  {way:<14} {wall:>12.1f} {client:>14.1f} {server_cpu:>14.1f}")
    finally:
        for server in servers:
            end_server(server)
        shutil.rmtree(directory, ignore_errors=True)


def _measure(peer: object, target: str, us: float, calls: int) -> tuple[float, float, float]:
    """(wall µs, client CPU µs, server CPU µs beyond ``us``) per call, over ``calls``."""
    call = peer.call  # type: ignore[attr-defined]
    for _ in range(50):
        call(target, "work", (us,), {})
    server_before = call(target, "cpu", (), {})
    client_before, start = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call(target, "work", (us,), {})
    wall = time.perf_counter() - start
    client = time.process_time() - client_before
    server = call(target, "cpu", (), {}) - server_before
    return (wall / calls * 1e6, client / calls * 1e6, server / calls * 1e6 - us)


if __name__ == "__main__":
    main(sys.argv[1:])
