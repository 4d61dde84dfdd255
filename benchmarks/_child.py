"""Child-process side of the harness: argv dispatch, reporting, commands, lifetime.

Every benchmark process is started by the coordinator as::

    python -m benchmarks.<module> <role> <system> '<json params>'

and talks to it through two pipes:

- stdout: one protocol line per message, ``@@bench {json}``. A child reports
  ``{"ready": ...}`` once it can be used (readiness handshake), ``{"result": ...}``
  with its measurements, ``{"unavailable": reason}`` when its package or API is
  missing, and ``{"error": text}`` when it failed. Other stdout lines are ignored.
- stdin: one command per line from the coordinator (``go``, ``probe``, ``quit``).
  End of file means ``quit``.

Each child arms ``SIGALRM`` for its lifetime (``params["lifetime"]`` seconds) and,
on Linux, asks to receive ``SIGTERM`` when the coordinator dies, so none outlives a run.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import math
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

PREFIX = "@@bench "
EOF_COMMAND = "quit"

Params = dict[str, Any]
Role = Callable[[str, Params], None]

# Every localnet adapter needs at least this public name (DESIGN.md section 2).
LOCALNET_API = ("Peer",)

_stdin_buffer = bytearray()


class SystemUnavailable(Exception):
    """An adapter's package or API is missing: reported in the table, not fatal."""


def report(**message: Any) -> None:
    """Send one protocol message to the coordinator."""
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def read_command(timeout: float) -> str | None:
    """Return the coordinator's next command line, ``"quit"`` at EOF, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        newline = _stdin_buffer.find(b"\n")
        if newline >= 0:
            line = bytes(_stdin_buffer[:newline]).decode().strip()
            del _stdin_buffer[: newline + 1]
            return line
        remaining = deadline - time.monotonic()
        if remaining < 0:
            return None
        readable, _, _ = select.select([0], [], [], remaining)
        if readable:
            chunk = os.read(0, 4096)
            if not chunk:
                return EOF_COMMAND
            _stdin_buffer.extend(chunk)


def expect_command(expected: str, timeout: float) -> None:
    """Wait for ``expected`` on stdin; raise TimeoutError or RuntimeError otherwise."""
    command = read_command(timeout)
    if command is None:
        raise TimeoutError(f"no {expected!r} from the coordinator within {timeout:.0f} s")
    if command != expected:
        raise RuntimeError(f"expected command {expected!r}, got {command!r}")


def wait_for_quit(timeout: float) -> None:
    """Block until the coordinator says quit (or closes stdin), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if read_command(remaining) == EOF_COMMAND:
            return


def need_module(name: str) -> ModuleType:
    """Import a third-party package or report the system as not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SystemUnavailable("not installed") from exc


def need_localnet(*api: str) -> ModuleType:
    """Import localnet and check that it offers ``api``; otherwise the system is unavailable.

    Any exception at import counts: the library is being written alongside these benchmarks.
    """
    try:
        module = importlib.import_module("localnet")
    except Exception as exc:
        raise SystemUnavailable(f"not available ({type(exc).__name__}: {exc})") from exc
    missing = [name for name in (*LOCALNET_API, *api) if not hasattr(module, name)]
    if missing:
        names = ", ".join(f"localnet.{name}" for name in missing)
        raise SystemUnavailable(f"not available (no {names})")
    return module


def load_localnet_module(module: str, *api: str) -> ModuleType:
    """Import one of our localnet adapter modules (which apply the decorators at import)."""
    need_localnet(*api)
    try:
        return importlib.import_module(f"benchmarks.{module}")
    except Exception as exc:
        raise SystemUnavailable(f"not available ({type(exc).__name__}: {exc})") from exc


def _limit_lifetime(seconds: float) -> None:
    signal.alarm(max(1, math.ceil(seconds)))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def run_child(roles: Mapping[str, Role]) -> None:
    """Entry point of a benchmark process: dispatch ``argv`` to a role, report, and exit.

    The process leaves with ``os._exit`` once the role has returned, so that background
    threads of the system under test (zmq contexts, server threads) cannot stall it.
    """
    role, system, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    params: Params = json.loads(raw)
    _limit_lifetime(float(params.get("lifetime", 300)))
    if params.get("cpus"):  # before any thread starts: every thread inherits it
        os.sched_setaffinity(0, params["cpus"])
    code = 0
    try:
        roles[role](system, params)
    except SystemUnavailable as exc:
        report(unavailable=str(exc))
    except BaseException as exc:  # every failure goes to the coordinator, then we exit
        traceback.print_exc()
        report(error=f"{type(exc).__name__}: {exc}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
