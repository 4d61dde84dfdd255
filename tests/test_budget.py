"""The bound on the bytes held per subscriber (``Peer(event_bytes=)``)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import localnet
from localnet import _budget
from localnet._budget import ALL, HEAVY, ITEMS, Budget, size_of, sizes

KIB, MIB = 1024, 1024 * 1024

SUBSCRIBER = """
got = []

@localnet.subscribe("tick")
def on_tick(value):
    got.append(len(value))

@localnet.connect()
def received():
    return list(got)

localnet.serve_forever(localnet.Peer(name="sub"), ready=lambda: say("READY"))
"""


@localnet.event("tick")
def tick(value: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return (value,), {}


def counts(peer: localnet.Peer) -> tuple[int, int, int, int]:
    c = peer.stats().subscribers["sub"]
    return c.sent, c.delivered, c.dropped, c.failed


def test_small_events_are_bounded_in_bytes_too(spawn) -> None:
    # 1,000-byte events against 64 KiB: the byte bound comes long before the
    # event bound (10,000); the items, queued without a lock, are counted late.
    sub = spawn(SUBSCRIBER)
    with localnet.Peer(name="pub", event_bytes=64 * KIB, event_block=0.05) as peer:
        sub.signal(signal.SIGSTOP)
        try:
            for _ in range(300):
                tick("x" * 1000)
            sent, _, dropped, _ = counts(peer)
        finally:
            sub.signal(signal.SIGCONT)
        assert sent + dropped == 300
        assert 40 <= sent <= 64, sent  # about 64 KiB of 1 KiB items
        peer.flush(30)
        assert counts(peer) == (sent, sent, dropped, 0)
        assert len(localnet.peer("sub").received()) == sent


def test_an_event_larger_than_the_bound_goes_to_an_idle_subscriber(spawn) -> None:
    sub = spawn(SUBSCRIBER)
    with localnet.Peer(name="pub", event_bytes=1 * MIB, event_block=0.05) as peer:
        tick(np.ones(4 * MIB // 8))  # shared memory
        peer.flush(30)
        tick(b"y" * 3 * MIB)  # inline, one whole pickle
        peer.flush(30)
        assert counts(peer) == (2, 2, 0, 0)
        sub.signal(signal.SIGSTOP)
        try:
            tick(np.ones(4 * MIB // 8))  # nothing else held: it goes
            tick(np.ones(4 * MIB // 8))  # waits event_block, then dropped
        finally:
            sub.signal(signal.SIGCONT)
        peer.flush(30)
        assert counts(peer) == (3, 3, 1, 0)
        assert localnet.peer("sub").received() == [4 * MIB // 8, 3 * MIB, 4 * MIB // 8]


@pytest.mark.parametrize("value", [0, -1, 1.5, "1", None])
def test_event_bytes_is_checked(value: object) -> None:
    with pytest.raises(localnet.ConfigurationError, match="event_bytes"):
        localnet.Peer(event_bytes=value)  # type: ignore[arg-type]


# -- the counting itself -------------------------------------------------------

def _item(n: int) -> bytes:
    return b"\x01" * n  # (an item never starts with the PROTO opcode 0x80)


def _whole(n: int) -> bytes:
    return b"\x80" + b"\x01" * (n - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["fast", "put", "whole", "ack"]),
                          st.integers(1, 64)), max_size=120))
def test_counting_late_matches_counting_everything(steps: list[tuple[str, int]]) -> None:
    # Items appended without a lock below room() never break the bound; the
    # bytes counted (after count()) always equal the bytes queued.
    budget = Budget(limit=1000, events=50, item_max=64)
    queue: list[tuple[str, bytes]] = []
    for action, n in steps:
        if action == "fast":  # fan_out: no lock, no counting
            if len(queue) < budget.room():
                queue.append(("e", _item(n)))
                assert sum(size_of(f) for _, f in queue) <= budget.limit
        elif action in ("put", "whole"):  # Outbox.put, under the lock
            frame = _item(n) if action == "put" else _whole(n * 20)  # some over the limit
            if budget.fits(queue, len(frame)):
                queue.append(("e", frame))
                budget.add(frame)
        elif queue:  # an acknowledgement cuts the front
            done = queue[:n]
            del queue[:n]
            if budget.held:
                budget.cut(done)
        assert 0 <= budget.counted <= len(queue)
        total = sum(size_of(f) for _, f in queue)
        assert total <= budget.limit or len(queue) == 1  # (one oversized event alone)
        probe = Budget(budget.limit, 50, 64)  # counting now would change what is tested
        probe.held, probe.counted = budget.held, budget.counted
        probe.count(queue)
        assert probe.held == total


class _Held:
    """Stands for a shared-memory payload: only its ``nbytes`` is counted."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_sizes_in_c_and_in_python_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [("e", _item(10)), ("e", _whole(30)), ("e", _Held(1000)),
               ("e", _item(7), 64, 3), ("e", _whole(5))]  # (a ring entry has 4 fields)
    expected = {ITEMS: 17, HEAVY: 1035, ALL: 1052}
    c_sizes = _budget._c_sizes
    for c in ([True] if c_sizes is None else [True, False]):
        if not c:
            monkeypatch.setattr(_budget, "_c_sizes", None)
        assert {mode: sizes(entries, 0, len(entries), mode) for mode in expected} == expected
        assert sizes(entries, 1, 3, HEAVY) == 1030 and sizes(entries, 3, 99, ITEMS) == 7
        assert sizes(entries, 2, 2, ALL) == 0
        monkeypatch.undo()
    if c_sizes is not None:  # the C function's argument checks
        with pytest.raises(TypeError, match="tuple"):
            c_sizes([("e", b"x"), "not an entry"], 0, 2, ALL)
        with pytest.raises(ValueError, match="mode"):
            c_sizes(entries, 0, 1, 3)
        with pytest.raises(AttributeError):
            c_sizes([("e", object())], 0, 1, HEAVY)  # neither bytes nor a payload
