"""Serialization: Python objects to frame bodies and back.

Payloads are pickle protocol 5.  Values made only of builtin scalars (and
small containers of them) go through the C pickler, which is about four
times faster than cloudpickle for a tiny call; anything else - lambdas,
closures, classes defined in ``__main__``, NumPy arrays - goes through
cloudpickle, which pickles what the receiver cannot import by value.  Both
produce ordinary pickles that ``pickle.loads`` reads.

Errors: :func:`dumps` raises :class:`~localnet.SerializationError` naming
what could not be pickled; :func:`loads` raises it when a payload cannot be
rebuilt (a missing module on this side, say).
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from .errors import RemoteError, SerializationError

PROTOCOL = 5

_SCALARS = frozenset({str, int, float, bool, type(None), bytes, complex})
_CONTAINERS = frozenset({tuple, list, frozenset, set})
_SMALL = 32  # containers longer than this are not inspected: cloudpickle decides


def _plain(value: Any, depth: int = 3) -> bool:
    """True when the C pickler alone pickles ``value`` faithfully."""
    t = type(value)
    if t in _SCALARS:
        return True
    if depth == 0:
        return False
    if t in _CONTAINERS:
        if len(value) > _SMALL:
            return False
        for item in value:
            if type(item) not in _SCALARS and not _plain(item, depth - 1):
                return False
        return True
    if t is dict:
        if len(value) > _SMALL:
            return False
        for key, item in value.items():
            if type(key) not in _SCALARS:
                return False
            if type(item) not in _SCALARS and not _plain(item, depth - 1):
                return False
        return True
    return False


def dumps(obj: Any, what: str = "value") -> bytes:
    """Pickle ``obj`` for another peer.

    ``what`` names the value in the error message ("argument of render").

    Raises:
        SerializationError: ``obj`` (or something inside it) cannot be pickled.
    """
    try:
        if _plain(obj):
            return pickle.dumps(obj, PROTOCOL)
        return cloudpickle.dumps(obj, PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"cannot send {what}: {type(exc).__name__}: {exc}. "
            "Pass values that pickle (cloudpickle) can serialize"
        ) from exc


def dumps_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> bytes:
    """Pickle the ``(name, args, kwargs)`` triple of a call or an event."""
    return dumps((name, args, kwargs), what)


def loads(data: bytes | bytearray | memoryview, what: str = "value") -> Any:
    """Rebuild an object from :func:`dumps` output.

    Raises:
        SerializationError: the payload cannot be rebuilt here.
    """
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(
            f"cannot rebuild {what}: {type(exc).__name__}: {exc}"
        ) from exc


def dumps_exception(exc: BaseException, traceback_text: str) -> bytes:
    """Pickle a remote exception with its traceback text.

    The envelope (type name, message, traceback, pickled exception) is plain
    data, so the caller can always raise at least a :class:`RemoteError`,
    even when the exception itself does not pickle or cannot be rebuilt.
    """
    cls = type(exc)
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = repr(exc)
    try:
        pickled: bytes | None = cloudpickle.dumps(exc, PROTOCOL)
    except Exception:
        pickled = None
    return pickle.dumps((type_name, message, traceback_text, pickled), PROTOCOL)


def loads_exception(data: bytes | bytearray | memoryview) -> BaseException:
    """Rebuild what :func:`dumps_exception` pickled, with ``remote_traceback`` set."""
    try:
        type_name, message, traceback_text, pickled = pickle.loads(data)
    except Exception as exc:
        return RemoteError("unknown", f"unreadable remote error ({exc})")
    exc_obj: BaseException | None = None
    if pickled is not None:
        try:
            exc_obj = pickle.loads(pickled)
        except Exception:
            exc_obj = None
    if not isinstance(exc_obj, BaseException):
        exc_obj = RemoteError(type_name, message, traceback_text)
    try:
        exc_obj.remote_traceback = traceback_text  # type: ignore[attr-defined]
        if hasattr(exc_obj, "add_note") and traceback_text:
            exc_obj.add_note("Remote traceback (most recent call last in the other peer):\n"
                             + traceback_text.rstrip())
    except Exception:
        pass
    return exc_obj
