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
from helpers import JOINER, STREAM_PUBLISHER

pytestmark = pytest.mark.slow

def test_fifty_takeovers_of_a_name_miss_no_event(spawn) -> None:
    spawn(STREAM_PUBLISHER)
    holder = spawn(JOINER, ready="WAITING", args=["holder"])
    assert holder.expect("RESULT") == "RESULT 0 []"
    results = []
    for round_ in range(50):
        if round_ % 2 == 0:  # hot standby: already retrying when the holder dies
            standby = spawn(JOINER, ready="WAITING", args=["holder"])
            holder.kill9()
        else:  # a plain kill, then a restart under the same name
            holder.kill9()
            standby = spawn(JOINER, ready="WAITING", args=["holder"])
        results.append(standby.expect("RESULT", timeout=20))
        holder = standby
    assert results == ["RESULT 0 []"] * 50, [r for r in results if r != "RESULT 0 []"]
