"""The subscriber's side of one small event, in one process: ``python -m benchmarks.receive_loop``.

Times the function a peer runs for a batch of events from one publisher (rebuild the
items, find the handlers, call them, count) on frames of 256 small events, with the
handlers' loop in C (``localnet._speedups.dispatch``) and without it, beside
``pickle.loads`` of the same frames alone.  Prints ns per event, best of 5 rounds.
"""

from __future__ import annotations

import pickle
import time

import localnet
from localnet import _receive, _serial, _wire

EVENTS_PER_FRAME = 256
FRAMES = 2_000
handled = [0]


@localnet.subscribe("bench_receive")
def on_event(i: int, payload: str) -> None:
    handled[0] += 1


def _best(run: object, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best / (FRAMES * EVENTS_PER_FRAME) * 1e9


def main() -> None:
    items: list[bytes] = []
    for i in range(EVENTS_PER_FRAME):
        item = _serial.dumps_event("bench_receive", (i, "payload"), {}, None)
        assert isinstance(item, bytes)
        items.append(item)
    body = b"".join(_wire.pack_items(items, 1))[_wire.HEADER_SIZE:]  # one frame's body
    frames: list[_wire.Frame] = [(int(_wire.Kind.EVENT), EVENTS_PER_FRAME, body, [])]
    receiver = _receive.Receiver("bench", 1 << 28, 8, None)
    receive = receiver.event_receiver({"name": "publisher", "pid": 1})

    def handle() -> None:
        for _ in range(FRAMES):
            receive(frames)

    def loads() -> None:
        for _ in range(FRAMES):
            pickle.loads(body[1:])

    with_c = getattr(_receive, "c_dispatch")  # noqa: B009 (None where it is not built)
    figures = {"receive, handlers' loop in C": None if with_c is None else _best(handle)}
    setattr(_receive, "c_dispatch", None)  # noqa: B010
    try:
        figures["receive, handlers' loop in Python"] = _best(handle)
    finally:
        setattr(_receive, "c_dispatch", with_c)  # noqa: B010
    figures["pickle.loads of the frame alone"] = _best(loads)
    for label, ns in figures.items():
        print(f"{label:36} {'not built' if ns is None else f'{ns:6.0f} ns/event'}")


if __name__ == "__main__":
    main()
