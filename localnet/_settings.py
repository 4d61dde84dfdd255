"""A peer's settings: its keyword argument, else its environment variable (read
when the peer is created), else the default.

Each is checked here, where it is given: a :class:`ConfigurationError` says
which setting was wrong and what to give instead.  :func:`apply` sets them on
the :class:`~localnet.Peer` being created.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from . import _fork, _paths, _shm
from ._wire import DEFAULT_MAX_FRAME
from .errors import ConfigurationError

#: Seconds a caller polls its call connection for the answer, and a callee
#: for its caller's next call, before the thread sleeps (see ``Peer``).
DEFAULT_SPIN = 50e-6
#: More than this is surely a mistake of units (the setting is in seconds).
MAX_SPIN = 0.01

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def default_name() -> str:
    """``<program>-<pid>``, the name of a peer nobody named."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    program = os.path.splitext(program)[0] or "python"
    return f"{program}-{os.getpid()}"


def env_bool(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use 1/true/yes or 0/false/no")


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None


_debug_handler: logging.Handler | None = None


def debug_from_env() -> None:
    """``LOCALNET_DEBUG``: debug logging of the ``localnet`` logger to stderr, once."""
    global _debug_handler
    if _debug_handler is None and env_bool("LOCALNET_DEBUG"):
        _debug_handler = logging.StreamHandler()
        _debug_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"))
        root = logging.getLogger("localnet")
        root.addHandler(_debug_handler)
        root.setLevel(logging.DEBUG)


def check_threshold(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError("shm_threshold is a positive number of bytes, or None")
    return value if _shm.AVAILABLE else None


def spin_setting(spin: float | None) -> float:
    """``spin``, else ``LOCALNET_SPIN``, else :data:`DEFAULT_SPIN`; seconds."""
    where = "spin"
    if spin is None:
        where, spin = "LOCALNET_SPIN", env_number("LOCALNET_SPIN", DEFAULT_SPIN)
    if isinstance(spin, bool) or not isinstance(spin, (int, float)) \
            or not 0 <= spin <= MAX_SPIN:
        raise ConfigurationError(f"{where}={spin!r}: give seconds from 0 (never poll) to "
                                 f"{MAX_SPIN}, for example 50e-6 for 50 µs")
    return float(spin)


def apply(peer: Any, *, name: str | None, group: str | None, hub: bool | None,
          directory: str | os.PathLike[str] | None, max_frame: int | None, event_queue: int,
          event_bytes: int, event_block: float, linger: float, max_workers: int,
          max_calls: int, shm_threshold: int | None | str, spin: float | None) -> None:
    """Set the settings of ``peer`` (being created), as its attributes of the
    same names, from its keywords and the environment."""
    debug_from_env()
    name = name if name is not None else _fork.env_name() or default_name()
    if not isinstance(name, str) or not name or len(name) > 255 \
            or any(c in name for c in "\0\n\r"):
        raise ConfigurationError(f"invalid peer name {name!r}: use 1-255 printable characters")
    peer.name = name
    peer.group = group if group is not None else os.environ.get("LOCALNET_GROUP") or None
    peer.hub = bool(hub) if hub is not None else bool(env_bool("LOCALNET_HUB"))
    peer._directory_arg = directory
    peer.directory = _paths.default_runtime_dir() if directory is None else directory
    peer.max_frame = int(max_frame if max_frame is not None else
                         env_number("LOCALNET_MAX_FRAME", DEFAULT_MAX_FRAME))
    if peer.max_frame < 1024:
        raise ConfigurationError("max_frame must be at least 1024 bytes")
    if type(event_bytes) is not int or event_bytes < 1:
        raise ConfigurationError(f"event_bytes={event_bytes!r}: use a positive number of bytes")
    if event_queue < 1 or event_block < 0 or linger < 0 or max_workers < 1 or max_calls < 1:
        raise ConfigurationError("event_queue, max_workers and max_calls must be positive; "
                                 "event_block and linger must not be negative")
    peer.shm_threshold = _shm.threshold_from_env() if shm_threshold == "env" \
        else check_threshold(shm_threshold)
    peer.spin = spin_setting(spin)
    peer.event_queue = event_queue
    peer.event_bytes = event_bytes
    peer.event_block = event_block
    peer.linger = linger
    peer.max_workers = max_workers
    peer.max_calls = max_calls
