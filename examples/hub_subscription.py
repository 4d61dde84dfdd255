"""A hub publishes events; a subscriber listens to hubs only.

Start the listener first (a subscription also covers publishers that start
later, but events published before anyone listens reach nobody)::

    python examples/hub_subscription.py listen     # terminal 1: until Ctrl-C
    python examples/hub_subscription.py hub        # terminal 2: a tick a second, until Ctrl-C

The hub prints ``hub 'clock-hub' publishing tick every 1 s; Ctrl-C to stop``
and ``published tick N`` for each tick; the listener prints ``listening for
tick from hubs only; Ctrl-C to stop`` and then one line per tick::

    tick 1 from clock-hub (hub: True)

``hub --count N --interval S`` publishes N ticks and exits; ``listen
--count N`` exits after N ticks.  From a third terminal,
``localnet emit tick 99`` reaches nobody (the command's peer is not a hub:
the listener subscribed with ``hubs_only=True``), while
``localnet emit --hub tick 99`` is printed by the listener.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

import localnet

HUB = "clock-hub"


def hub(count: int | None, interval: float) -> int:
    """Publish ``tick`` every ``interval`` seconds, ``count`` times or until Ctrl-C."""

    @localnet.event("tick")
    def tick(n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (n,), {"at": time.time()}

    with localnet.Peer(name=HUB, hub=True) as peer:
        print(f"hub {HUB!r} publishing tick every {interval:g} s; Ctrl-C to stop", flush=True)
        n = 0
        while count is None or n < count:
            n += 1
            tick(n)
            print(f"published tick {n}", flush=True)
            if count is None or n < count:
                time.sleep(interval)  # the pace of the clock
        peer.flush(timeout=5)  # every subscriber's handler has run when this returns
        delivered = peer.stats().published.get("tick", localnet.EventCounts()).delivered
        print(f"done: {n} ticks published, {delivered} handled by subscribers", flush=True)
    return 0


def listen(count: int | None) -> int:
    """Print the hubs' ticks, ``count`` of them or until Ctrl-C."""
    done = threading.Event()
    seen = []

    @localnet.subscribe("tick", hubs_only=True)
    def on_tick(n: int, **details: Any) -> None:
        source = localnet.current_event()
        assert source is not None  # always set inside a handler
        print(f"tick {n} from {source.publisher} (hub: {source.hub})", flush=True)
        seen.append(n)
        if count is not None and len(seen) >= count:
            done.set()

    with localnet.Peer(name=f"tick-listener-{os.getpid()}"):
        print("listening for tick from hubs only; Ctrl-C to stop", flush=True)
        while not done.wait(0.5):  # wake now and then so Ctrl-C is handled promptly
            pass
    print(f"received {len(seen)} ticks", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["hub", "listen"])
    parser.add_argument("--count", type=int, default=None, help="stop after N ticks")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    options = parser.parse_args()
    # SIGTERM ends the script like Ctrl-C: the with-block unregisters the peer.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if options.role == "hub":
            return hub(options.count, options.interval)
        return listen(options.count)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
