"""A peer offers a connection; another peer calls it.

Run the server in one terminal and the caller in another::

    python examples/simple_connection.py serve     # terminal 1: runs until Ctrl-C
    python examples/simple_connection.py call      # terminal 2: calls, prints, exits

The server prints ``serving greet and add as 'simple-server'; Ctrl-C to stop``
and then one line per call it runs; the caller prints::

    greet('Ada') -> 'hello Ada, from simple-server (pid 4242)'
    add(2, 3) -> 5
    add(2, b=40) -> 42

``call --count N`` greets N times.  The command line reaches the same
server: ``localnet call simple-server greet Ada``.
"""

from __future__ import annotations

import argparse
import os
import sys

import localnet

SERVER = "simple-server"


# Both roles define the connections: the server runs them, and the caller's
# definitions name them (their bodies run only when called without peer=).
@localnet.connect()
def greet(name: str) -> str:
    print(f"greet({name!r}) called", flush=True)
    return f"hello {name}, from {SERVER} (pid {os.getpid()})"


@localnet.connect()
def add(a: float, b: float = 0) -> float:
    print(f"add({a!r}, b={b!r}) called", flush=True)
    return a + b


def serve() -> int:
    """Offer greet and add until Ctrl-C or SIGTERM."""
    peer = localnet.Peer(name=SERVER)
    localnet.serve_forever(peer, ready=lambda: print(
        f"serving greet and add as {SERVER!r}; Ctrl-C to stop", flush=True))
    return 0


def call(count: int) -> int:
    """Call the server's connections in three ways, then leave."""
    with localnet.Peer(name=f"simple-caller-{os.getpid()}"):
        try:
            for i in range(count):
                who = "Ada" if i == 0 else f"Ada #{i + 1}"
                print(f"greet({who!r}) -> {greet(who, peer=SERVER)!r}", flush=True)
        except localnet.PeerNotFound:
            print(f"no peer {SERVER!r}: start 'python {sys.argv[0]} serve' first",
                  file=sys.stderr)
            return 1
        print(f"add(2, 3) -> {add.on(SERVER, timeout=5)(2, 3)!r}", flush=True)
        print(f"add(2, b=40) -> {localnet.peer(SERVER).add(2, b=40)!r}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["serve", "call"])
    parser.add_argument("--count", type=int, default=1, help="greetings to send (call)")
    options = parser.parse_args()
    return serve() if options.role == "serve" else call(options.count)


if __name__ == "__main__":
    sys.exit(main())
