"""Events a subscriber could not handle: saying so where someone will see it.

The ``localnet`` logger has only a NullHandler unless the application
configures logging, so a failure logged there alone leaves no trace.
:func:`tell_once` also writes the first failure of each kind per publisher
process and event to stderr, one line; every failure is still logged.
"""

from __future__ import annotations

import io
import logging
import pickletools
import sys
from typing import Any

from . import _serial

logger = logging.getLogger("localnet.peer")

_told: set[tuple[str, int, str | None, str]] = set()
_TOLD_MAX = 1000  # distinct failures told about; then only the logger


def tell_once(key: tuple[str, int, str | None, str], message: str) -> None:
    """Write ``message`` to stderr the first time ``key`` fails: (publisher, its pid,
    event, kind of failure).

    Logging is the application's to configure, and the ``localnet`` logger
    has only a NullHandler by default: a failure nobody configured logging
    for would otherwise leave no trace.  One line per (publisher, event)
    keeps a stream of failures from flooding stderr; the caller logs every one.
    """
    if key in _told or len(_told) >= _TOLD_MAX:
        return
    _told.add(key)
    try:
        sys.stderr.write(f"localnet: {message} (shown once per publisher and event; "
                         f"every failure goes to the 'localnet' logger)\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no usable stderr


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


def event_name(body: Any) -> str | None:
    """The event name in the pickle of an event that cannot be rebuilt, if it shows.

    The pickle of ``(name, args, kwargs)`` pushes the name first; its opcodes
    are read without running any of them.
    """
    try:
        data = bytes(body[:4096])
        if data[:1] == b"O":  # shared memory: a table of segments, then the pickle
            count = _serial._COUNT.unpack_from(data, 1)[0]
            data = data[1 + _serial._COUNT.size + count * _serial._ENTRY.size:]
        for number, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if opcode.name in _STRINGS:
                return str(arg)
            if number > 4:
                return None
    except Exception:
        return None
    return None
