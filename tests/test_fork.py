"""fork(): a child never shares the parent's peer, and the parent is unaffected.

The forking process is a spawned script (named "parent" through
LOCALNET_NAME), so the pytest process never forks with its threads.  It
serves ``square`` and counts the ``tick`` events it receives; a second
script, "server", serves ``square`` and ``whoami`` (the names the registry
lists for a pid).  The test drives the parent with one command per line
and reads one ``RESULT`` line back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import PeerProcess, wait_until

import localnet

SERVER = """
@localnet.connect()
def square(x):
    return x * x

@localnet.connect()
def whoami(pid):
    return [p.name for p in localnet.peers() if p.pid == pid]

@localnet.connect()
def ends(buffer):
    return len(buffer), buffer[0], buffer[-1]

peer = localnet.Peer(name="server").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

PARENT = """
import multiprocessing, select
import numpy
from concurrent.futures import ProcessPoolExecutor
from localnet import _registry_client, _shm

SIZE = 2 * 1024 * 1024  # through shared memory

ticks = []

@localnet.connect()
def square(x):
    return x * x

@localnet.connect()
def whoami(pid):
    return []

@localnet.connect()
def ends(buffer):
    return None

@localnet.connect()
def ticks_seen():
    return list(ticks)

@localnet.subscribe("tick")
def on_tick(n):
    ticks.append(n)

def work(i):
    # In a forked worker: the worker's own default peer, on first use.
    value = square.on("server", timeout=10)(i)
    return value, os.getpid(), localnet.info().name, whoami(os.getpid(), peer="server")

def reap(pid, timeout=20.0):
    # Bounded: a child that hangs is killed, and reported as -9.
    fd = os.pidfd_open(pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(fd)

def run_pool():
    pool = multiprocessing.get_context("fork").Pool(4)
    try:
        out = pool.map_async(work, range(40), chunksize=1).get(30)
    except BaseException as exc:
        for process in pool._pool:
            process.kill()
        pool.terminate()
        return repr(exc)
    pool.close()
    pool.join()
    return out

def run_executor():
    executor = ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork"))
    try:
        out = list(executor.map(work, range(40), timeout=30))
    except BaseException as exc:
        for process in list(executor._processes.values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        return repr(exc)
    executor.shutdown(wait=True)
    return out

def child(mode):
    # Runs in a child of os.fork(); always leaves through sys.exit().
    code = 3
    try:
        if mode == "default":
            ok = square.on("server", timeout=10)(5) == 25
            ok = ok and localnet.info().name == f"-c-{os.getpid()}"
        elif mode == "shm":  # the parent's idle segment must not be written here
            created, reused = _shm.POOL.created, _shm.POOL.reused
            ok = ends(numpy.full(SIZE, 2, numpy.uint8), peer="server") == (SIZE, 2, 2)
            ok = ok and (_shm.POOL.created, _shm.POOL.reused) == (created + 1, reused)
        elif mode == "own":
            own = localnet.Peer(name=f"own-{os.getpid()}").start()  # closed by sys.exit
            ok = own.call("server", "square", (6,), {}, 10) == 36
        else:  # the parent's Peer object, inherited
            try:
                peer.call("server", "square", (2,), {}, 10)
                ok = False
            except localnet.PeerClosed as exc:
                ok = f"belongs to process {os.getppid()}" in str(exc)
        code = 0 if ok else 3
    except BaseException as exc:
        say("CHILD", os.getpid(), repr(exc))
    sys.exit(code)

def fork(mode):
    pid = os.fork()
    if pid == 0:
        child(mode)
    return reap(pid)

def hold_spawn_lock_across_fork():
    # The registry spawn lock, held by this process at the moment of a fork:
    # once this process lets go, the next peer must get it, child alive or not.
    path = peer.directory / "spawn.lock"
    fd = _registry_client._lock(path, time.monotonic() + 5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        select.select([read_end], [], [], 20)  # until the parent is done
        os._exit(0)
    os.close(read_end)
    getattr(_registry_client, "_brief_close", os.close)(fd)
    try:
        again = _registry_client._lock(path, time.monotonic() + 2)
    except localnet.RegistryUnavailable as exc:
        result = repr(exc)
    else:
        getattr(_registry_client, "_brief_close", os.close)(again)
        result = "ok"
    os.close(write_end)
    reap(pid)
    return result

def run_threads():
    # 8 threads call the server without pause while the main thread forks.
    stop = threading.Event()
    counts, errors = [0] * 8, []

    def loop(n):
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                value = square.on("server", timeout=5)(n * 100000 + i)
            except BaseException as exc:
                errors.append(repr(exc))
                return
            took = time.monotonic() - started
            if value != (n * 100000 + i) ** 2 or took > 6.5:
                errors.append(f"thread {n}: {value} after {took:.1f} s")
                return
            counts[n] += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        codes = [fork("default") for _ in range(5)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return {"codes": codes, "counts": counts, "errors": errors}

peer = localnet.Peer().start()  # named "parent" by LOCALNET_NAME
say("READY", peer.address)
for line in sys.stdin:
    command = line.split()
    if command[0] == "call":
        say("RESULT", json.dumps(square.on("server", timeout=10)(3)))
    elif command[0] == "pool":
        say("RESULT", json.dumps(run_pool()))
    elif command[0] == "executor":
        say("RESULT", json.dumps(run_executor()))
    elif command[0] == "shm":
        assert ends(numpy.full(SIZE, 1, numpy.uint8), peer="server") == (SIZE, 1, 1)
        say("RESULT", json.dumps(fork("shm")))
    elif command[0] == "spawnlock":
        say("RESULT", json.dumps(hold_spawn_lock_across_fork()))
    elif command[0] == "fork":
        say("RESULT", json.dumps(fork(command[1])))
    elif command[0] == "threads":
        say("RESULT", json.dumps(run_threads()))
"""


@pytest.fixture
def parent(spawn) -> PeerProcess:
    spawn(SERVER)
    return spawn(PARENT, LOCALNET_NAME="parent")


def ask(parent: PeerProcess, command: str, timeout: float = 90.0) -> Any:
    parent.send(command)
    return json.loads(parent.expect("RESULT", timeout).split(" ", 1)[1])


def _peer_files(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("p-*.sock")}


def check_workers(out: Any, parent: PeerProcess, runtime_dir: Path) -> None:
    """Exactly [i*i]; each worker under a name of its own, as the registry lists it."""
    assert isinstance(out, list), out
    assert [value for value, _, _, _ in out] == [i * i for i in range(40)]
    for _, pid, name, listed in out:
        assert pid != parent.pid
        assert name == f"-c-{pid}"  # <program>-<pid>; the program is "python -c"
        assert listed == [name]
    # Pool workers leave through os._exit, like a crash: the registry removes
    # their socket files once their deaths are confirmed.
    pids = {pid for _, pid, _, _ in out}
    wait_until(lambda: not any(f.split("-")[1] in map(str, pids)
                               for f in _peer_files(runtime_dir)),
               what="the workers' socket files to be removed")


@pytest.mark.parametrize("start", ["pool", "executor"])
def test_fork_workers_get_their_own_results_before_and_after_the_first_call(
        parent: PeerProcess, runtime_dir: Path, start: str) -> None:
    check_workers(ask(parent, start), parent, runtime_dir)  # the parent has made no call yet
    assert ask(parent, "call") == 9
    check_workers(ask(parent, start), parent, runtime_dir)
    assert ask(parent, "call") == 9


def _parent_still_serves(parent: PeerProcess, address: str) -> None:
    assert os.path.exists(address)
    with localnet.Peer(name="checker") as checker:
        assert checker.call("parent", "square", (7,), {}, 5) == 49
        assert [p.name for p in checker.peers()] == ["parent", "server"]
        for n in range(20):
            checker.publish("tick", (n,), {})
        checker.flush(5)
        assert checker.call("parent", "ticks_seen", (), {}, 5)[-20:] == list(range(20))
    # A listener shut down by the child used to leave the accept loop spinning.
    assert psutil.Process(parent.pid).cpu_percent(interval=1.0) < 50


@pytest.mark.parametrize("mode", ["default", "own", "inherited"])
def test_forked_child_that_exits_leaves_the_parent_serving(
        spawn, runtime_dir: Path, mode: str) -> None:
    spawn(SERVER)
    parent = spawn(PARENT, ready=None, LOCALNET_NAME="parent")
    address = parent.expect("READY").split()[1]
    assert ask(parent, f"fork {mode}") == 0  # the child had no peer of the parent's
    assert ask(parent, "call") == 9
    assert ask(parent, f"fork {mode}") == 0  # ... neither after the parent's first call
    _parent_still_serves(parent, address)
    # The children closed their own peers at exit, and only those.
    assert len(_peer_files(runtime_dir)) == 2  # the parent's and the server's


def test_forks_while_parent_threads_call_get_every_result_right(
        parent: PeerProcess, runtime_dir: Path) -> None:
    out = ask(parent, "threads", timeout=110)
    assert out["errors"] == []
    assert out["codes"] == [0] * 5
    assert all(out["counts"]), out["counts"]
    assert ask(parent, "call") == 9


def test_listener_shut_down_elsewhere_does_not_spin_the_accept_loop(spawn) -> None:
    # What a forked child's exit used to do to its parent: shutdown() acts on
    # the listening socket both processes share.
    lone = spawn("""
        import logging, socket

        class Count(logging.Handler):
            seen = 0
            def emit(self, record):
                Count.seen += "accept failed" in record.getMessage()

        logging.getLogger("localnet").addHandler(Count())
        peer = localnet.Peer(name="lone").start()
        peer._server._listening.sock.shutdown(socket.SHUT_RDWR)
        say("READY")
        sys.stdin.readline()
        say("LOGGED", Count.seen)
    """)
    assert psutil.Process(lone.pid).cpu_percent(interval=1.0) < 50
    lone.send("")
    assert lone.expect("LOGGED") == "LOGGED 1"  # once, not once per attempt
    assert lone.wait_exit() == 0  # its peer closed at exit, socket file and all


def test_forked_child_never_reuses_the_parents_shared_memory(parent: PeerProcess) -> None:
    # The parent keeps the segment of its large call for reuse; a child that
    # reused its copy would write into the pages the parent writes into.
    assert ask(parent, "shm") == 0


def test_spawn_lock_held_at_fork_is_not_kept_by_the_child(parent: PeerProcess) -> None:
    # Otherwise a long-lived child (a pool worker) would keep every other
    # peer from starting a registry.
    assert ask(parent, "spawnlock") == "ok"
