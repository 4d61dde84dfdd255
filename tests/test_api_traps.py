"""Traps in the calling API: bad timeouts, connections named like RemotePeer
attributes, ``@connect()`` on methods.  Each runs against a real child peer."""

from __future__ import annotations

import pytest

import localnet

COUNTING = """
calls = []

@localnet.connect()
def work(x=None):
    calls.append(x)
    return x

@localnet.connect()
def count():
    return len(calls)

peer = localnet.Peer(name="server").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.connect()
def work(x=None):
    raise AssertionError("runs remotely")


@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.5, "1", True, float("nan"), float("inf")],
                         ids=["zero", "zero-float", "negative", "negative-float", "string",
                              "bool", "nan", "inf"])
def test_bad_timeout_is_refused_before_anything_is_sent(spawn, timeout) -> None:
    spawn(COUNTING)
    with localnet.Peer(name="caller"):
        remote = localnet.peer("server")
        with pytest.raises(localnet.ConfigurationError,
                           match="timeout must be None .* positive number of seconds"):
            work.on("server", timeout=timeout)  # refused where it is given
        with pytest.raises(localnet.ConfigurationError, match="positive number of seconds"):
            remote.call("work", 1, timeout=timeout)
        assert remote.count() == 0  # nothing ran in the server
        assert work.on("server", timeout=5)(2) == 2
        assert remote.call("work", 3, timeout=2.5) == 3
        assert remote.count() == 2
