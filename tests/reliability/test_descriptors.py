"""Out of descriptors: back off, never spin, never give up, recover alone.

* A callee whose soft ``RLIMIT_NOFILE`` is 64 is called by 100 threads at
  once.  It can hold about 50 connections: ``accept()`` fails (``EMFILE``)
  for the others, which wait in the backlog.  It must not spin meanwhile
  (before the back-off it ran at 97-99 % CPU), and every call must return
  its result: once calls finish, the callee closes the call connections
  that sit idle in the callers' pools (before, their descriptors stayed
  taken and the waiting calls timed out).  Afterwards a new caller is
  served as usual.
* A registry started by a peer whose soft limit is low raises its own soft
  limit to the hard one.  And a registry that runs out of descriptors
  anyway backs off and serves on (before, its accept loop raised and the
  registry exited, dropping every peer's connection).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from helpers import registry_pid, wait_until

import localnet

LIMIT = 64
CALLERS = 100
HOLD = 2.0  # seconds each call runs: long enough to look at the callee while it is full

CALLEE = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

@localnet.connect()
def work(i, hold):
    time.sleep(hold)
    return i

peer = localnet.Peer(name="callee")
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_a_64_descriptor_limit_with_100_callers(spawn: Any) -> None:
    with localnet.Peer(name="callers", max_calls=2 * CALLERS) as peer:
        callee = spawn(CALLEE)
        proc = psutil.Process(callee.pid)
        start = threading.Barrier(CALLERS)
        outcomes: list[object] = []

        def call(i: int) -> None:
            start.wait(10)
            try:
                outcomes.append(peer.call("callee", "work", (i, HOLD), {}, timeout=20) == i)
            except localnet.LocalnetError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        wait_until(lambda: _fds(callee.pid) >= LIMIT - 2, 10, "the callee to run out")
        # A measuring window while every descriptor is taken and the calls
        # wait: accept() fails all along.
        cpu, wall = _cpu(proc), time.monotonic()
        time.sleep(1.0)  # the window measured, not a wait for anything
        busy = (_cpu(proc) - cpu) / (time.monotonic() - wall)
        for thread in threads:
            thread.join(60)
        took = time.monotonic() - began
        assert not any(t.is_alive() for t in threads)
        assert busy < 0.5, f"the callee used {busy:.0%} of a core while out of descriptors"
        failures = [o for o in outcomes if o is not True]
        # A call sent on a pooled connection at the moment the callee, out of
        # descriptors, closes it as idle gets ConnectionLost (1 of 100 in one
        # run): a clear error, not a timeout; every other call is answered.
        assert len(outcomes) == CALLERS, outcomes
        assert all(isinstance(f, localnet.ConnectionLost) for f in failures) \
            and len(failures) <= CALLERS // 20, \
            f"{len(failures)} of {CALLERS} calls failed: {failures[:3]}"
        print(f"\n{CALLERS} calls to a callee limited to {LIMIT} descriptors: all returned in "
              f"{took:.1f} s; callee CPU while out of descriptors {busy:.0%}")

    with localnet.Peer(name="fresh") as fresh:  # the callers are gone: served as usual
        assert fresh.call("callee", "work", (7, 0), {}, timeout=10) == 7
    assert callee.stop() == 0


def _open_files_limit(pid: int) -> tuple[str, str]:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\S+)\s+(\S+)", text, re.M)
    assert match, text
    return match.group(1), match.group(2)


LOW_LIMIT_PEER = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
peer = localnet.Peer(name="low").start()  # spawns the registry
say("READY")
sys.stdin.readline()
peer.close()
"""


def test_a_registry_spawned_under_a_low_limit_raises_its_own(spawn: Any,
                                                             runtime_dir: Path) -> None:
    spawn(LOW_LIMIT_PEER)
    pid = registry_pid(runtime_dir)
    assert pid is not None
    soft, hard = _open_files_limit(pid)
    assert soft == hard, f"the registry kept a soft open-files limit of {soft} (hard {hard})"


def test_a_registry_out_of_descriptors_backs_off_and_serves_on(spawn: Any,
                                                               runtime_dir: Path) -> None:
    spawn("""
        peer = localnet.Peer(name="resident").start()
        say("READY")
        sys.stdin.readline()
    """, LOCALNET_DEBUG="1")  # the registry it starts logs to registry.log
    pid = registry_pid(runtime_dir)
    assert pid is not None
    [sock_file] = runtime_dir.glob("p-*.sock")
    inode = sock_file.stat().st_ino
    registry = psutil.Process(pid)
    hard = registry.rlimit(psutil.RLIMIT_NOFILE)[1]
    limit = _fds(pid) + 4  # room for 4 more
    registry.rlimit(psutil.RLIMIT_NOFILE, (limit, hard))
    hogs = []
    try:
        for _ in range(20):  # more connections than it has descriptors for
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(runtime_dir / "registry.sock"))
            hogs.append(sock)
        wait_until(lambda: _fds(pid) >= limit, 10, "the registry to run out of descriptors")
        cpu, wall = _cpu(registry), time.monotonic()
        # The window measured (not a wait for anything): long enough for
        # several of the registry's liveness sweeps.
        time.sleep(1.5)
        busy = (_cpu(registry) - cpu) / (time.monotonic() - wall)
        assert registry.is_running() and registry.status() != psutil.STATUS_ZOMBIE, \
            "the registry exited when it ran out of descriptors"
        assert busy < 0.5, f"the registry used {busy:.0%} of a core while out of descriptors"
    finally:
        for sock in hogs:
            sock.close()
        registry.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
    # The registry serves on, with the same peers, by itself.
    with localnet.Peer(name="newcomer") as peer:
        assert [p.name for p in peer.peers()] == ["resident"]
    assert registry_pid(runtime_dir) == pid
    # A sweep that could not read /proc (no descriptor for it) must not have
    # taken the resident for dead: forgotten, and its socket file removed.
    log = (runtime_dir / "registry.log").read_text()
    assert "forgot 'resident' (process gone)" not in log
    assert sock_file.stat().st_ino == inode, "the live resident's socket file was removed"
