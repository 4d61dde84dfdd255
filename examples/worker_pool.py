"""A worker pool without a GUI: N worker processes, one driver.

Each worker offers ``work(item)`` in the group ``workers``; the driver finds
them with ``localnet.peers(group="workers")``, keeps one thread per worker
pulling items from a shared queue (so fast workers take more), and
collects the results::

    python examples/worker_pool.py worker          # terminals 1..N: each serves until Ctrl-C
    python examples/worker_pool.py drive           # terminal N+1: distributes, prints, exits

Each worker prints ``worker 'worker-4242' ready in group 'workers'; Ctrl-C to
stop`` and one line per item; the driver prints::

    3 workers: worker-4242, worker-4243, worker-4244
    20 items done in 0.05 s
      worker-4242: 7 items
      ...
    sum of squares: 2470

``drive --items N`` sends N items (default 20); ``worker --delay S`` makes
each item take S seconds.  If a worker dies, its unfinished item goes to
another worker.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time

import localnet

GROUP = "workers"
DELAY = 0.0  # set by the worker role
NAME = ""  # this worker's peer name


@localnet.connect()
def work(item: int) -> tuple[int, int, str]:
    """The item, its square, and who computed it."""
    time.sleep(DELAY)  # stands for real work
    print(f"work({item}) -> {item * item}", flush=True)
    return item, item * item, NAME


def worker(delay: float) -> int:
    """Serve ``work`` in group ``workers`` until Ctrl-C or SIGTERM."""
    global DELAY, NAME
    DELAY, NAME = delay, f"worker-{os.getpid()}"
    peer = localnet.Peer(name=NAME, group=GROUP)
    localnet.serve_forever(peer, ready=lambda: print(
        f"worker {peer.name!r} ready in group {GROUP!r}; Ctrl-C to stop", flush=True))
    return 0


def _feed(remote: localnet.RemotePeer, items: queue.Queue[int],
          results: dict[int, tuple[int, str]], lock: threading.Lock) -> None:
    """One driver thread: give ``remote`` items until the queue is empty or it dies."""
    while True:
        try:
            item = items.get_nowait()
        except queue.Empty:
            return
        try:
            number, square, name = work(item, peer=remote)
        except (localnet.ConnectionLost, localnet.PeerNotFound):
            items.put(item)  # another worker will do it
            print(f"{remote.name} went away; item {item} goes back to the queue", flush=True)
            return
        with lock:
            results[number] = (square, name)


def drive(count: int) -> int:
    """Distribute ``count`` items over the live workers and print the results."""
    with localnet.Peer(name=f"driver-{os.getpid()}"):
        workers = localnet.peers(group=GROUP)
        if not workers:
            print(f"no workers: start 'python {sys.argv[0]} worker' first", file=sys.stderr)
            return 1
        print(f"{len(workers)} workers: {', '.join(w.name for w in workers)}", flush=True)
        items: queue.Queue[int] = queue.Queue()
        for item in range(count):
            items.put(item)
        results: dict[int, tuple[int, str]] = {}
        lock = threading.Lock()
        start = time.perf_counter()
        threads = [threading.Thread(target=_feed, args=(w, items, results, lock))
                   for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    if len(results) != count:
        print(f"only {len(results)} of {count} items done: every worker went away",
              file=sys.stderr)
        return 1
    print(f"{count} items done in {elapsed:.2f} s", flush=True)
    for name in sorted({name for _, name in results.values()}):
        done = sum(1 for _, who in results.values() if who == name)
        print(f"  {name}: {done} item{'' if done == 1 else 's'}", flush=True)
    print(f"sum of squares: {sum(square for square, _ in results.values())}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["worker", "drive"])
    parser.add_argument("--items", type=int, default=20, help="items to distribute (drive)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per item (worker)")
    options = parser.parse_args()
    return worker(options.delay) if options.role == "worker" else drive(options.items)


if __name__ == "__main__":
    sys.exit(main())
