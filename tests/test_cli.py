"""The ``localnet`` command line, run as a user runs it: ``python -m localnet ...``.

Every command runs in a subprocess against real peers; long-running ones
(``listen``, ``registry``) are ended by their pid.  Readiness is a printed
line, never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import PeerProcess, end_pid, registry_pid, wait_until

from localnet._cli import parse_arguments

SERVER = """
@localnet.connect()
def echo(x):
    return x

@localnet.connect()
def add(a, b=0):
    return a + b

@localnet.connect()
def show(*args, **kwargs):
    return {"args": args, "kwargs": kwargs}

@localnet.connect()
def fail(message):
    raise ValueError(message)

@localnet.connect()
def slow(seconds):
    time.sleep(seconds)

@localnet.connect()
def odd():
    return {1, 2}

@localnet.subscribe("tick")
def on_tick(*args, **kwargs):
    pass

peer = localnet.Peer(name="server", group="render").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

HUB = """
@localnet.connect()
def status():
    return "ok"

peer = localnet.Peer(name="hub", hub=True).start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""

COMMANDS = ["peers", "info", "call", "emit", "listen", "registry", "demo"]


class Command(PeerProcess):
    """A long-running command: stdout lines on a queue, stderr kept, ended by its pid."""

    def __init__(self, words: list[str], env: dict[str, str]) -> None:
        self._start([sys.executable, "-m", "localnet", *words], env, None, subprocess.DEVNULL)

    def expect_stderr(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: any(text in line for line in self.stderr), timeout,
                   what=f"{text!r} on the stderr of {self.pid}")


@pytest.fixture
def run(spawn):
    """Run one command to completion (bounded) in the test's runtime directory."""

    def run(*words: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "localnet", *words], env=spawn.env(),
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def start(spawn):
    """Start a long-running command; the spawn fixture ends it by pid."""

    def start(*words: str) -> Command:
        command = Command(list(words), spawn.env())
        spawn.children.append(command)
        return command

    return start


@pytest.fixture
def server(spawn):
    return spawn(SERVER)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one 'localnet: error:' line and no traceback."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localnet: error: "), result.stderr
    return lines[0]


# -- help and argument parsing ------------------------------------------------------

@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(run, command: str | None) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: localnet {command or ''}".rstrip())


@pytest.mark.parametrize(("words", "args", "kwargs"), [
    (["7", "-2.5", "None", "True"], (7, -2.5, None, True), {}),
    (["hello", "hello world", "'7'"], ("hello", "hello world", "7"), {}),
    (["[1, (2, 3)]", "{'a': {1}}"], ([1, (2, 3)], {"a": {1}}), {}),
    (["frame=7", "path=/tmp/7.exr", "flag=None"], (), {"frame": 7, "path": "/tmp/7.exr",
                                                       "flag": None}),
    (["'a=b'", "x==1", "k=a=b"], ("a=b",), {"x": "=1", "k": "a=b"}),
    (["'[1,2'", "k='(x'", "1.2.3", "a]"], ("[1,2", "1.2.3", "a]"), {"k": "(x"}),
])
def test_arguments_are_literals_strings_and_keywords(words, args, kwargs) -> None:
    assert parse_arguments(words) == (args, kwargs)


@pytest.mark.parametrize(("word", "message"), [
    ("key=", "has no value"),
    ("a b=1", "'a b' is not a keyword name"),
    ("=1", "'' is not a keyword name"),
    ("1x=2", "'1x' is not a keyword name"),
    # A typo in a literal used to be sent on as a string.
    ("[1,2", "'[1,2' starts like a Python literal but is not one ('[' was never closed); "
             "fix it, or to pass it as a string quote it as one: \"'[1,2'\""),
    ("k=[1,2", "'[1,2' starts like a Python literal"),
    ("{'a': 1", "starts like a Python literal"),
    ("'abc", "starts like a Python literal"),
    ("(os.getcwd())", "starts like a Python literal but is not one (not a plain value)"),
])
def test_malformed_argument_is_a_usage_error(run, word: str, message: str) -> None:
    result = run("call", "server", "echo", word)
    assert result.returncode == 2
    assert message in one_error_line(result)


def test_keyword_given_twice_is_a_usage_error(run) -> None:
    result = run("emit", "tick", "x=1", "x=2")
    assert result.returncode == 2
    assert "'x' is given twice" in one_error_line(result)


# -- peers and info -------------------------------------------------------------------

def test_peers_prints_a_table_of_the_others(spawn, run, server) -> None:
    hub = spawn(HUB)
    result = run("peers")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "HOST", "PID", "GROUP", "HUB", "CONNECTIONS",
                              "SUBSCRIPTIONS", "UPTIME"]
    assert [row.split()[:5] for row in rows] == [
        ["hub", "(this)", str(hub.pid), "-", "yes"],
        ["server", "(this)", str(server.pid), "render", "no"]]
    assert "add, echo, fail, odd, show, slow" in rows[1] and "tick" in rows[1]
    assert re.search(r"\d+s$", rows[0])
    assert "localnet-cli" not in result.stdout  # its own peer is not listed


def test_peers_filters_and_json(spawn, run, server) -> None:
    spawn(HUB)
    assert [r.split()[0] for r in run("peers", "--group", "render").stdout.splitlines()[1:]] \
        == ["server"]
    assert [r.split()[0] for r in run("peers", "--hubs").stdout.splitlines()[1:]] == ["hub"]
    listed = json.loads(run("peers", "--json").stdout)
    assert [p["name"] for p in listed] == ["hub", "server"]
    described = listed[1]
    assert described["pid"] == server.pid and described["group"] == "render"
    assert described["connections"] == ["add", "echo", "fail", "odd", "show", "slow"]
    assert [s["event"] for s in described["subscriptions"]] == ["tick"]
    assert described["uptime"] >= 0 and described["hub"] is False


def test_peers_with_no_registry_starts_one_and_says_nobody_is_there(run, runtime_dir) -> None:
    result = run("peers")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"no live peers in {runtime_dir}"
    assert json.loads(run("peers", "--json").stdout) == []


def test_info_prints_everything_info_returns(run, server) -> None:
    result = run("info", "server")
    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in result.stdout.splitlines())
    assert fields["name"] == "server" and fields["pid"] == str(server.pid)
    assert fields["group"] == "render" and fields["hub"] == "no"
    assert fields["connections"] == "add, echo, fail, odd, show, slow"
    assert fields["subscriptions"] == "tick"
    assert {"user", "executable", "argv", "events", "started", "since", "address"} <= set(fields)
    described = json.loads(run("info", "server", "--json").stdout)
    assert described["name"] == "server" and described["pid"] == server.pid
    assert described["address"] == fields["address"]


def test_unknown_peer_is_one_clear_line(run, server) -> None:
    for words in (["info", "ghost"], ["call", "ghost", "echo", "1"]):
        result = run(*words)
        assert result.returncode == 1
        line = one_error_line(result)
        assert "no live peer named 'ghost'" in line and "localnet peers" in line


# -- call -------------------------------------------------------------------------------

def test_call_prints_the_repr_of_the_result(run, server) -> None:
    assert run("call", "server", "add", "2", "b=5").stdout == "7\n"
    assert run("call", "server", "echo", "hello").stdout == "'hello'\n"
    result = run("call", "server", "show", "1", "'2'", "word", "[3, 4]", "key=None", "on=True")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "{'args': (1, '2', 'word', [3, 4]), 'kwargs': {'key': None, " \
        "'on': True}}\n"
    assert run("call", "--timeout", "5", "server", "add", "--", "-5", "-6").stdout == "-11\n"


def test_call_json_output_parses(run, server) -> None:
    result = run("call", "server", "echo", "{'a': (1, 2), 'b': None}", "--json")
    assert json.loads(result.stdout) == {"a": [1, 2], "b": None}
    assert json.loads(run("call", "server", "odd", "--json").stdout) == "{1, 2}"  # via repr


def test_remote_exception_prints_its_traceback_and_exits_1(run, server) -> None:
    result = run("call", "server", "fail", "bad frame 7")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert ", in fail" in result.stderr and "ValueError: bad frame 7" in lines
    assert lines[-1] == "localnet: error: fail() in peer 'server' raised ValueError: bad frame 7"


def test_unknown_connection_lists_what_the_peer_offers(run, server) -> None:
    result = run("call", "server", "nope")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "offers no connection 'nope'" in line and "echo" in line
    assert "localnet info server" in line


@pytest.mark.parametrize("command", [["call", "server", "echo", "1"], ["emit", "tick"],
                                     ["listen", "tick"]], ids=["call", "emit", "listen"])
@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_timeout_must_be_a_positive_number(run, command: list[str], value: str) -> None:
    result = run(*command, "--timeout", value)
    assert result.returncode == 2
    assert "--timeout must be a positive number of seconds" in one_error_line(result)


ARRAYS = """
import numpy as np

@localnet.connect()
def matrix():
    return {"m": np.arange(6).reshape(2, 3), "mean": np.float32(0.5), "n": np.int64(7),
            "flags": np.array([True, False])}

peer = localnet.Peer(name="arrays").start()
localnet.serve_forever(peer, ready=lambda: say("READY"))
"""


def test_call_json_turns_numpy_values_into_json_numbers(spawn, run) -> None:
    spawn(ARRAYS)
    result = run("call", "arrays", "matrix", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"m": [[0, 1, 2], [3, 4, 5]], "mean": 0.5, "n": 7,
                                         "flags": [True, False]}


def test_wrong_arity_shows_no_localnet_frames(run, server) -> None:
    result = run("call", "server", "add", "1", "2", "3")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines == [
        "TypeError: add() takes from 1 to 2 positional arguments but 3 were given",
        "localnet: error: add() in peer 'server' raised TypeError: add() takes from 1 to 2 "
        "positional arguments but 3 were given"], result.stderr


def test_user_traceback_starts_at_the_users_code() -> None:
    # What the serving side sends once it uses it (see the test above): a
    # function compiled under localnet's own directory stands for run_call,
    # which catches what the connection raised.
    from localnet import _tracebacks

    serving: dict[str, Any] = {}
    exec(compile("def run_call(func, *args):\n"
                 "    try:\n"
                 "        return func(*args)\n"
                 "    except Exception as exc:\n"
                 "        return exc\n",
                 _tracebacks._PACKAGE + "_serving_stand_in.py", "exec"), serving)

    def add(a, b=0):
        return a + b

    def fail(message):
        raise ValueError(message)

    wrong = serving["run_call"](add, 1, 2, 3)
    assert _tracebacks.user_traceback(wrong) == \
        "TypeError: test_user_traceback_starts_at_the_users_code.<locals>.add() takes from 1 " \
        "to 2 positional arguments but 3 were given\n"
    text = _tracebacks.user_traceback(serving["run_call"](fail, "bad frame 7"))
    assert text.startswith("Traceback (most recent call last):\n  File ")
    assert ", in fail\n" in text and "run_call" not in text
    assert text.endswith("ValueError: bad frame 7\n")


def test_call_timeout_is_a_clear_failure(run, server) -> None:
    result = run("call", "server", "slow", "5", "--timeout", "0.2")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "did not answer" in line and "--timeout" in line


def test_taken_name_and_unsafe_directory_are_clear_failures(run, server, runtime_dir) -> None:
    result = run("--name", "server", "peers")
    assert result.returncode == 1
    assert "'server' is taken" in one_error_line(result)
    unsafe = runtime_dir / "shared"
    unsafe.mkdir(mode=0o700)
    unsafe.chmod(0o777)
    result = run("peers", "--dir", str(unsafe))
    assert result.returncode == 1
    assert "writable by group or others" in one_error_line(result)
    assert not list(unsafe.iterdir())


# -- emit and listen --------------------------------------------------------------------

def test_listen_prints_events_emitted_from_the_shell(run, start, server) -> None:
    listener = start("listen", "tick", "other")
    listener.expect_stderr("listening for tick, other")
    result = run("emit", "tick", "1", "x=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tick(1, x=2): delivered to 2 subscribers\n"  # server and listener
    assert run("emit", "other", "[1, 2]").stdout == "other([1, 2]): delivered to 1 subscriber\n"
    first, second = listener.expect(""), listener.expect("")
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}  localnet-cli-\d+  tick\(1, x=2\)", first)
    assert second.endswith("  other([1, 2])")
    listener.signal(signal.SIGTERM)
    assert listener.wait_exit() == 0


def test_listen_json_exits_after_count_events(run, start) -> None:
    # The emitter's counts are not checked here: the listener leaves right after
    # the last event (see the report on acknowledgements lost at close()).
    listener = start("listen", "tick", "--json", "--count", "2")
    listener.expect_stderr("listening for tick")
    assert run("emit", "--name", "shell", "tick", "{1, 2}", "when=None").returncode == 0
    assert run("emit", "tick", "2").returncode == 0
    record = json.loads(listener.expect("{"))
    assert record["publisher"] == "shell" and record["event"] == "tick"
    assert record["args"] == ["{1, 2}"] and record["kwargs"] == {"when": None}
    assert isinstance(record["time"], float)
    assert json.loads(listener.expect("{"))["args"] == [2]
    assert listener.wait_exit() == 0
    assert listener.lines.empty()


def test_listen_filters_publishers(run, start) -> None:
    listener = start("listen", "tick", "--hubs")
    listener.expect_stderr("listening for tick")
    assert run("emit", "tick", "1").stdout == "tick(1): delivered to 0 subscribers\n"
    assert run("emit", "--hub", "tick", "2").stdout == "tick(2): delivered to 1 subscriber\n"
    assert listener.expect("").endswith("  tick(2)")
    listener.signal(signal.SIGINT)
    assert listener.wait_exit() == 0


def test_emit_json_counts(run, server) -> None:
    result = run("emit", "tick", "--json")
    assert json.loads(result.stdout) == {"event": "tick", "sent": 1, "delivered": 1,
                                         "dropped": 0, "failed": 0}


def test_listen_timeout_bounds_a_listener_that_hears_nothing(run) -> None:
    result = run("listen", "tick", "--peer", "nobody", "--timeout", "0.5")
    assert result.returncode == 1
    listening, error = result.stderr.splitlines()
    assert listening.startswith("listening for tick")
    assert error == "localnet: error: no event arrived within --timeout 0.5 s"


def test_listen_timeout_exit_status_says_whether_enough_events_came(run, start) -> None:
    some = start("listen", "tick", "--timeout", "6")
    counted = start("listen", "tick", "--timeout", "6", "--count", "3")
    some.expect_stderr("listening for tick")
    counted.expect_stderr("listening for tick")
    assert run("emit", "tick", "1").stdout == "tick(1): delivered to 2 subscribers\n"
    assert some.expect("").endswith("  tick(1)") and counted.expect("").endswith("  tick(1)")
    assert some.wait_exit(30) == 0  # the time ran out after an event: a normal end
    assert counted.wait_exit(30) == 1
    counted.expect_stderr("localnet: error: 1 of 3 events arrived within --timeout 6 s")


def test_listen_count_must_be_positive(run) -> None:
    result = run("listen", "tick", "--count", "0")
    assert result.returncode == 2
    assert "--count" in one_error_line(result)


# -- the runtime directory, the registry, the demo ---------------------------------------

def test_dir_option_before_or_after_the_command(run, runtime_dir: Path) -> None:
    other = runtime_dir / "other"
    try:
        for words in (["--dir", str(other), "peers"], ["peers", "--dir", str(other)]):
            result = run(*words)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"no live peers in {other}"
    finally:
        pid = registry_pid(other)
        if pid is not None:
            end_pid(pid)
    assert registry_pid(runtime_dir) is None  # the test's own directory was not used


def test_registry_command_serves_the_given_directory(run, start, runtime_dir: Path) -> None:
    registry = start("registry", "--dir", str(runtime_dir))
    wait_until(lambda: registry_pid(runtime_dir) == registry.pid, what="the registry to serve")
    assert run("peers").returncode == 0
    assert registry_pid(runtime_dir) == registry.pid  # used, not replaced
    registry.signal(signal.SIGINT)
    assert registry.wait_exit() == 0


def _processes_using(directory: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if directory in " ".join(proc.cmdline()) or \
                    proc.environ().get("LOCALNET_DIR") == directory:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_demo_runs_to_the_end_and_leaves_nothing_behind(run) -> None:
    result = run("demo", "--pause", "0", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for scene in ("1. Starting three peers", "2. Discovery", "3. Remote calls", "4. Events",
                  "5. Killing worker-2", "6. Errors travel too", "Done:"):
        assert scene in out
    assert "received frame_done(frame=1" in out and "raises PeerNotFound" in out
    directory = re.search(r"directory at (\S+)", out)
    assert directory is not None and "localnet-demo-" in directory[1]
    assert not os.path.exists(directory[1])
    assert _processes_using(directory[1]) == []
