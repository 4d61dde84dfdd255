"""Remote tracebacks: what a caller sees of an exception raised while serving its call.

The caller did not write localnet's serving code, so the frames of it at the
top of the traceback (reading the call, looking the connection up, calling
it) are left out: the text starts at the caller's function.  An exception
raised by the call itself - a ``TypeError`` for a wrong number of arguments
- has no frame of the user's left, and reads as the exception line alone,
as Python shows it for a call that fails at its first line::

    TypeError: add() takes from 1 to 2 positional arguments but 3 were given

Frames further down stay, localnet's included: when the user's function
called another peer, that is part of its story.
"""

from __future__ import annotations

import os
import traceback

# As the modules of this package spell their own file names (co_filename).
_PACKAGE = os.path.join(os.path.dirname(__file__), "")


def user_traceback(exc: BaseException) -> str:
    """``exc`` formatted as a traceback, without localnet's leading frames.

    Example: a Peer's ERROR reply carries ``user_traceback(exc)`` as the
    remote traceback text.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    finally:
        del tb  # the frames hold the call's arguments (shared memory included)
