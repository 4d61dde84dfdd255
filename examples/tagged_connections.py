"""Two versions of an application call each other through a tag.

Version 1 named its function ``render_frame``; version 2 renamed it to
``render`` and added a parameter.  Both offer it under the tag ``"render"``,
so either version's code calls the other's function::

    python examples/tagged_connections.py v2     # terminal 1: serves until Ctrl-C
    python examples/tagged_connections.py v1     # terminal 2: calls v2, prints, exits

v2 prints ``app-v2 offers 'render' (its function render); Ctrl-C to stop``
and one line per call; v1 prints::

    app-v1 offers 'render' (its function render_frame)
    render_frame(7)           here   -> 'v1 rendered frame 7'
    render_frame(7, peer=...) app-v2 -> 'v2 rendered frame 7 at quality 1'

``v1 --count N`` renders N frames remotely; ``localnet info app-v2`` shows
the tag among v2's connections.
"""

from __future__ import annotations

import argparse
import sys

import localnet

TAG = "render"


def v2() -> int:
    """The new version: ``render(frame, quality=1)`` under the tag; serves until Ctrl-C."""

    @localnet.connect(TAG)
    def render(frame: int, quality: int = 1) -> str:
        print(f"render({frame!r}, quality={quality!r}) called", flush=True)
        return f"v2 rendered frame {frame} at quality {quality}"

    localnet.serve_forever(localnet.Peer(name="app-v2"), ready=lambda: print(
        f"app-v2 offers {TAG!r} (its function {render.__name__}); Ctrl-C to stop", flush=True))
    return 0


def v1(count: int) -> int:
    """The old version: ``render_frame(frame)`` under the same tag; calls v2, then exits."""

    @localnet.connect(TAG)
    def render_frame(frame: int) -> str:
        return f"v1 rendered frame {frame}"

    with localnet.Peer(name="app-v1"):
        print(f"app-v1 offers {TAG!r} (its function {render_frame.__name__})", flush=True)
        print(f"render_frame(7)           here   -> {render_frame(7)!r}", flush=True)
        try:
            for frame in range(7, 7 + count):
                result = render_frame(frame, peer="app-v2")
                print(f"render_frame({frame}, peer=...) app-v2 -> {result!r}", flush=True)
        except localnet.PeerNotFound:
            print(f"no peer 'app-v2': start 'python {sys.argv[0]} v2' first", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["v1", "v2"])
    parser.add_argument("--count", type=int, default=1, help="frames v1 renders in v2")
    options = parser.parse_args()
    return v2() if options.role == "v2" else v1(options.count)


if __name__ == "__main__":
    sys.exit(main())
