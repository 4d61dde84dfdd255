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


# -- @connect() and methods ------------------------------------------------------------

SCENE = """
class Scene:
    def __init__(self, frames):
        self.frames = frames

    def count(self, extra=0):
        return self.frames + extra

    @staticmethod
    @localnet.connect()
    def scene_version():
        return 2

scene = Scene(frames=24)
localnet.connect("count")(scene.count)  # one instance's bound method
peer = localnet.Peer(name="scene").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_connect_on_a_method_is_refused_with_what_to_do_instead() -> None:
    from localnet._catalog import CATALOG

    with pytest.raises(localnet.ConfigurationError,
                       match=r"cannot offer the method .*Scene\.count.*"
                             r"localnet\.connect\(\"count\"\)\(instance\.count\)"):
        class Scene:
            @localnet.connect()
            def count(self):
                return 0

    with pytest.raises(localnet.ConfigurationError, match=r"connect\(\"tally\"\)\(Shot\.tally\)"):
        class Shot:
            @localnet.connect("tally")
            @classmethod
            def tally(cls):
                return 0

    assert "count" not in CATALOG.connections and "tally" not in CATALOG.connections


def test_bound_method_and_staticmethod_connections_work_here_and_remotely(spawn) -> None:
    spawn(SCENE)

    class Scene:
        def __init__(self, frames):
            self.frames = frames

        def count(self, extra=0):
            return self.frames + extra

        @staticmethod
        @localnet.connect()
        def scene_version():
            return 1

    mine = Scene(frames=10)
    count = localnet.connect("count")(mine.count)
    assert count(1) == 11  # here, bound to this process's instance
    assert Scene.scene_version() == 1 and mine.scene_version() == 1
    with localnet.Peer(name="director"):
        assert count(1, peer="scene") == 25  # the scene peer's own instance
        assert count.on("scene", timeout=5)(extra=2) == 26
        assert localnet.peer("scene").count() == 24
        assert Scene.scene_version(peer="scene") == 2


def test_connection_stored_on_a_class_binds_like_a_function() -> None:
    @localnet.connect()
    def describe_frame(owner, frame=0):
        return (type(owner).__name__, frame)

    class Shot:
        describe = describe_frame

    assert Shot().describe(3) == ("Shot", 3)
    assert Shot.describe is describe_frame


# -- connections named like RemotePeer attributes -------------------------------------------

SHADOWED = """
@localnet.connect()
def describe(frame):
    return ("described", frame)

@localnet.connect("call")
def call_connection(*args, **kwargs):
    return ("called", args, kwargs)

@localnet.connect("name")
def name_connection():
    return "the name connection"

@localnet.connect()
def add(a, b=0):
    return a + b

peer = localnet.Peer(name="x").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_connections_named_like_remote_peer_attributes_are_reachable(spawn) -> None:
    child = spawn(SHADOWED)
    with localnet.Peer(name="caller"):
        remote = localnet.peer("x")
        # remote.fn reaches every connection, whatever its name.
        assert remote.fn.describe(7) == ("described", 7)
        assert remote.fn.call(1, timeout=2, connection="c") == \
            ("called", (1,), {"timeout": 2, "connection": "c"})
        assert remote.fn.name() == "the name connection"
        assert remote.fn.add(2, b=3) == 5
        assert set(dir(remote.fn)) == {"add", "call", "describe", "name"}
        with pytest.raises(localnet.UnknownConnection):
            remote.fn.pid  # noqa: B018 - not a connection of this peer
        # remote.call(name, ...) reaches them too.
        assert remote.call("describe", 8) == ("described", 8)
        assert remote.call("call", 9, timeout=5) == ("called", (9,), {})
        # The attributes keep their meaning; the shortcut works for other names.
        assert remote.name == "x" and remote.pid == child.pid
        assert remote.describe()["name"] == "x"
        assert remote.add(1, 1) == 2
        # Used as if they were the connections, they say so instead of guessing.
        with pytest.raises(TypeError, match=r"offers a connection named 'describe': "
                                            r"call it as remote\.fn\.describe"):
            remote.describe(7)
        with pytest.raises(TypeError, match=r"remote\.fn\.call"):
            remote.call(7)
