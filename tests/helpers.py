"""Test helpers: peer processes with a readiness handshake, bounded waits."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

DEFAULT_TIMEOUT = 15.0

# Prepended to every child script: imports, a helper to report lines, SIGTERM.
PRELUDE = """\
import os, signal, sys, time, threading, json
import localnet

def say(*parts):
    print(*parts, flush=True)

# SIGTERM ends the script like an exception would: with-blocks and atexit
# close its peers (serve_forever() installs its own handler meanwhile).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
"""


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
               what: str = "condition", interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    For conditions nothing can notify us about (another process's state);
    each poll re-checks the condition, so this is not a blind sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.05)


class PeerProcess:
    """A Python child running a script; its stdout lines arrive on a queue."""

    def __init__(self, script: str, env: dict[str, str], args: list[str] | None = None,
                 cwd: str | None = None) -> None:
        code = PRELUDE + textwrap.dedent(script)
        self._start([sys.executable, "-u", "-c", code, *(args or [])], env, cwd,
                    subprocess.PIPE)

    def _start(self, argv: list[str], env: dict[str, str], cwd: str | os.PathLike[str] | None,
               stdin: int) -> None:
        """Start ``argv``; its stdout lines go to ``lines``, its stderr to ``stderr``."""
        self.proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._out = threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                                     daemon=True)
        self._err = threading.Thread(target=self._pump, args=(self.proc.stderr,
                                                              self.stderr.append), daemon=True)
        self._out.start()
        self._err.start()

    @staticmethod
    def _pump(stream: Any, sink: Callable[[str], None]) -> None:
        try:
            for line in stream:
                sink(line.rstrip("\n"))
        except (ValueError, OSError):
            pass  # closed by stop() while a grandchild still held the pipe

    def expect(self, prefix: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait for the next stdout line that starts with ``prefix``; return it."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, min(remaining, 0.2)))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    self._out.join(1.0)
                    if self.lines.empty():
                        raise AssertionError(
                            f"process {self.pid} exited ({self.proc.returncode}) before "
                            f"printing {prefix!r}; stdout: {seen}; stderr:\n"
                            + "\n".join(self.stderr[-30:])) from None
                if remaining <= 0:
                    raise AssertionError(
                        f"process {self.pid} did not print {prefix!r} within {timeout:g} s; "
                        f"stdout: {seen}; stderr:\n" + "\n".join(self.stderr[-30:])) from None
                continue
            seen.append(line)
            if line.startswith(prefix):
                return line

    def collect(self, until: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Every stdout line before the one equal to ``until``."""
        collected: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, min(remaining, 0.2)))
            except queue.Empty:
                if remaining <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                    raise AssertionError(
                        f"process {self.pid} did not print {until!r} within {timeout:g} s; "
                        f"stdout: {collected}; stderr:\n" + "\n".join(self.stderr[-30:])
                    ) from None
                continue
            if line == until:
                return collected
            collected.append(line)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, signum: int) -> None:
        """Send ``signum``; SIGSTOP returns once every thread has stopped."""
        os.kill(self.pid, signum)
        if signum == signal.SIGSTOP:
            wait_stopped(self.pid)

    def kill9(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(DEFAULT_TIMEOUT)

    def stop(self, timeout: float = 10.0) -> int:
        """End the process by its pid: SIGTERM, then SIGKILL; returns its exit code."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        return self.proc.returncode

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.proc.wait(timeout)


def registry_pid(directory: Path) -> int | None:
    """The pid of the directory's registry, if one is running."""
    try:
        pid = int((directory / "registry.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if gone(pid) else pid


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its parent counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until every thread of process ``pid`` is stopped (after a SIGSTOP).

    kill() returns before the threads stop: one running on another CPU may
    still answer a call, or acknowledge an event, meanwhile.
    """
    def thread_state(tid: str) -> str:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]

    def stopped() -> bool:
        try:
            return all(thread_state(tid) == "T" for tid in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return False

    wait_until(stopped, timeout, what=f"process {pid} to stop")


def end_pid(pid: int, timeout: float = 10.0) -> None:
    """End one process by pid (SIGTERM, then SIGKILL) and wait for it to exit."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    except psutil.NoSuchProcess:
        return
    try:
        wait_until(lambda: gone(pid), timeout, what=f"process {pid} to exit")
    except AssertionError:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            return
        wait_until(lambda: gone(pid), timeout, what=f"process {pid} to die")
    try:
        if proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() == os.getpid():
            os.waitpid(pid, 0)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass


def raw_channel(address: str, role: str) -> socket.socket:
    """A connection to a peer at ``address`` that has announced ``role`` ("call" or
    "events") in its HELLO frame, for tests that write frames by hand."""
    from localnet import _wire

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    hello = _wire.encode_control({"role": role, "name": "raw", "pid": os.getpid()})
    sock.sendall(_wire.pack_header(_wire.Kind.HELLO, 0, len(hello)) + hello)
    return sock


# Scripts shared by the fault tests of tests/reliability.  STREAM_PUBLISHER
# (peer "pub") triggers numbered "seq" events non-stop and tells how many it
# has triggered (``triggered()``).  JOINER takes the name given as its first
# argument (retrying on NameTaken, as a hot standby would), asks "pub" how
# many events it had triggered once start() returned (or, with a second
# argument "late", once its run-time subscribe returned), and prints
# ``RESULT <missing> <first few>`` for the 300 events from there.
STREAM_PUBLISHER = """
import threading
count = [0]
running = threading.Event()
running.set()

@localnet.event("seq")
def seq(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def triggered():
    return count[0]

def stream():
    while running.is_set():
        seq(count[0])
        count[0] += 1
        if count[0] % 20 == 0:
            time.sleep(0.002)  # ~10,000 events/s: a busy, not a flooded, stream

peer = localnet.Peer(name="pub").start()
threading.Thread(target=stream, daemon=True).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
running.clear()
"""

JOINER = """
import threading
got = set()
changed = threading.Condition()

@localnet.subscribe("seq")
def on_seq(n):
    with changed:
        got.add(n)
        changed.notify_all()

late = sys.argv[2:] == ["late"]  # subscribe at run time, after start()
if late:
    localnet.unsubscribe(on_seq)
peer = localnet.Peer(name=sys.argv[1])
say("WAITING")
deadline = time.monotonic() + 30
while True:
    try:
        peer.start()
        break
    except localnet.NameTaken:
        if time.monotonic() > deadline:
            say("RESULT gave up")
            sys.exit(1)
        time.sleep(0.005)  # the standby's retry pace, as a user would write it
if late:
    localnet.subscribe("seq")(on_seq)
first = localnet.peer("pub").triggered()  # every event from here on is after start()
wanted = set(range(first, first + 300))
with changed:
    changed.wait_for(lambda: wanted <= got, timeout=8)
    missing = sorted(wanted - got)
say("RESULT", len(missing), missing[:5])
threading.Event().wait(60)  # hold the name until killed
"""
