"""Fixtures: a private runtime directory per test, and leak checks after each.

Every test gets its own ``LOCALNET_DIR`` (a short path under /tmp: Unix
socket addresses are limited to about 100 bytes).  After the test the
fixture closes peers the test left open, ends the processes it started and
the directory's registry by their pids, and then fails the test if it
leaked a peer, a process, a socket file or a shared-memory segment.
"""

from __future__ import annotations

import compileall
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import PeerProcess, end_pid, registry_pid  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package once, as an installed package is.

    Tests start hundreds of Python processes.  From a checkout (an editable
    install) with ``PYTHONDONTWRITEBYTECODE`` set, as some environments do,
    every one of them compiled every module of the package again: about
    0.1 s of CPU per process, which on two cores made the 100-peer scale
    test miss its registry's start-up deadline.
    """
    package = Path(__file__).resolve().parent.parent / "localnet"
    compileall.compile_dir(str(package), quiet=1)


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


class Spawner:
    """Starts child peers for one test and remembers them for teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[PeerProcess] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["LOCALNET_DIR"] = str(self.directory)
        env.pop("LOCALNET_NAME", None)
        env.pop("LOCALNET_GROUP", None)
        env.pop("LOCALNET_HUB", None)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
        env.update(extra)
        return env

    def __call__(self, script: str, *, ready: str | None = "READY", args: list[str] | None = None,
                 timeout: float = 20.0, **env: str) -> PeerProcess:
        """Run ``script`` in a child and wait for its ``ready`` line."""
        child = PeerProcess(script, self.env(**env), args)
        self.children.append(child)
        if ready is not None:
            child.expect(ready, timeout)
        return child


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from localnet import _current

    directory = Path(tempfile.mkdtemp(prefix="ln-", dir="/tmp"))
    monkeypatch.setenv("LOCALNET_DIR", str(directory))
    for name in ("LOCALNET_NAME", "LOCALNET_GROUP", "LOCALNET_HUB", "LOCALNET_DEBUG",
                 "LOCALNET_SPIN"):
        monkeypatch.delenv(name, raising=False)
    shm_before = _shm_entries()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield directory

    problems = []
    with _current.lock:
        open_peers = list(_current.live)
    for peer in open_peers:
        problems.append(f"peer left open: {peer!r}")
        peer.close()
    if _current.default.peer is not None:
        _current.default.peer.close()
        _current.default.peer = None
    _current.default.closed = None
    pid = registry_pid(directory)
    if pid is not None:
        end_pid(pid)
    for proc in psutil.Process().children(recursive=True):
        if proc.pid not in children_before:
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                cmdline = "?"
            if "localnet._registry" not in cmdline:
                problems.append(f"process left running: {proc.pid} {cmdline[:120]}")
            end_pid(proc.pid)
    leftovers = sorted(p.name for p in directory.glob("p-*.sock")) if directory.exists() else []
    if leftovers:
        problems.append(f"socket files left behind: {leftovers}")
    new_shm = _shm_entries() - shm_before
    if new_shm:
        problems.append(f"shared memory left in /dev/shm: {sorted(new_shm)}")
    shutil.rmtree(directory, ignore_errors=True)
    if problems:
        pytest.fail("resource leak: " + "; ".join(problems))


@pytest.fixture
def spawn(runtime_dir: Path) -> Iterator[Spawner]:
    spawner = Spawner(runtime_dir)
    yield spawner
    for child in reversed(spawner.children):
        child.stop()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, theirs): a connected pair of Unix stream sockets."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield ours, theirs
    ours.close()
    theirs.close()
