"""localnet subscriptions of the subscriber processes (importing this module registers them).

Handlers only count: the fan-out subscriber waits on :data:`TICKS` until it has seen the
expected number of events, the large-array subscriber on :data:`ARRAYS`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import localnet
from benchmarks._ln_app import ARRAY_EVENT, TICK_EVENT


class Counter:
    """Count of handled events, with the monotonic times of the first and the expected last one.

    No lock: each benchmark has one publisher, and localnet runs one publisher's handlers on
    one thread, in order (the pyzmq and socket subscribers count in a plain loop too).
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self.expected = 0
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.nbytes = 0

    def expect(self, expected: int) -> None:
        self.expected = expected

    def hit(self, nbytes: int = 0) -> None:
        self.count += 1
        self.nbytes += nbytes
        if self.first is None:
            self.first = time.monotonic()
        if self.count == self.expected:
            self.last = time.monotonic()
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once ``expected`` events were handled; False after ``timeout`` seconds."""
        return self._done.wait(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count, "first": self.first, "last": self.last}


TICKS = Counter()
ARRAYS = Counter()


@localnet.subscribe(TICK_EVENT)
def on_tick(index: int, payload: str) -> None:
    TICKS.hit()


@localnet.subscribe(ARRAY_EVENT)
def on_array(array: Any) -> None:
    if array.size:
        _ = array.flat[0] + array.flat[-1]
    ARRAYS.hit(int(array.nbytes))
