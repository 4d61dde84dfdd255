"""Coordinator side: workspaces, spawned benchmark processes, cleanup and the round loop.

A :class:`Workspace` is one temporary directory per measurement (socket files, a fresh
``LOCALNET_DIR``, the children's stderr logs). Every process it spawns runs
``python -m benchmarks.<module> <role> <system> '<json>'`` (see ``_child.py`` for the
protocol) and is ended by its PID when the workspace closes: end of file on its stdin
(the polite ``quit``), then SIGTERM, then SIGKILL, each with a bounded wait. Afterwards any
process still carrying the workspace path in its command line or environment (the
detached localnet registry, for instance) is ended the same way, and the directory removed.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from benchmarks._child import PREFIX
from benchmarks._report import Table

PACKAGE_PARENT = Path(__file__).resolve().parent.parent
WORKSPACE_ENV = "LOCALNET_BENCH_WORKSPACE"
# Environment a benchmark process must not inherit from the caller's shell.
_SCRUBBED_ENV = ("LOCALNET_NAME", "LOCALNET_GROUP", "LOCALNET_HUB", "LOCALNET_DEBUG")
_QUIT_GRACE = 3.0
_SIGNAL_GRACE = 3.0

# Metrics per table group, or the error text of a group that failed in this round.
Groups = Mapping[str, Mapping[str, float] | str]
Measure = Callable[[str, str, "Workspace"], Groups]


class ChildFailed(RuntimeError):
    """A benchmark process reported an error, exited early or missed a deadline."""


class Unavailable(Exception):
    """A benchmark process reported that its system is not installed or not available."""


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the tables)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    """What the user asked for on the command line."""

    quick: bool
    rounds: int
    systems: frozenset[str] | None = None
    verbose: bool = False
    pin: str | None = None  # "same" or "split": where the call scenarios' processes run

    def pick(self, systems: Sequence[str], floor: str | None = None) -> list[str]:
        """The systems of a scenario to run: the selected ones, plus its floor for ratios."""
        if self.systems is None:
            return list(systems)
        return [s for s in systems if s == floor or self.wants(s)]

    def wants(self, system: str) -> bool:
        """``--systems localnet`` selects ``localnet`` and every ``localnet-*`` variant."""
        assert self.systems is not None
        return system in self.systems or system.split("-")[0] in self.systems


class Child:
    """One spawned benchmark process, driven through its stdin and stdout pipes."""

    def __init__(
        self,
        workspace: Workspace,
        module: str,
        role: str,
        system: str,
        params: Mapping[str, Any],
        *,
        name: str,
        lifetime: float,
    ) -> None:
        self.name = name
        self._stderr_path = workspace.root / f"{name}.stderr"
        self._buffer = bytearray()
        self.spawned_at = time.monotonic()
        payload = {**params, "lifetime": lifetime, "spawned_at": self.spawned_at}
        argv = [sys.executable, "-m", f"benchmarks.{module}", role, system, json.dumps(payload)]
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=workspace.env(),
                cwd=PACKAGE_PARENT,
            )
        self.pid = self._proc.pid

    def __repr__(self) -> str:
        state = "RUNNING" if self._proc.poll() is None else f"EXITED {self._proc.returncode}"
        return f"<Child {self.name!r} pid={self.pid} [{state}]>"

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """Wait for the next protocol message carrying ``key`` and return it.

        Raises Unavailable or ChildFailed when the child reports so, exits, or misses the
        deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            message = self._next_message(deadline, key)
            if "unavailable" in message:
                raise Unavailable(str(message["unavailable"]))
            if "error" in message:
                raise ChildFailed(f"{self.name}: {message['error']}")
            if key in message:
                return message

    def send(self, command: str) -> None:
        """Send one command line to the child."""
        stdin = self._stdin()
        try:
            stdin.write(command.encode() + b"\n")
            stdin.flush()
        except OSError as exc:
            raise ChildFailed(f"{self.name}: cannot send {command!r}: {exc}") from exc

    def request_exit(self) -> None:
        """Close the child's stdin: end of file means ``quit`` to every role."""
        with contextlib.suppress(OSError):
            self._stdin().close()

    def end(self, deadline: float) -> None:
        """Make sure the process is gone: wait until ``deadline``, then SIGTERM, then SIGKILL."""
        proc = self._proc
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=_SIGNAL_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_SIGNAL_GRACE)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()

    def stderr_tail(self, limit: int = 300) -> str:
        """The last line(s) the child wrote to stderr, for error messages."""
        try:
            text = self._stderr_path.read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-2:])[-limit:]

    def _stdin(self) -> IO[bytes]:
        assert self._proc.stdin is not None
        return self._proc.stdin

    def _next_message(self, deadline: float, key: str) -> dict[str, Any]:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline]).decode(errors="replace")
                del self._buffer[: newline + 1]
                if line.startswith(PREFIX):
                    message: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(f"{self.name}: no {key!r} in time. {self.stderr_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self._proc.wait(timeout=_SIGNAL_GRACE)
                    raise ChildFailed(
                        f"{self.name} exited ({code}) before {key!r}. {self.stderr_tail()}"
                    )
                self._buffer.extend(chunk)


class Workspace:
    """A temporary directory and the processes spawned for one measurement.

    Use as a context manager; leaving it ends every process (see the module docstring)
    and removes the directory.
    """

    def __init__(self, *, verbose: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lnbench-"))
        self.localnet_dir = self.root / "localnet"  # not created: localnet creates it
        self._children: list[Child] = []
        self._verbose = verbose

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def path(self, name: str) -> str:
        """A path for a socket file inside the workspace."""
        return str(self.root / name)

    def env(self) -> dict[str, str]:
        """Environment of the benchmark processes."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["LOCALNET_DIR"] = str(self.localnet_dir)
        env[WORKSPACE_ENV] = str(self.root)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PACKAGE_PARENT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(
        self,
        module: str,
        role: str,
        system: str,
        params: Mapping[str, Any],
        *,
        name: str,
        lifetime: float = 300.0,
    ) -> Child:
        """Start ``python -m benchmarks.<module> <role> <system> <params>``."""
        child = Child(self, module, role, system, params, name=name, lifetime=lifetime)
        self._children.append(child)
        return child

    def close(self) -> None:
        """End all children, then any stray process carrying our path; remove the directory."""
        try:
            end_all(self._children)
        finally:
            self._children.clear()
            try:
                for pid, cmdline in sweep(self.root):
                    if self._verbose:
                        log(f"  ended leftover process {pid}: {cmdline[:120]}")
            finally:
                shutil.rmtree(self.root, ignore_errors=True)


def end_all(children: Sequence[Child]) -> None:
    """Ask every child to quit, then make sure each one is gone (bounded waits)."""
    for child in reversed(children):
        child.request_exit()
    deadline = time.monotonic() + _QUIT_GRACE
    errors: list[BaseException] = []
    for child in children:
        try:
            child.end(deadline)
        except Exception as exc:  # keep ending the others
            errors.append(exc)
    if errors:
        raise errors[0]


def sweep(root: Path) -> list[tuple[int, str]]:
    """End processes (not this one) whose command line or environment names ``root``.

    Only processes carrying our own temporary path are touched, e.g. the localnet registry
    that a peer started detached with our ``LOCALNET_DIR``. Returns (pid, cmdline) pairs.
    """
    try:
        import psutil
    except ImportError:
        log("warning: psutil missing, cannot look for leftover processes")
        return []
    marker = str(root)
    me = os.getpid()
    found: list[psutil.Process] = []
    described: list[tuple[int, str]] = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        if proc.pid == me:
            continue
        cmdline = " ".join(proc.info.get("cmdline") or [])
        environ: dict[str, str] = proc.info.get("environ") or {}
        carries = (
            environ.get(WORKSPACE_ENV) == marker
            or environ.get("LOCALNET_DIR", "").startswith(marker)
            or marker in cmdline
        )
        if carries:
            found.append(proc)
            described.append((proc.pid, cmdline))
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=_SIGNAL_GRACE)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=_SIGNAL_GRACE)
    return described


def missing_package(module: str | None) -> str | None:
    """Why ``module`` cannot be imported by the children, or None if it can (no import)."""
    if module is None:
        return None
    search = [str(PACKAGE_PARENT), *sys.path]
    if importlib.machinery.PathFinder.find_spec(module, search) is not None:
        return None
    if module == "localnet":
        return "not available (no localnet package yet)"
    return "not installed"


def run_rounds(
    cfg: Config,
    table: Table,
    systems: Iterable[str],
    requires: Mapping[str, Sequence[str]],
    measure: Measure,
    variants: Sequence[str] = ("",),
) -> Table:
    """Measure each system once per round and variant (systems interleaved within a round,
    so that the machine's drift hits all of them alike), each in a fresh workspace.

    ``measure(system, variant, workspace)`` returns metrics per table group. A system found
    not installed or not available is skipped from then on; other failures are recorded for
    that round and the run goes on.
    """
    systems = list(systems)
    for system in systems:
        table.ensure(system)
        for module in requires.get(system, ()):
            status = missing_package(module)
            if status is not None:
                table.set_status(system, status)
                break
    for round_no in range(1, cfg.rounds + 1):
        for system in systems:
            for variant in variants:
                if table.status(system) is not None:
                    break
                label = f" {variant}" if variant else ""
                log(f"{table.name}: {system}{label} (round {round_no}/{cfg.rounds})")
                _measure_once(cfg, table, system, variant, measure)
    return table


def _measure_once(cfg: Config, table: Table, system: str, variant: str, measure: Measure) -> None:
    started = time.monotonic()
    try:
        with Workspace(verbose=cfg.verbose) as ws:
            groups = measure(system, variant, ws)
    except Unavailable as exc:
        table.set_status(system, str(exc))
    except Exception as exc:  # one failed system must not stop the run
        log(f"  {system} failed: {type(exc).__name__}: {exc}")
        table.add_error(system, f"{type(exc).__name__}: {exc}")
    else:
        for group, metrics in groups.items():
            if isinstance(metrics, str):
                log(f"  {system} {group} failed: {metrics}")
                table.add_error(system, metrics, group)
            else:
                table.add(group, system, metrics)
        if cfg.verbose:
            log(f"  {time.monotonic() - started:.1f} s")
