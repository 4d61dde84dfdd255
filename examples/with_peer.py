"""``with localnet.Peer()`` in a plain script: discover, call, publish.

Run it alone, or while other examples serve::

    python examples/simple_connection.py serve     # terminal 1 (optional)
    localnet listen script_done                    # terminal 2 (optional)
    python examples/with_peer.py                   # terminal 3: prints and exits

It prints its own peer, then the other peers (``no other peers`` when
alone), calls ``greet`` in the first peer that offers it (or says that none
does), publishes ``script_done`` and says how many subscribers handled it::

    this is <Peer 'with_peer-4242' pid=4242 [RUNNING]>
    other peers:
      simple-server  pid 4200     connections: add, greet
    simple-server.greet('with_peer') -> 'hello with_peer, from simple-server (pid 4200)'
    script_done delivered to 1 subscriber(s)

``--event NAME`` publishes another event name.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import localnet


@localnet.event("script_done")
def script_done(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--event", default="script_done", help="the event to publish")
    options = parser.parse_args()
    with localnet.Peer() as peer:  # named <program>-<pid>, in the default runtime directory
        print(f"this is {peer!r}", flush=True)
        others = localnet.peers()
        if others:
            print("other peers:")
            width = max(len(other.name) for other in others)
            for other in others:
                offers = ", ".join(other.connections) or "nothing"
                print(f"  {other.name:<{width}}  pid {other.pid:<7}  connections: {offers}")
        else:
            print("no other peers")
        greeters = [other for other in others if "greet" in other.connections]
        if greeters:
            first = greeters[0]
            print(f"{first.name}.greet('with_peer') -> {first.greet('with_peer')!r}")
        else:
            print("no peer offers greet")
        if options.event == "script_done":
            script_done(peer.name, ok=True)
        else:
            peer.publish(options.event, (peer.name,), {"ok": True})
        peer.flush(timeout=5)  # the subscribers' handlers have run when this returns
        counts = peer.stats().published.get(options.event, localnet.EventCounts())
        print(f"{options.event} delivered to {counts.delivered} subscriber(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
