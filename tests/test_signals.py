"""Signal masks: user code and the processes localnet starts can be signalled.

localnet's own threads block the asynchronous signals; nothing of that may
reach the application: connections and subscription handlers run with the
mask of the thread that started the peer, a process they start can be
stopped with SIGTERM or SIGINT, and so can a registry a peer restarted.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from helpers import gone, registry_pid, wait_until

import localnet

# A process a connection or handler starts, kept so reap() can wait for it.
SLEEPERS = """
import subprocess
sleepers = {}

def start_sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleepers[proc.pid] = proc
    return proc.pid

@localnet.connect()
def reap(pid, wait):
    proc = sleepers.pop(pid)
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()  # it ignored the signal: clean up, and say so
        proc.wait(10)
        return None

def mask():
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))

def report_ready():
    say("READY", json.dumps(mask()))
"""

LAUNCHER = SLEEPERS + """
@localnet.connect()
def launch():
    return start_sleeper()

arrived = threading.Condition()
count = [0]

@localnet.connect()
def mask_when_together(expected):
    # Returns once `expected` calls run at the same time: the calls that share
    # a connection then run on the threads it hands the reading role to.
    with arrived:
        count[0] += 1
        arrived.notify_all()
        if not arrived.wait_for(lambda: count[0] >= expected, 20):
            raise RuntimeError(f"only {count[0]} calls ran together")
    return threading.current_thread().name, mask()

peer = localnet.Peer(name="launcher").start()
localnet.serve_forever(peer, ready=report_ready)
"""

SUBSCRIBER = SLEEPERS + """
@localnet.subscribe("launch")
def on_launch():
    say("LAUNCHED", start_sleeper(), json.dumps(mask()))

peer = localnet.Peer(name="subscriber").start()
localnet.serve_forever(peer, ready=report_ready)
"""


def _status(pid: int, field: str) -> int:
    """A signal set from /proc/<pid>/status (SigBlk, SigIgn, ...) as a bit mask."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _bits(*signums: int) -> int:
    return sum(1 << (signum - 1) for signum in signums)


def _assert_signalable(pid: int, *signums: int) -> None:
    assert _status(pid, "SigBlk") == 0, f"process {pid} blocks {_status(pid, 'SigBlk'):#x}"
    ignored = _status(pid, "SigIgn") & _bits(*signums)
    assert ignored == 0, f"process {pid} ignores {ignored:#x}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_process_started_by_a_connection_can_be_stopped(spawn, signum: int) -> None:
    child = spawn(LAUNCHER, ready=None)
    assert json.loads(child.expect("READY")[6:]) == []  # the premise: nothing blocked
    with localnet.Peer(name="driver"):
        launcher = localnet.peer("launcher")
        pid = launcher.launch()
        _assert_signalable(pid, signal.SIGINT, signal.SIGTERM)
        os.kill(pid, signum)
        assert launcher.call("reap", pid, 5.0, timeout=20) == -signum


def test_a_process_started_by_a_subscription_handler_can_be_stopped(spawn) -> None:
    child = spawn(SUBSCRIBER)

    @localnet.event("launch")
    def launch():
        return (), {}

    with localnet.Peer(name="publisher") as me:
        subscriber = localnet.peer("subscriber")
        for signum in (signal.SIGTERM, signal.SIGINT):
            launch()
            me.flush(10)  # returns once the handler ran
            _, pid, handler_mask = child.expect("LAUNCHED").split(" ", 2)
            assert json.loads(handler_mask) == []
            _assert_signalable(int(pid), signal.SIGINT, signal.SIGTERM)
            os.kill(int(pid), signum)
            assert subscriber.call("reap", int(pid), 5.0, timeout=20) == -signum


def test_every_serving_thread_has_the_mask_of_the_thread_that_started_the_peer(spawn) -> None:
    child = spawn(LAUNCHER.replace(
        'peer = localnet.Peer(name="launcher").start()',
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        'peer = localnet.Peer(name="launcher").start()'), ready=None)
    started_with = json.loads(child.expect("READY")[6:])
    assert started_with == [int(signal.SIGUSR1)]
    callers = 12  # each on a connection and a serving thread of its own
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    with localnet.Peer(name="driver"):
        launcher = localnet.peer("launcher")

        def call() -> None:
            try:
                results.append(launcher.call("mask_when_together", callers, timeout=30))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
    assert not errors
    names = {name for name, _ in results}
    assert names == {"localnet-conn"}, names
    assert all(mask == started_with for _, mask in results), results


def _respawned_registry(runtime_dir: Path, me: localnet.Peer) -> int:
    """Kill the registry; return the pid of the one ``me``'s registry thread starts."""
    old = registry_pid(runtime_dir)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: me.stats().registry_recoveries == 1, timeout=10,
               what="the peer to restart the registry")
    new = registry_pid(runtime_dir)
    assert new is not None and new != old
    return new


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_registry_restarted_by_a_peer_can_be_stopped(runtime_dir: Path, signum: int) -> None:
    with localnet.Peer(name="client") as me:
        pid = _respawned_registry(runtime_dir, me)
        _assert_signalable(pid, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
    os.kill(pid, signum)
    wait_until(lambda: gone(pid), timeout=5, what=f"registry {pid} to exit on {signum}")
    assert not (runtime_dir / "registry.sock").exists()

