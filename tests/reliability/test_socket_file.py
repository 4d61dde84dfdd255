"""A live peer's socket file removed from under it (a clean-up script, a tmp cleaner).

The peer listens on by descriptor, but nobody can connect by path.  Before,
it stayed listed in ``peers()`` while new callers got ``PeerNotFound``
forever, and a publisher counted a few events as failed, then dropped the
subscriber from its routes: later events appeared in no counter, and
``flush()`` succeeded.  Now the peer sees its file gone within a second and
listens at the same path again, and the publisher keeps the route of a
subscriber the registry still lists, counting every event (delivered,
dropped or failed) and delivering again once the subscriber is back.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from helpers import wait_until

import localnet

SUBSCRIBER = """
import threading
got = [0]
lock = threading.Lock()

@localnet.subscribe("seq")
def on_seq(n):
    with lock:
        got[0] += 1

@localnet.connect()
def received():
    return got[0]

peer = localnet.Peer(name="sub")
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_a_removed_socket_file_is_made_again_and_no_event_goes_uncounted(spawn: Any) -> None:
    with localnet.Peer(name="pub") as pub:
        sub = spawn(SUBSCRIBER)
        address = str(pub.lookup("sub")["address"])
        os.unlink(address)
        removed = time.monotonic()

        triggered = [0]
        streaming = threading.Event()
        streaming.set()

        def stream() -> None:
            while streaming.is_set():
                pub.publish("seq", (triggered[0],), {})
                triggered[0] += 1
                if triggered[0] % 10 == 0:
                    time.sleep(0.005)  # the stream's pace: ~2,000 events/s

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            def reachable() -> bool:
                try:
                    return bool(pub.call("sub", "received", (), {}, timeout=5))
                except (localnet.PeerNotFound, localnet.ConnectionLost):
                    return False

            wait_until(reachable, 10, "the subscriber to be reachable and receiving again")
            back = time.monotonic() - removed
            assert os.path.exists(address)
            done = triggered[0]
            wait_until(lambda: triggered[0] >= done + 500, 10, "500 more events")
        finally:
            streaming.clear()
            streamer.join(10)
        pub.flush(15)
        counts = pub.stats().subscribers["sub"]
        received = pub.call("sub", "received", (), {}, timeout=5)

    total = triggered[0]
    print(f"\nsubscriber reachable again {back:.2f} s after its socket file was removed; "
          f"{total} events: {counts}")
    assert counts.delivered + counts.dropped + counts.failed == total, (total, counts)
    assert counts.sent == counts.delivered + counts.failed, counts  # nothing still pending
    assert received == counts.delivered, (received, counts)
    assert counts.delivered > 0
    assert sub.stop() == 0
