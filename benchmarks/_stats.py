"""Small statistics helpers shared by the coordinator and the benchmark processes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` (need not be sorted)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float]:
    """p50 and p99 of per-operation latencies given in nanoseconds, as microseconds."""
    return {
        "p50_us": percentile(latencies_ns, 50) / 1e3,
        "p99_us": percentile(latencies_ns, 99) / 1e3,
    }


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))
