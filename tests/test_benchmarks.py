"""The benchmarks' own arithmetic: the figures the README quotes come from it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's root

from benchmarks import fanout  # noqa: E402


def test_fan_out_metrics_with_and_without_the_publishers_cpu() -> None:
    counted = [{"count": 10, "last": 2.0}, {"count": 9, "last": 2.5}]
    sent = {"first": 0.0, "sent": 1.0}
    # The fan-out across hosts (benchmarks/nats.py) does not ask its publisher for its CPU.
    assert fanout._metrics(10, 2, sent, counted) == {
        "sent_per_s": 10.0, "lost": 1.0, "events_per_s": 4.0, "deliveries_per_s": 8.0}
    with_cpu = fanout._metrics(10, 2, {**sent, "cpu": 0.002}, counted)
    assert with_cpu["pub_cpu_us"] == 200.0 and with_cpu["events_per_s"] == 4.0
    # A subscriber that counted nothing: no rate, only the loss.
    assert fanout._metrics(10, 1, sent, [{"count": 0, "last": None}]) == {
        "sent_per_s": 10.0, "lost": 10.0}
