"""Timeouts given by users: checked where they are given, before anything is sent.

A timeout is ``None`` (wait as long as it takes) or a positive, finite
number of seconds.  Zero and negative numbers are refused rather than read
as "already expired": a call given one would be sent, and run by the other
peer, while its caller gave up at once.  ``True`` is refused too (it is an
``int`` to Python, and almost always a mistake), and so is a string such as
``"1"`` - with a message that says what to pass, not a ``TypeError`` from
deep inside.
"""

from __future__ import annotations

import math
import numbers

from .errors import ConfigurationError


def check_timeout(value: object, what: str = "timeout") -> float | None:
    """``value`` as seconds (a float), or None; ``what`` names it in the error.

    Raises:
        ConfigurationError: ``value`` is not None or a positive finite number.

    Example::

        check_timeout(5)          # 5.0
        check_timeout(None)       # None
        check_timeout(0)          # ConfigurationError
    """
    if value is None:
        return None
    cls = type(value)
    if cls is float or cls is int:
        seconds = float(value)  # type: ignore[arg-type]
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{what} must be None (no limit) or a positive number of seconds, "
            f"not {value!r} ({cls.__name__})")
    if not seconds > 0 or math.isinf(seconds):  # NaN fails the comparison
        raise ConfigurationError(
            f"{what} must be None (no limit) or a positive number of seconds, not {value!r}; "
            "to wait without a limit, pass None")
    return seconds
