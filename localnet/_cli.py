"""The ``localnet`` command line (also ``python -m localnet``).

Look at the peers of a runtime directory, call them and trigger or watch
their events from a shell::

    localnet peers                         # who is there
    localnet info farm-2                   # everything about one peer
    localnet call farm-2 render 7 quality=2
    localnet emit frame_done 7 path=/tmp/7.exr
    localnet listen frame_done             # print events as they arrive

Arguments of ``call`` and ``emit`` are Python literals (``7``, ``'7'``,
``[1, 2]``, ``None``); anything that is not a literal is a plain string,
except a word that starts like a literal (``[ ( { ' "``) but is not one
(``[1,2``): that is a usage error, so a typo never becomes a string;
``key=value`` is a keyword argument.  Errors print one ``localnet: error:``
line on stderr; the exit status is 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import localnet
from localnet import _transports

# The command's own peer; peers() leaves it out of every listing.
DEFAULT_NAME = "localnet-cli-{pid}"
_PROG = "localnet"


class UsageError(Exception):
    """A malformed command line that argparse cannot see (exit status 2)."""


# -- arguments ----------------------------------------------------------------

#: A word starting with one of these is meant as a literal: it must be one.
_LITERAL_START = ("[", "(", "{", "'", '"')


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        if text.lstrip().startswith(_LITERAL_START):
            detail = exc.msg if isinstance(exc, SyntaxError) else "not a plain value"
            raise UsageError(
                f"argument {text!r} starts like a Python literal but is not one ({detail}); "
                f"fix it, or to pass it as a string quote it as one: \"{text!r}\"") from None
        return False, text


def parse_value(text: str) -> Any:
    """A Python literal (``7``, ``'a'``, ``[1, 2]``, ``None``), else the text itself.

    Raises:
        UsageError: ``text`` starts like a literal (``[ ( { ' "``) but is not one.
    """
    return _literal(text)[1]


def parse_arguments(items: list[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split command-line words into ``(args, kwargs)``.

    A word that is a Python literal is a positional argument, even when it
    contains ``=`` (``"'a=b'"``); otherwise ``key=value`` is a keyword
    argument whose value is parsed like a word; anything else is a string.

    Raises:
        UsageError: an empty value (``key=``), a key that is not an
            identifier, a keyword given twice, or a word or value that starts
            like a literal but is not one (``[1,2``).
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in items:
        literal, value = _literal(item)
        if literal or "=" not in item:
            args.append(value)
            continue
        key, _, raw = item.partition("=")
        if not key.isidentifier():
            raise UsageError(
                f"argument {item!r}: {key!r} is not a keyword name; to pass a string that "
                f"contains '=', quote it as a Python literal, e.g. \"{item!r}\"")
        if not raw:
            raise UsageError(f"keyword argument {item!r} has no value; write {key}=VALUE "
                             f"(e.g. {key}=None, or {key}=\"''\" for an empty string)")
        if key in kwargs:
            raise UsageError(f"keyword argument {key!r} is given twice")
        kwargs[key] = parse_value(raw)
    return tuple(args), kwargs


def format_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(1, 'a', key=2)``, as Python would show the call."""
    words = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(words)})"


def jsonable(value: Any) -> Any:
    """``value`` made of JSON types.

    Lists and tuples become arrays, dicts objects (a key that is not a string
    becomes its repr); an object with a ``tolist()`` method - a NumPy array
    or scalar, a memoryview, an ``array.array`` - becomes what that returns
    (an array of numbers, nested by dimension); anything else JSON cannot
    hold (a set, bytes, your own objects) becomes its repr.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    tolist = getattr(type(value), "tolist", None)
    if callable(tolist):
        try:
            converted = value.tolist()
        except Exception:
            return repr(value)
        if converted is not value:
            return jsonable(converted)
    return repr(value)


def _dump_json(value: Any, out: TextIO = sys.stdout, indent: int | None = 2) -> None:
    print(json.dumps(jsonable(value), indent=indent), file=out, flush=True)


# -- formatting ---------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """``42s``, ``5m02s``, ``3h07m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _joined(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(dict.fromkeys(items)) or "-"


def _subscription_text(sub: dict[str, Any]) -> str:
    filters = []
    if sub.get("peers"):
        filters.append("from " + ", ".join(sub["peers"]))
    if sub.get("group"):
        filters.append(f"group {sub['group']}")
    if sub.get("hubs_only"):
        filters.append("hubs only")
    return str(sub.get("event")) + (f" ({'; '.join(filters)})" if filters else "")


# -- the command's own peer -----------------------------------------------------

def _peer(options: argparse.Namespace, **extra: Any) -> localnet.Peer:
    name = options.name or DEFAULT_NAME.format(pid=os.getpid())
    return localnet.Peer(name=name, directory=options.dir, **extra)


# -- commands -------------------------------------------------------------------

def _cmd_registry(options: argparse.Namespace) -> int:
    """``localnet registry``: run the registry in the foreground until SIGINT/SIGTERM."""
    from . import _registry

    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    directory = options.directory or options.dir
    argv = [] if directory is None else ["--directory", directory]
    return _registry.main(argv)


def _cmd_demo(options: argparse.Namespace) -> int:
    """``localnet demo``: a scene of peers in a private directory, then cleanup."""
    from . import _demo

    return _demo.main(pause=options.pause)


def _cmd_peers(options: argparse.Namespace) -> int:
    """``localnet peers``: the other live peers, as a table or a JSON list."""
    with _peer(options) as me:
        link = _transports.link(me)
        if link is not None:  # joined to other hosts: hear from their peers first
            link.wait_directory(5.0)
        found = localnet.peers(group=options.group, hubs_only=options.hubs)
        if options.json:
            _dump_json([d for d in (_describe(p) for p in found) if d is not None])
            return 0
        if not found:
            which = " matching the filters" if options.group or options.hubs else ""
            print(f"no live peers{which} in {me.directory}", flush=True)
            return 0
        now = time.time()
        rows = [["NAME", "HOST", "PID", "GROUP", "HUB", "CONNECTIONS", "SUBSCRIPTIONS",
                 "UPTIME"]]
        rows += [[p.name, p.host or "(this)", str(p.pid), p.group or "-",
                  "yes" if p.hub else "no",
                  _joined(p.connections), _joined(p.subscriptions),
                  format_duration(now - p.since)] for p in found]
        print(_table(rows), flush=True)
    return 0


def _describe(remote: localnet.RemotePeer) -> dict[str, Any] | None:
    """``info(remote).as_dict()`` plus uptime, or None when it left meanwhile."""
    try:
        described = localnet.info(remote).as_dict()
    except localnet.PeerNotFound:
        return None
    described["uptime"] = round(time.time() - described["since"], 3)
    return described


def _cmd_info(options: argparse.Namespace) -> int:
    """``localnet info PEER``: everything ``localnet.info(PEER)`` tells, or its JSON."""
    with _peer(options):
        described = localnet.info(options.peer).as_dict()
    if options.json:
        _dump_json(described)
        return 0
    now = time.time()
    subs = [_subscription_text(s) for s in described["subscriptions"]]
    fields = [
        ("name", described["name"]), ("pid", str(described["pid"])),
        ("user", described["user"] or "?"), ("executable", described["executable"] or "?"),
        ("argv", shlex.join(described["argv"]) or "-"), ("group", described["group"] or "-"),
        ("hub", "yes" if described["hub"] else "no"),
        ("connections", _joined(described["connections"])),
        ("events", _joined(described["events"])), ("subscriptions", _joined(subs)),
        ("started", f"{_clock(described['started'])} (process start, "
                    f"{format_duration(now - described['started'])} ago)"),
        ("since", f"{_clock(described['since'])} (live for "
                  f"{format_duration(now - described['since'])})"),
        ("address", described["address"]),
    ]
    print("\n".join(f"{key + ':':<15}{value}" for key, value in fields), flush=True)
    return 0


def _check_timeout(options: argparse.Namespace, unset: str) -> None:
    """Refuse a ``--timeout`` that is not a positive number of seconds."""
    value = options.timeout
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UsageError(f"--timeout must be a positive number of seconds, not {value:g} "
                         f"({unset})")


def _cmd_call(options: argparse.Namespace) -> int:
    """``localnet call PEER CONNECTION ARG...``: print the result, or the remote traceback."""
    _check_timeout(options, "leave it out to wait as long as the call takes")
    args, kwargs = parse_arguments(options.args)
    with _peer(options) as me:
        target = localnet.peer(options.peer)
        try:
            result = me.call(target, options.connection, args, kwargs, options.timeout)
        except localnet.UnknownConnection as exc:
            if (exc.peer, exc.connection) == (target.name, options.connection):
                raise  # not raised by the connection's code: the peer has no such connection
            return _remote_failure(exc, options)
        except Exception as exc:
            if not hasattr(exc, "remote_traceback"):
                raise
            return _remote_failure(exc, options)
    if options.json:
        _dump_json(result, indent=None)
    else:
        print(repr(result), flush=True)
    return 0


def _remote_failure(exc: BaseException, options: argparse.Namespace) -> int:
    """Print a remote exception's traceback and a summary line; exit status 1."""
    text = getattr(exc, "remote_traceback", "") or ""
    if text:
        print(text.rstrip(), file=sys.stderr)
    if isinstance(exc, localnet.RemoteError):
        type_name, message = exc.type_name, exc.message
    else:
        cls = type(exc)
        module = "" if cls.__module__ == "builtins" else cls.__module__ + "."
        type_name, message = module + cls.__qualname__, str(exc)
    print(f"{_PROG}: error: {options.connection}() in peer {options.peer!r} raised "
          f"{type_name}: {message}", file=sys.stderr, flush=True)
    return 1


def _cmd_emit(options: argparse.Namespace) -> int:
    """``localnet emit EVENT ARG...``: trigger an event and wait until it was handled."""
    if not options.event:
        raise UsageError("EVENT must be a non-empty event name")
    _check_timeout(options, "leave it out to wait 5 s")
    args, kwargs = parse_arguments(options.args)
    with _peer(options, group=options.group, hub=options.hub or None) as me:
        me.publish(options.event, args, kwargs)
        me.flush(options.timeout)
        counts = me.stats().published.get(options.event, localnet.EventCounts())
    if options.json:
        _dump_json({"event": options.event, "sent": counts.sent, "delivered": counts.delivered,
                    "dropped": counts.dropped, "failed": counts.failed}, indent=None)
        return 0
    line = f"{format_call(options.event, args, kwargs)}: delivered to {counts.delivered} " \
        f"subscriber{'' if counts.delivered == 1 else 's'}"
    if counts.dropped or counts.failed:
        line += f" (dropped {counts.dropped}, failed {counts.failed})"
    print(line, flush=True)
    return 0


class _Printer:
    """A subscription handler that prints each event; thread-safe, stops after ``count``."""

    def __init__(self, as_json: bool, count: int | None, done: threading.Event) -> None:
        self.as_json = as_json
        self.count = count
        self.done = done
        self.seen = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        context = localnet.current_event()
        publisher = context.publisher if context is not None else "?"
        event = context.event if context is not None else "?"
        now = time.time()
        with self._lock:
            if self.done.is_set():
                return
            try:
                self._print(now, publisher, event, args, kwargs)
            except OSError:  # stdout closed (``localnet listen ... | head -1``)
                self.done.set()
                return
            self.seen += 1
            if self.count is not None and self.seen >= self.count:
                self.done.set()

    def stop(self) -> bool:
        """Print nothing more; False when already done (``--count`` reached, a signal)."""
        with self._lock:
            if self.done.is_set():
                return False
            self.done.set()
            return True

    def _print(self, now: float, publisher: str, event: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
        if self.as_json:
            record = {"time": now, "publisher": publisher, "event": event,
                      "args": list(args), "kwargs": kwargs}
            line = json.dumps(jsonable(record))
        else:
            clock = datetime.datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")[:-3]
            line = f"{clock}  {publisher}  {format_call(event, args, kwargs)}"
        print(line, flush=True)


def _cmd_listen(options: argparse.Namespace) -> int:
    """``localnet listen EVENT...``: print events as they arrive.

    Until a signal (exit 0), ``--count`` events (exit 0), or ``--timeout``
    seconds: then exit 0 if ``--count`` events arrived, or, without
    ``--count``, at least one; else 1, with an error line saying how many.
    """
    if options.count is not None and options.count < 1:
        raise UsageError("--count must be at least 1")
    _check_timeout(options, "leave it out to listen until a signal or --count")
    if not all(options.events):
        raise UsageError("EVENT must be a non-empty event name")
    done = threading.Event()
    printer = _Printer(options.json, options.count, done)
    for name in dict.fromkeys(options.events):
        localnet.subscribe(name, peers=options.peer or None, group=options.group,
                           hubs_only=options.hubs)(printer)
    with _stop_on_signals(done), _peer(options) as me:
        print(f"listening for {', '.join(dict.fromkeys(options.events))} in {me.directory} "
              f"as {me.name}; Ctrl-C to stop", file=sys.stderr, flush=True)
        # Wake now and then: a signal that lands while the main thread waits
        # on a lock is handled only when it runs bytecode again.
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        timed_out = False
        while not done.wait(0.25 if deadline is None else
                            max(0.0, min(0.25, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = printer.stop()
                break
    if not timed_out or (options.count is None and printer.seen):
        return 0
    if options.count is None:
        return _fail(f"no event arrived within --timeout {options.timeout:g} s", 1)
    return _fail(f"{printer.seen} of {options.count} events arrived within "
                 f"--timeout {options.timeout:g} s", 1)


@contextlib.contextmanager
def _stop_on_signals(done: threading.Event) -> Iterator[None]:
    """Set ``done`` on SIGINT/SIGTERM while inside; restore the handlers afterwards."""
    previous = {signum: signal.signal(signum, lambda *_: done.set())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# -- the parser -------------------------------------------------------------------

_DESCRIPTION = """\
Find, call and watch the localnet peers of this machine: Python processes
that talk over Unix sockets in one runtime directory."""

_EPILOG = """\
examples:
  localnet peers                            who is there
  localnet info farm-2                      everything about one peer
  localnet call farm-2 render 7 quality=2   run render(7, quality=2) in farm-2
  localnet emit frame_done 7 path=/tmp/x    trigger an event
  localnet listen frame_done                print events as they arrive

Arguments of call and emit are Python literals (7, '7', [1, 2], None); other
words are strings, but one starting like a literal ([ ( { ' ") must be one;
key=value is a keyword argument. Errors print one
'localnet: error:' line; the exit status is 2 for usage errors, 1 for
failures. 'localnet COMMAND --help' tells more."""

def _common(*, name: bool = True) -> argparse.ArgumentParser:
    """Options accepted both before and after the command (``localnet --dir D peers``)."""
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command must survive the subparser.
    parent.add_argument("--dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="runtime directory (default: $LOCALNET_DIR, "
                        "$XDG_RUNTIME_DIR/localnet or /tmp/localnet-UID)")
    if name:
        parent.add_argument("--name", metavar="NAME", default=argparse.SUPPRESS,
                            help="name of this command's own peer (default: localnet-cli-PID)")
    return parent


def _command(commands: Any, name: str, run: Callable[[argparse.Namespace], int], help: str,
             description: str, network: bool = True) -> argparse.ArgumentParser:
    parents = [_common()] if network else []
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description, parents=parents)
    parser.set_defaults(run=run)
    return parser


def _add_call_options(parser: argparse.ArgumentParser, timeout: float | None,
                      timeout_help: str) -> None:
    parser.add_argument("args", nargs="*", default=[], metavar="ARG",
                        help="a Python literal or a string; key=value for a keyword argument")
    parser.add_argument("--timeout", type=float, default=timeout, metavar="S", help=timeout_help)
    parser.add_argument("--json", action="store_true",
                        help="print JSON, for scripts (NumPy arrays and scalars as what "
                        "tolist() returns; values JSON cannot hold, such as sets, as "
                        "their repr)")


def build_parser() -> argparse.ArgumentParser:
    """The ``localnet`` argument parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=_PROG, parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {localnet.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    peers = _command(commands, "peers", _cmd_peers, "list the live peers",
                     "List the other live peers of the runtime directory.")
    peers.add_argument("--group", metavar="G", help="only the peers of group G")
    peers.add_argument("--hubs", action="store_true", help="only hubs")
    peers.add_argument("--json", action="store_true", help="print a JSON list, for scripts")

    info = _command(commands, "info", _cmd_info, "describe one peer",
                    "Print everything localnet.info(PEER) tells about a peer.")
    info.add_argument("peer", metavar="PEER")
    info.add_argument("--json", action="store_true", help="print a JSON object, for scripts")

    call = _command(commands, "call", _cmd_call, "call a peer's connection",
                    "Run CONNECTION(ARG...) in PEER and print the result's repr (or JSON). "
                    "ARGs are Python literals (7, 'a', [1, 2], None), other words are "
                    "strings (a word starting with [ ( { ' \" must be a literal: quote it "
                    "as one, \"'[x'\", to send it as a string), key=value is a keyword "
                    "argument; put '--' before arguments "
                    "that start with '-'. A remote exception prints its remote traceback "
                    "and exits with status 1.")
    call.add_argument("peer", metavar="PEER")
    call.add_argument("connection", metavar="CONNECTION")
    _add_call_options(call, None, "give up after S seconds (default: wait)")

    emit = _command(commands, "emit", _cmd_emit, "trigger an event",
                    "Publish EVENT(ARG...) to every matching subscriber, wait until their "
                    "handlers ran, and say how many got it. ARGs are parsed as for 'call'.")
    emit.add_argument("event", metavar="EVENT")
    _add_call_options(emit, 5.0, "wait at most S seconds for the handlers (default 5)")
    emit.add_argument("--group", metavar="G", help="publish as a peer of group G")
    emit.add_argument("--hub", action="store_true", help="publish as a hub")

    listen = _command(commands, "listen", _cmd_listen, "print events as they arrive",
                      "Subscribe to each EVENT and print one line per event: time, "
                      "publisher, event and arguments. Runs until SIGINT/SIGTERM, --count "
                      "events or --timeout seconds; says 'listening for ...' on stderr once "
                      "subscribed. Exit status 0, except when --timeout ran out before "
                      "--count events arrived (without --count: before any event): 1.")
    listen.add_argument("events", nargs="+", metavar="EVENT")
    listen.add_argument("--count", type=int, metavar="N", help="exit after N events")
    listen.add_argument("--timeout", type=float, metavar="S",
                        help="exit after S seconds (status 1 if --count events, or without "
                        "--count any event, had not arrived by then)")
    listen.add_argument("--json", action="store_true", help="one JSON object per line")
    listen.add_argument("--peer", action="append", metavar="NAME",
                        help="only events from this peer (repeatable)")
    listen.add_argument("--group", metavar="G", help="only events from peers of group G")
    listen.add_argument("--hubs", action="store_true", help="only events from hubs")

    registry = commands.add_parser(
        "registry", help="run the registry in the foreground", parents=[_common(name=False)],
        description="Run the registry of the runtime directory in the foreground, logging "
        "to stderr, until SIGINT/SIGTERM.")
    registry.add_argument("--directory", help=argparse.SUPPRESS)  # the older spelling of --dir
    registry.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    registry.set_defaults(run=_cmd_registry)

    demo = commands.add_parser("demo", help="watch a small scene of peers",
                               description="Start a hub and two workers in subprocesses, "
                               "call them, publish events, kill a worker, and clean up.")
    demo.add_argument("--pause", type=float, default=0.4,
                      help="seconds between scenes (default 0.4)")
    demo.set_defaults(run=_cmd_demo)
    return parser


# -- errors -------------------------------------------------------------------------

def _hint(exc: BaseException) -> str:
    """The error message and what to try next."""
    if isinstance(exc, localnet.PeerNotFound):
        return f"{exc}; run 'localnet peers' to see who is there"
    if isinstance(exc, localnet.UnknownConnection):
        return f"{exc}; see 'localnet info {exc.peer}'"
    if isinstance(exc, localnet.NameTaken):
        return f"{exc} (use --name)"
    if isinstance(exc, localnet.RegistryUnavailable):
        return (f"{exc}; check the runtime directory (--dir, LOCALNET_DIR), or run "
                "'localnet registry' in another terminal to see why it does not start")
    if isinstance(exc, localnet.Timeout):
        return f"{exc}; try a longer --timeout"
    return str(exc)


def _fail(message: str, status: int) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


def _configure_logging() -> None:
    """Library errors on stderr; everything with ``LOCALNET_DEBUG``.

    Not warnings: a closing subscriber logs one about its own event channel.
    """
    debug = bool(os.environ.get("LOCALNET_DEBUG"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, stream=sys.stderr,
                        format=f"{_PROG}: %(levelname)s: %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    options = parser.parse_args(argv)
    for key in ("dir", "name"):
        if not hasattr(options, key):
            setattr(options, key, None)
    if options.run not in (_cmd_registry, _cmd_demo):
        _configure_logging()
    try:
        return int(options.run(options))
    except UsageError as exc:
        return _fail(str(exc), 2)
    except localnet.LocalnetError as exc:
        return _fail(_hint(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # ``localnet peers | head -1``: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
