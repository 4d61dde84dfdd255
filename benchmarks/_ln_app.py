"""localnet connections and events used by the benchmark processes.

Importing this module applies the decorators (which only register, per DESIGN.md); it is
imported by servers, clients and publishers, never by the coordinator. Only the public
API is used: ``localnet.connect()``, ``localnet.event(name)``, ``localnet.Peer``.
Subscriptions live in ``_ln_subs.py`` so that a publisher does not subscribe to itself.
"""

from __future__ import annotations

from typing import Any

import localnet

SERVER = "bench-server"
TICK_EVENT = "bench_tick"
ARRAY_EVENT = "bench_array"


@localnet.connect()
def bench_echo(message: Any) -> Any:
    """The tiny call: return the argument unchanged."""
    return message


@localnet.connect()
def bench_take_array(array: Any) -> int:
    """Receive an ndarray, read its first and last element, return its size in bytes."""
    if array.size:
        _ = array.flat[0] + array.flat[-1]
    return int(array.nbytes)


@localnet.event(TICK_EVENT)
def bench_tick(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A small event for the fan-out scenario: ``bench_tick(i, "payload")``."""
    return args, kwargs


@localnet.event(ARRAY_EVENT)
def bench_array(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An event carrying one ndarray, for the large-transfer scenario."""
    return args, kwargs
