"""Peers: life cycle, names, discovery, the registry's spawn and pruning."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from helpers import registry_pid, wait_until

import localnet

SERVE = """
peer = localnet.Peer({kwargs})
peer.start()
localnet.serve_forever(peer, ready=lambda: say("READY", peer.name))
"""


def serve(**kwargs: object) -> str:
    return SERVE.format(kwargs=", ".join(f"{k}={v!r}" for k, v in kwargs.items()))


def names(peers: list[localnet.RemotePeer]) -> list[str]:
    return [p.name for p in peers]


def test_with_block_registers_and_unregisters(runtime_dir: Path, spawn) -> None:
    observer = spawn("""
        import sys
        with localnet.Peer(name="observer") as me:
            say("READY")
            for line in sys.stdin:
                say("PEERS", json.dumps([p.name for p in localnet.peers()]))
    """)
    with localnet.Peer(name="alpha", group="g1", hub=True) as peer:
        assert peer.state.value == "RUNNING"
        assert os.path.exists(peer.address)
        assert repr(peer) == f"<Peer 'alpha' pid={os.getpid()} [RUNNING]>"
        observer.send("list")
        assert json.loads(observer.expect("PEERS")[6:]) == ["alpha"]
        address = peer.address
    assert not os.path.exists(address)
    assert peer.state.value == "CLOSED"
    observer.send("list")
    assert json.loads(observer.expect("PEERS")[6:]) == []


def test_start_and_close_without_with(runtime_dir: Path) -> None:
    peer = localnet.Peer(name="plain")
    assert peer.state.value == "NEW"
    assert peer.start() is peer
    assert peer.start() is peer  # starting twice is harmless
    peer.close()
    peer.close()  # idempotent
    with pytest.raises(localnet.PeerClosed):
        peer.start()


def test_peers_lists_others_with_their_attributes(spawn) -> None:
    spawn(serve(name="w1", group="render"))
    spawn(serve(name="w2", group="render", hub=True))
    spawn(serve(name="gui", group="ui"))
    with localnet.Peer(name="me", group="render"):
        everyone = localnet.peers()
        assert names(everyone) == ["gui", "w1", "w2"]  # not "me"
        assert names(localnet.peers(group="render")) == ["w1", "w2"]
        assert names(localnet.peers(hubs_only=True)) == ["w2"]
        assert names(localnet.peers(group="ui", hubs_only=True)) == []
        w2 = localnet.peer("w2")
        assert (w2.group, w2.hub) == ("render", True)
        assert psutil.Process(w2.pid).create_time() == pytest.approx(w2.started, abs=0.05)
        assert w2.since >= w2.started
        with pytest.raises(localnet.PeerNotFound, match="no live peer named 'nobody'"):
            localnet.peer("nobody")


def test_info_describes_a_peer(spawn) -> None:
    child = spawn("""
        @localnet.connect()
        def render(frame): return frame

        @localnet.event("frame_done")
        def frame_done(*a, **k): return a, k

        @localnet.subscribe("tick", group="clock")
        def on_tick(): pass

        peer = localnet.Peer(name="farm", group="render", hub=True).start()
        localnet.serve_forever(peer, ready=lambda: say("READY"))
    """)
    with localnet.Peer(name="asker"):
        info = localnet.info("farm")
        assert info.name == "farm" and info.pid == child.pid
        assert info.group == "render" and info.hub is True
        assert "render" in info.connections
        assert "frame_done" in info.events
        assert [(s["event"], s["group"]) for s in info.subscriptions] == [("tick", "clock")]
        assert info.user and info.executable
        assert info.as_dict()["name"] == "farm"
        assert localnet.info(localnet.peer("farm")) == info
        assert localnet.info().name == "asker"
        with pytest.raises(localnet.PeerNotFound):
            localnet.info("ghost")


def test_live_name_is_taken(spawn) -> None:
    holder = spawn(serve(name="unique"))
    with pytest.raises(localnet.NameTaken, match="'unique' is taken") as caught:
        localnet.Peer(name="unique").start()
    assert caught.value.pid == holder.pid
    assert not list(Path(os.environ["LOCALNET_DIR"]).glob(f"p-{os.getpid()}-*.sock"))
    with localnet.Peer(name="other"):
        assert names(localnet.peers()) == ["unique"]


def test_dead_holders_name_is_reclaimed(spawn) -> None:
    holder = spawn(serve(name="phoenix"))
    holder.kill9()
    with localnet.Peer(name="phoenix") as peer:
        assert localnet.info().pid == os.getpid()
        assert peer.state.value == "RUNNING"


def test_killed_peer_disappears_at_once(spawn) -> None:
    victim = spawn(serve(name="victim"))
    with localnet.Peer(name="watcher"):
        assert names(localnet.peers()) == ["victim"]
        victim.kill9()
        # peers() never returns a dead peer, even before the registry heard of it
        assert names(localnet.peers()) == []
        with pytest.raises(localnet.PeerNotFound):
            localnet.peer("victim")


def test_registry_prunes_a_dead_process_whose_socket_lives_on(spawn, runtime_dir: Path) -> None:
    # The peer forks a child that inherits (and keeps open) its registry
    # connection, then the peer is killed: no EOF reaches the registry, so
    # only the psutil sweep can notice.
    parent = spawn("""
        peer = localnet.Peer(name="forker").start()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        localnet.serve_forever(peer, ready=lambda: say("READY", pid))
    """, ready=None)
    child_pid = int(parent.expect("READY").split()[1])
    try:
        with localnet.Peer(name="watcher") as me:
            parent.kill9()
            registry = me._local.registry
            wait_until(lambda: not [i for i in registry.request("list")
                                    if i["name"] == "forker"],
                       timeout=5, what="the registry to drop the dead peer")
    finally:
        os.kill(child_pid, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(child_pid) or
                   psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE, timeout=5)


def test_registry_is_spawned_once_by_peers_starting_together(spawn, runtime_dir: Path) -> None:
    script = """
        import sys
        sys.stdin.readline()          # start all at the same moment
        peer = localnet.Peer().start()
        localnet.serve_forever(peer, ready=lambda: say("READY", peer.name))
    """
    children = [spawn(script, ready=None) for _ in range(8)]
    for child in children:
        child.send("go")
    for child in children:
        child.expect("READY")
    pid = registry_pid(runtime_dir)
    assert pid is not None
    registries = [p for p in psutil.process_iter(["cmdline"])
                  if "localnet._registry" in " ".join(p.info["cmdline"] or [])
                  and str(runtime_dir) in " ".join(p.info["cmdline"] or [])]
    assert [p.pid for p in registries] == [pid]
    with localnet.Peer(name="counter"):
        assert len(localnet.peers()) == 8


def test_default_name_and_environment_configuration(spawn) -> None:
    spawn("""
        @localnet.connect()
        def hello(): return "hi"
        localnet.peers()              # the first network use starts the default peer
        localnet.serve_forever(ready=lambda: say("READY"))
    """, LOCALNET_NAME="envpeer", LOCALNET_GROUP="envgroup", LOCALNET_HUB="yes")
    anonymous = spawn("""
        localnet.peers()
        localnet.serve_forever(ready=lambda: say("READY"))
    """)
    with localnet.Peer(name="me"):
        env = localnet.peer("envpeer")
        assert (env.group, env.hub) == ("envgroup", True)
        assert env.hello() == "hi"
        assert f"-c-{anonymous.pid}" in names(localnet.peers())


def test_keyword_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALNET_NAME", "from-env")
    monkeypatch.setenv("LOCALNET_GROUP", "env-group")
    monkeypatch.setenv("LOCALNET_HUB", "true")
    peer = localnet.Peer(name="from-kwarg", group="kw-group", hub=False)
    assert (peer.name, peer.group, peer.hub) == ("from-kwarg", "kw-group", False)
    defaulted = localnet.Peer()
    assert (defaulted.name, defaulted.group, defaulted.hub) == ("from-env", "env-group", True)
    monkeypatch.setenv("LOCALNET_HUB", "maybe")
    with pytest.raises(localnet.ConfigurationError, match="LOCALNET_HUB"):
        localnet.Peer()


def test_interpreter_exit_closes_open_peers(spawn, runtime_dir: Path) -> None:
    child = spawn("""
        peer = localnet.Peer(name="forgetful").start()
        say("READY", peer.address)
        sys.stdin.readline()
        # no close(): atexit must unregister and remove the socket
    """)
    with localnet.Peer(name="watcher"):
        assert names(localnet.peers()) == ["forgetful"]
        child.send("exit")
        assert child.wait_exit() == 0
        assert names(localnet.peers()) == []
    assert not list(runtime_dir.glob("p-*.sock"))


def test_sigterm_in_serve_forever_closes_cleanly(spawn, runtime_dir: Path) -> None:
    child = spawn(serve(name="served"))
    child.signal(signal.SIGTERM)
    assert child.wait_exit() == 0
    assert not list(runtime_dir.glob("p-*.sock"))


def test_registry_runs_in_the_foreground(spawn, runtime_dir: Path) -> None:
    registry = spawn("""
        from localnet._cli import main
        say("READY")
        sys.exit(main(["registry"]))
    """)
    wait_until(lambda: registry_pid(runtime_dir) == registry.pid, timeout=10,
               what="the foreground registry to serve")
    with localnet.Peer(name="client"):
        assert registry_pid(runtime_dir) == registry.pid  # used, not replaced
    registry.signal(signal.SIGINT)
    assert registry.wait_exit() == 0
    assert not (runtime_dir / "registry.sock").exists()


def test_a_second_registry_gives_up(spawn, runtime_dir: Path) -> None:
    with localnet.Peer(name="first"):
        second = spawn("""
            from localnet._cli import main
            sys.exit(main(["registry"]))
        """, ready=None)
        assert second.wait_exit() == 1
        assert any("already serves" in line for line in second.stderr) or \
            wait_until(lambda: any("already serves" in line for line in second.stderr), 5)


def test_peer_names_are_checked() -> None:
    for bad in ("", "a\nb", "x" * 256):
        with pytest.raises(localnet.ConfigurationError):
            localnet.Peer(name=bad)


def test_many_threads_share_the_default_peer() -> None:
    seen: list[int] = []

    def use() -> None:
        localnet.peers()
        seen.append(1)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(seen) == 4
    from localnet import _current

    assert _current.default.peer is not None and _current.default.peer.state.value == "RUNNING"
    _current.default.peer.close()



def test_localnet_debug_logs_to_stderr(spawn) -> None:
    child = spawn("""
        with localnet.Peer(name="chatty"):
            say("READY")
    """, LOCALNET_DEBUG="1")
    assert child.wait_exit() == 0
    wait_until(lambda: any("localnet.peer" in line and "started" in line
                           for line in child.stderr), timeout=5, what="debug lines")


def test_module_api_after_the_only_peer_closed_raises_peer_closed(spawn) -> None:
    # Once the process's explicit peer is closed, localnet.peers(), a remote
    # call or a trigger raise PeerClosed instead of quietly starting a
    # default peer under another name.
    child = spawn("""
        @localnet.connect()
        def echo(x):
            return x

        @localnet.event("tick")
        def tick(*args, **kwargs):
            return args, kwargs

        with localnet.Peer(name="only"):
            pass
        for attempt in (lambda: localnet.peers(), lambda: echo(1, peer="only"),
                        lambda: tick(1)):
            try:
                attempt()
                say("NO ERROR")
            except localnet.PeerClosed as exc:
                say("CLOSED", exc)
        with localnet.Peer(name="again"):   # a new peer works as before
            say("LISTED", [p.name for p in localnet.peers()])
        say("END")
    """, ready=None)
    lines = child.collect(until="END")
    assert child.wait_exit() == 0, child.stderr
    assert len(lines) == 4 and lines[-1] == "LISTED []", lines
    assert all(line.startswith("CLOSED") and "'only' was closed" in line
               for line in lines[:3]), lines


def test_start_waits_for_a_registry_that_still_holds_its_lock(runtime_dir: Path) -> None:
    # A registry killed a moment ago holds the directory's lock until the kernel
    # has closed its files: the registry a joining peer starts meanwhile answers
    # "busy" and exits.  The joining peer must try again within its timeout
    # (it used to raise RegistryUnavailable at once).  Here the test holds the
    # lock, and lets it go only once such a registry has come and gone.
    import fcntl

    fd = os.open(runtime_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    outcome: list[object] = []

    def join() -> None:
        try:
            with localnet.Peer(name="joiner", directory=runtime_dir, nats=None) as peer:
                outcome.append(peer.state)
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    def busy_registries() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if "localnet._registry" in line and str(runtime_dir) in line:
                found.append(proc)
        return found

    joiner = threading.Thread(target=join)
    joiner.start()
    try:
        turned_away = wait_until(busy_registries, timeout=10,
                                 what="a registry started while the lock is held")
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                   for p in turned_away),
                   timeout=10, what="that registry to answer busy and exit")
        assert joiner.is_alive() and not outcome, outcome  # still trying, not failed
    finally:
        os.close(fd)  # the lock goes: the next registry started takes it
        joiner.join(20)
    assert not joiner.is_alive()
    assert [getattr(s, "value", s) for s in outcome] == ["RUNNING"], outcome
