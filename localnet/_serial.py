"""Serialization: Python objects to frame bodies and back.

Payloads are pickle protocol 5.  Values made only of builtin scalars (and
small containers of them) go through the C pickler, which is about four
times faster than cloudpickle for a tiny call; anything else - lambdas,
closures, classes defined in ``__main__``, NumPy arrays - goes through
cloudpickle, which pickles what the receiver cannot import by value.  Both
produce ordinary pickles that ``pickle.loads`` reads.

Out-of-band buffers (protocol 5: NumPy arrays, bytearrays, memoryviews) of
``threshold`` bytes or more leave the pickle stream and travel in shared
memory (:mod:`localnet._shm`); the body then starts with ``b"O"`` and a
table of where each buffer lies (a bytearray is found only inside lists,
tuples and dicts: see :func:`_lift_bytearrays`):

====== ======================================================
size   field
====== ======================================================
1      ``b"O"``
2      number of buffers *n*
12 n   per buffer: descriptor index (u16), offset (u64)... see ``_ENTRY``
rest   the pickle stream
====== ======================================================

A plain body starts with the pickle PROTO opcode (``0x80``) instead.

Errors: :func:`dumps` raises :class:`~localnet.SerializationError` naming
what could not be pickled; :func:`loads` raises it when a payload cannot be
rebuilt (a missing module on this side, say).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _shm
from .errors import RemoteError, SerializationError

#: ``encode_item(name, args, kwargs, limit)``: the item of an event of plain
#: values, written directly (C, :mod:`localnet._speedups`, built optionally by
#: setup.py), or None when a value is not one it handles - then
#: :func:`dumps_event` decides.  None itself when the extension is not built.
#: ``encode_call`` and ``encode_value`` write whole protocol-3 pickles of a
#: call's triple and of one value the same way (calls and results of plain
#: values), or return None.
encode_item: Callable[[str, tuple[Any, ...], dict[str, Any], int], bytes | None] | None
encode_call: Callable[[str, tuple[Any, ...], dict[str, Any], int], bytes | None] | None
encode_value: Callable[[Any, int], bytes | None] | None
_memo_bound: Callable[[bytes | bytearray | memoryview], int] | None
_load_checked: Callable[[bytes | bytearray | memoryview], Any] | None
try:
    from ._speedups import encode_call, encode_item, encode_value
    from ._speedups import load_checked as _load_checked
    from ._speedups import memo_bound as _memo_bound
except ImportError:
    encode_item = encode_call = encode_value = _memo_bound = _load_checked = None

#: Calls and results of plain values up to this size are written by the C
#: encoder; longer ones by the pickler, whose cost is then in the copying.
ENCODE_MAX = 64 * 1024

PROTOCOL = 5

_SCALARS = frozenset({str, int, float, bool, type(None), bytes, complex})
_CONTAINERS = frozenset({tuple, list, frozenset, set})
_SMALL = 32  # containers longer than this are not inspected: cloudpickle decides
_OOB = 0x4F  # b"O"
_COUNT = struct.Struct("<H")
_ENTRY = struct.Struct("<HQQ")  # descriptor index, offset in the segment, length


def _plain(value: Any, depth: int = 3) -> int:
    """Whether the C pickler alone pickles ``value`` faithfully.

    0: no (cloudpickle decides); 1: yes; 2: yes, and it holds buffers
    (contiguous NumPy arrays) that may leave the stream.  Bytearrays are not
    plain: the C pickler would keep even large ones in the stream.
    """
    t = type(value)
    if t in _SCALARS:
        return 1
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        flags = value.flags
        # Object arrays may hold anything; non-contiguous ones NumPy copies in-band.
        return 0 if value.dtype.hasobject or not (flags.c_contiguous or flags.f_contiguous) \
            else 2
    if depth == 0:
        return 0
    if (t is not dict and t not in _CONTAINERS) or len(value) > _SMALL:
        return 0
    items = value
    if t is dict:
        for key in value:
            if type(key) not in _SCALARS:
                return 0
        items = value.values()
    kind = 1
    for item in items:
        if type(item) not in _SCALARS:
            sub = _plain(item, depth - 1)
            if not sub:
                return 0
            kind = max(kind, sub)
    return kind


def _rebuild_memoryview(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer)
    if view.format != fmt or view.shape != shape:
        view = view.cast("B").cast(fmt, shape)  # type: ignore[call-overload]
    return view


def _reduce_memoryview(view: memoryview) -> tuple[Any, ...]:
    if view.c_contiguous:
        return _rebuild_memoryview, (pickle.PickleBuffer(view), view.format, view.shape)
    return _rebuild_memoryview, (view.tobytes(), view.format, view.shape)


def _identity(obj: Any) -> Any:
    return obj


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus memoryviews, plus large non-contiguous arrays made contiguous.

    (NumPy pickles a non-contiguous array as an in-band copy; copying it to
    a contiguous one first lets it leave the stream.)
    """

    dispatch_table = ChainMap({memoryview: _reduce_memoryview}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: Any, threshold: int | None, buffer_callback: Any) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._threshold = threshold

    def reducer_override(self, obj: Any) -> Any:
        # (Never called for a bytearray, a list, a tuple or a dict: the C
        # pickler saves those itself.  See _lift_bytearrays.)
        cls = type(obj)
        if (self._threshold is not None and cls.__name__ == "ndarray"
                and cls.__module__ == "numpy" and obj.nbytes >= self._threshold
                and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
                and not obj.dtype.hasobject):
            import numpy as np

            return _identity, (np.ascontiguousarray(obj),)
        return super().reducer_override(obj)


class _LargeBytearray:
    """A bytearray of ``threshold`` bytes or more, on its way out of band.

    The C pickler writes a bytearray in-band before it consults
    ``reducer_override`` or the dispatch table, so :func:`dumps` has
    :func:`_lift_bytearrays` put large ones in this wrapper, which pickles as
    ``bytearray(PickleBuffer(data))``: the buffer leaves the stream, and the
    receiver rebuilds a bytearray (a copy of the shared memory, which it may
    then keep and change freely).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytearray, (pickle.PickleBuffer(self.data),)


_LIFTED = frozenset({bytearray, list, tuple, dict})


class _Cycle(Exception):
    """A container that holds itself: left as it is (its bytearrays in-band)."""


def _lift_bytearrays(obj: Any, threshold: int) -> Any:
    """``obj`` with bytearrays of ``threshold`` bytes or more wrapped to leave the stream.

    Looks through lists, tuples and dicts (the arguments of a call are a
    tuple and a dict) at any depth; a bytearray held elsewhere - an
    attribute of an object, in a set - stays in the pickle stream.  Containers
    are copied only along the way to a large bytearray; a bytearray met
    twice becomes one wrapper, so it arrives as one object.  A structure
    that contains itself, or nests deeper than the recursion limit, is
    returned unchanged.
    """
    memo: dict[int, Any] = {}
    try:
        return _lift(obj, threshold, memo)
    except (_Cycle, RecursionError):
        return obj


def _lift(obj: Any, threshold: int, memo: dict[int, Any]) -> Any:
    t = type(obj)
    if t not in _LIFTED:
        return obj
    key = id(obj)
    if key in memo:
        done = memo[key]
        if done is _Cycle:
            raise _Cycle
        return done
    if t is bytearray:
        done = _LargeBytearray(obj) if len(obj) >= threshold else obj
    else:
        values = obj.values() if t is dict else obj
        if _LIFTED.isdisjoint(set(map(type, values))):
            return obj  # the common case: nothing to look into
        memo[key] = _Cycle  # in progress
        if t is dict:
            lifted = {k: _lift(v, threshold, memo) for k, v in obj.items()}
            changed = any(new is not old
                          for new, old in zip(lifted.values(), obj.values(), strict=True))
        else:
            items = [_lift(v, threshold, memo) for v in obj]
            changed = any(new is not old for new, old in zip(items, obj, strict=True))
            lifted = t(items) if changed else obj
        done = lifted if changed else obj
    memo[key] = done
    return done


class Payload:
    """A body whose large buffers live in shared memory.

    ``fds`` go with the body.  Each holder (a call, an outbox) calls
    :meth:`settle` once its receiver acknowledged, or :meth:`abandon` when
    that is unknown; the pooled segments go back when the last one does.
    ``nbytes`` is the memory it holds: the body, the pooled segments whole,
    and the bytes it carries of arrays from :func:`localnet.empty`.
    """

    __slots__ = ("body", "fds", "nbytes", "_segments", "_keep", "_holders", "_abandoned",
                 "_lock")

    def __init__(self, body: bytes, fds: list[int], segments: list[_shm.Segment],
                 keep: list[Any], shared: int = 0) -> None:
        self.body = body
        self.fds = fds
        self.nbytes = len(body) + shared
        self._segments = segments
        self._keep = keep  # mappings of arrays from empty(): alive while in flight
        self._holders = 1
        self._abandoned = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.body)

    def hold(self, n: int = 1) -> None:
        with self._lock:
            self._holders += n

    def settle(self) -> None:
        self._drop(abandon=False)

    def abandon(self) -> None:
        self._drop(abandon=True)

    def _drop(self, abandon: bool) -> None:
        with self._lock:
            self._abandoned |= abandon
            self._holders -= 1
            if self._holders:
                return
            segments, self._segments, self._keep = self._segments, [], []
        for segment in segments:
            (_shm.POOL.abandon if self._abandoned else _shm.POOL.release)(segment)


def dumps(obj: Any, what: str = "value", threshold: int | None = None,
          name: str | None = None) -> bytes | Payload:
    """Pickle ``obj`` for another peer.

    ``what`` (and ``name``, when given) name the value in the error message
    ("an argument of 'render'"); they are formatted only on error.
    With a ``threshold``, buffers of that many bytes or more go to shared
    memory and a :class:`Payload` is returned.

    Raises:
        SerializationError: ``obj`` (or something inside it) cannot be pickled.
    """
    if encode_value is not None:
        data = encode_value(obj, ENCODE_MAX)
        if data is not None:
            return data
    try:
        kind = _plain(obj)
        if kind == 1 or (kind == 2 and threshold is None):
            return pickle.dumps(obj, PROTOCOL)
        if threshold is None:
            return _pickle(obj, None, None)
        large: list[memoryview] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:
                return True
            if raw.nbytes < threshold:
                return True
            large.append(raw)
            return False

        if kind == 2:  # builtins and arrays: the C pickler, buffers out of band
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=out_of_band)
        elif threshold < _DIRECT_WRITE:
            data = _pickle(_lift_bytearrays(obj, threshold), threshold, out_of_band)
        else:
            try:
                data = _pickle(obj, threshold, out_of_band, watch=True)
            except _InBand:
                large.clear()
                data = _pickle(_lift_bytearrays(obj, threshold), threshold, out_of_band)
    except Exception as exc:
        raise SerializationError(
            f"cannot send {_label(what, name)}: {type(exc).__name__}: {exc}. "
            "Pass values that pickle (cloudpickle) can serialize"
        ) from exc
    if not large:
        return data
    return _to_shared(data, large)


def _pickle(obj: Any, threshold: int | None, callback: Any, watch: bool = False) -> bytes:
    with (_Watch(threshold) if watch else io.BytesIO()) as file:
        _Pickler(file, threshold, callback).dump(obj)
        return file.getvalue()


#: The C pickler hands data of this many bytes or more straight to the
#: file's ``write`` (a bytearray as itself), bypassing its frame buffer.
_DIRECT_WRITE = 64 * 1024


class _InBand(Exception):
    """A large bytearray was about to be written into the pickle stream."""


class _Watch(io.BytesIO):
    """A pickle's output that stops the pickler at the first large bytearray.

    Looking for bytearrays before pickling would cost a walk over every
    list, tuple and dict, as much as pickling a long list of numbers; this
    costs one check per 64 KiB written, and :func:`dumps` walks only when
    a large bytearray is actually there.
    """

    def __init__(self, threshold: int | None) -> None:
        super().__init__()
        self._threshold = threshold if threshold is not None else 1 << 62

    def write(self, data: Any) -> int:
        if type(data) is bytearray and len(data) >= self._threshold:
            raise _InBand
        return super().write(data)


def _to_shared(data: bytes, large: list[memoryview]) -> Payload:
    fds: list[int] = []
    index: dict[int, int] = {}
    segments: list[_shm.Segment] = []
    keep: list[Any] = []
    shared = 0  # bytes of shared memory it holds
    table = [_COUNT.pack(len(large))]
    try:
        for raw in large:
            owned = _shm.owned_segment(raw)
            if owned is not None:
                mapping, fd, offset = owned
                keep.append(mapping)
                shared += raw.nbytes
            else:
                segment = _shm.POOL.acquire(raw.nbytes)
                segments.append(segment)
                segment.write(raw.cast("B") if raw.format != "B" else raw)
                fd, offset = segment.fd, 0
                shared += segment.size
            if fd not in index:
                index[fd] = len(fds)
                fds.append(fd)
            table.append(_ENTRY.pack(index[fd], offset, raw.nbytes))
    except BaseException:
        for segment in segments:
            _shm.POOL.abandon(segment)
        raise
    return Payload(b"O" + b"".join(table) + data, fds, segments, keep, shared)


def _label(what: str, name: str | None) -> str:
    return f"{what} {name!r}" if name is not None else what


def _builtins_only(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the C pickler alone pickles these arguments faithfully (no buffers)."""
    for value in args:
        if type(value) not in _SCALARS and _plain(value, 2) != 1:
            return False
    for value in kwargs.values():
        if type(value) not in _SCALARS and _plain(value, 2) != 1:
            return False
    return True


def dumps_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], what: str,
               threshold: int | None = None) -> bytes | Payload:
    """Pickle the ``(name, args, kwargs)`` triple of a call.

    ``what`` is "an argument of"; the error names ``name`` after it.
    """
    if encode_call is not None:
        data = encode_call(name, args, kwargs, ENCODE_MAX)
        if data is not None:
            return data
    return pickle_call(name, args, kwargs, what, threshold)


def pickle_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], what: str,
                threshold: int | None = None) -> bytes | Payload:
    """:func:`dumps_call` for a call the C encoder did not take (or without it)."""
    if _builtins_only(args, kwargs):
        try:
            return pickle.dumps((name, args, kwargs), PROTOCOL)
        except Exception:
            pass  # cloudpickle below says what is wrong
    return dumps((name, args, kwargs), what, threshold, name)


#: Event items longer than this are sent as whole pickles.
ITEM_MAX = 16 * 1024


def dumps_event(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                threshold: int | None = None) -> bytes | Payload:
    """Pickle the ``(name, args, kwargs)`` triple of an event.

    Builtin values make an *item*: a protocol-3 pickle without its PROTO
    opcode and STOP, which a publisher sends many to a frame as one list
    (``_wire.pack_items``; protocol 3 because its memo references carry
    explicit indices).  Anything else is pickled whole, as :func:`dumps`
    does (a body starting with 0x80, or a :class:`Payload`).
    """
    if _builtins_only(args, kwargs):
        try:
            data = pickle.dumps((name, args, kwargs), 3)
        except Exception:
            pass  # cloudpickle below says what is wrong
        else:
            return data[2:-1] if len(data) <= ITEM_MAX else data
    return dumps((name, args, kwargs), "an argument of event", threshold, name)


def unpickle(data: bytes | bytearray | memoryview, buffers: Any = None) -> Any:
    """``pickle.loads`` for what arrived from another process.

    The C unpickler sizes its memo by the largest index a pickle names and
    zeroes it: a few bytes naming index 10**9 make it allocate gigabytes.  A
    real pickle's memo indices are below its length, so one naming a larger
    index is refused (``ValueError``) before it is read.  (The check needs
    :mod:`localnet._speedups`; without it pickles are read unchecked.)
    """
    if buffers is None and _load_checked is not None:
        return _load_checked(data)  # the same check and load, in one C call
    if _memo_bound is not None and _memo_bound(data) >= len(data):
        raise ValueError("a memo index beyond the pickle's own length")
    return pickle.loads(data, buffers=buffers)


#: :func:`unpickle` without out-of-band buffers: the C call itself where it is built.
load_plain: Callable[[bytes | bytearray | memoryview], Any] = \
    unpickle if _load_checked is None else _load_checked


def unreadable(what: str, name: str | None, exc: Exception) -> SerializationError:
    """The error for a payload that cannot be rebuilt here (``exc``: why)."""
    return SerializationError(
        f"cannot rebuild {_label(what, name)}: {type(exc).__name__}: {exc}")


def loads(data: bytes | bytearray | memoryview, what: str = "value",
          fds: list[int] | None = None, name: str | None = None) -> Any:
    """Rebuild an object from :func:`dumps` output; takes ownership of ``fds``.

    Raises:
        SerializationError: the payload cannot be rebuilt here.
    """
    try:
        if data and data[0] == _OOB:
            return _loads_shared(memoryview(data), fds or [])
        if fds:
            _close(fds)
        return load_plain(data)
    except Exception as exc:
        raise unreadable(what, name, exc) from exc


def _loads_shared(view: memoryview, fds: list[int]) -> Any:
    mappings: list[Any] = []
    try:
        (count,) = _COUNT.unpack_from(view, 1)
        entries = [_ENTRY.unpack_from(view, 1 + _COUNT.size + i * _ENTRY.size)
                   for i in range(count)]
        start = 1 + _COUNT.size + count * _ENTRY.size
        pending = list(fds)
        fds.clear()
        while pending:
            mappings.append(_shm.map_received(pending.pop(0)))
    except BaseException:
        _close(pending if "pending" in locals() else fds)
        raise
    buffers = []
    for idx, offset, length in entries:
        if idx >= len(mappings) or offset + length > len(mappings[idx]):
            raise ValueError("a shared-memory buffer lies outside its segment")
        buffers.append(memoryview(mappings[idx])[offset: offset + length])
    return unpickle(view[start:], buffers=buffers)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
    # An exception that came from another peer carries that peer's traceback
    # (``remote_traceback`` and a note), and ``traceback_text`` already shows
    # it: pickled along, it would double at each hop of a chain of nested
    # calls.  So the pickled exception goes without them.
    state = getattr(exc, "__dict__", None)
    carried: dict[str, Any] = {}
    if state:
        if "remote_traceback" in state:
            carried["remote_traceback"] = state.pop("remote_traceback")
        notes = state.get("__notes__")
        if isinstance(notes, list) and any(_is_remote_note(n) for n in notes):
            carried["__notes__"] = notes
            state["__notes__"] = [n for n in notes if not _is_remote_note(n)]
    try:
        pickled: bytes | None = cloudpickle.dumps(exc, PROTOCOL)
    except Exception:
        pickled = None
    finally:
        if carried:
            assert state is not None
            state.update(carried)
    return pickle.dumps((type_name, message, traceback_text, pickled), PROTOCOL)


def _is_remote_note(note: object) -> bool:
    return isinstance(note, str) and note.startswith(_REMOTE_NOTE)


_REMOTE_NOTE = "Remote traceback (most recent call last in the other peer):"


def loads_exception(data: bytes | bytearray | memoryview) -> Exception:
    """Rebuild what :func:`dumps_exception` pickled, with ``remote_traceback`` set.

    Only an ``Exception`` is rebuilt as itself; anything else arrives as a
    :class:`RemoteError` naming its type.
    """
    try:
        type_name, message, traceback_text, pickled = unpickle(data)
    except Exception as exc:
        return RemoteError("unknown", f"unreadable remote error ({exc})")
    rebuilt: object = None
    if pickled is not None:
        try:
            rebuilt = unpickle(pickled)
        except Exception:
            rebuilt = None
    exc_obj: Exception
    if isinstance(rebuilt, Exception):
        exc_obj = rebuilt
    else:
        # Not rebuilt, or a BaseException that is no Exception (SystemExit,
        # KeyboardInterrupt, ...): raised here it would end this process, or
        # stop it like a Ctrl-C, for something that happened in another one.
        exc_obj = RemoteError(type_name, message, traceback_text)
    try:
        exc_obj.remote_traceback = traceback_text  # type: ignore[attr-defined]
        if hasattr(exc_obj, "add_note") and traceback_text:
            exc_obj.add_note(_REMOTE_NOTE + "\n"
                             + traceback_text.rstrip())
    except Exception:
        pass
    return exc_obj


def refuse_oversize(payload: bytes | Payload, max_frame: int, what: str) -> None:
    """Raise :class:`SerializationError` when ``payload`` is over ``max_frame`` inline.

    A refused payload's shared memory is released first.
    """
    if len(payload) > max_frame:
        if isinstance(payload, Payload):
            payload.settle()
        raise SerializationError(
            f"{what} is {len(payload)} bytes inline, over the {max_frame}-byte "
            "message limit; raise max_frame (LOCALNET_MAX_FRAME), or send large data "
            "as NumPy arrays/bytearrays so it goes through shared memory")
