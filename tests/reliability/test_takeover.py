"""A name taken over right after its holder died gets every later event.

The hot-standby pattern: a standby process retries ``start()`` on
``NameTaken`` and takes the name as soon as the holder is SIGKILLed, while
a publisher keeps triggering numbered events.  Each new holder asks the
publisher how many events it has triggered *after* its own ``start()``
returned, and must then receive every one from that number on.  The
registry used to compare what it had told a publisher by name only: when
the newcomer registered before the registry had noticed the old holder's
death, the publisher was never told about the new process and its events
went nowhere (3 takeovers in 10), while ``flush()`` reported success.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PUBLISHER = """
import threading
count = [0]
running = threading.Event()
running.set()

@localnet.event("seq")
def seq(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def triggered():
    return count[0]

def stream():
    while running.is_set():
        seq(count[0])
        count[0] += 1
        if count[0] % 20 == 0:
            time.sleep(0.002)  # ~10,000 events/s: a busy, not a flooded, stream

peer = localnet.Peer(name="pub").start()
threading.Thread(target=stream, daemon=True).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
running.clear()
"""

HOLDER = """
import threading
got = set()
changed = threading.Condition()

@localnet.subscribe("seq")
def on_seq(n):
    with changed:
        got.add(n)
        changed.notify_all()

peer = localnet.Peer(name="holder")
say("WAITING")
deadline = time.monotonic() + 30
while True:
    try:
        peer.start()
        break
    except localnet.NameTaken:
        if time.monotonic() > deadline:
            say("RESULT gave up")
            sys.exit(1)
        time.sleep(0.005)  # the standby's retry pace, as a user would write it
first = localnet.peer("pub").triggered()  # every event from here on is after start()
wanted = set(range(first, first + 300))
with changed:
    changed.wait_for(lambda: wanted <= got, timeout=8)
    missing = sorted(wanted - got)
say("RESULT", len(missing), missing[:5])
threading.Event().wait(60)  # hold the name until killed
"""


def test_fifty_takeovers_of_a_name_miss_no_event(spawn) -> None:
    spawn(PUBLISHER)
    holder = spawn(HOLDER, ready="WAITING")
    assert holder.expect("RESULT") == "RESULT 0 []"
    results = []
    for round_ in range(50):
        if round_ % 2 == 0:  # hot standby: already retrying when the holder dies
            standby = spawn(HOLDER, ready="WAITING")
            holder.kill9()
        else:  # a plain kill, then a restart under the same name
            holder.kill9()
            standby = spawn(HOLDER, ready="WAITING")
        results.append(standby.expect("RESULT", timeout=20))
        holder = standby
    assert results == ["RESULT 0 []"] * 50, [r for r in results if r != "RESULT 0 []"]
