"""Many threads, slow calls: ``python -m benchmarks.slow_calls [THREADS] [CALLS] [MS]``.

One server process offers ``nap(ms)``, a call that sleeps ``ms`` milliseconds.
One client process runs ``THREADS`` threads (default 50) that each make
``CALLS`` such calls (default 10) of ``MS`` ms (default 50) to the server,
all at once after a barrier.  Printed: the wall time from the barrier to the
last thread's end, and the ideal (``CALLS × MS``, every call concurrent).

Run it from the repository root.  The runtime directory is a fresh temporary
one; the server is ended by its pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

SERVER = textwrap.dedent("""
    import sys, time
    import localnet

    @localnet.connect()
    def nap(ms):
        time.sleep(ms / 1000.0)
        return ms

    peer = localnet.Peer(name="sleeper").start()
    localnet.serve_forever(peer, ready=lambda: print("READY", flush=True))
""")


def main(argv: list[str]) -> None:
    threads = int(argv[0]) if argv else 50
    calls = int(argv[1]) if len(argv) > 1 else 10
    ms = float(argv[2]) if len(argv) > 2 else 50.0
    directory = tempfile.mkdtemp(prefix="ln-bench-", dir="/tmp")
    os.environ["LOCALNET_DIR"] = directory
    os.environ["LOCALNET_REGISTRY_IDLE_EXIT"] = "1"  # the spawned registry leaves soon after
    import localnet

    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ))
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            raise SystemExit("the server did not start")

        @localnet.connect()
        def nap(ms: float) -> float:
            raise AssertionError("runs in the server")

        with localnet.Peer(name="client"):
            nap(0, peer="sleeper")  # warm up: registry lookup, first connection
            barrier = threading.Barrier(threads + 1)
            errors: list[BaseException] = []

            def work() -> None:
                barrier.wait()
                try:
                    for _ in range(calls):
                        nap(ms, peer="sleeper")
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=work) for _ in range(threads)]
            for worker in workers:
                worker.start()
            barrier.wait()
            start = time.perf_counter()
            for worker in workers:
                worker.join(600)
            wall = time.perf_counter() - start
        if errors:
            print(f"{len(errors)} thread(s) failed; first: {errors[0]!r}")
        print(f"{threads} threads x {calls} calls of {ms:g} ms: {wall:.2f} s "
              f"(ideal {calls * ms / 1000:.2f} s)")
    finally:
        end_server(server)
        shutil.rmtree(directory, ignore_errors=True)


def end_server(server: subprocess.Popen[str]) -> None:
    """End a server process by its pid: SIGTERM, then SIGKILL after 10 s."""
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


if __name__ == "__main__":
    main(sys.argv[1:])
