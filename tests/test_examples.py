"""The scripts in examples/, run the way their headers tell a user to run them.

Serving roles run as child processes until the test ends them by pid;
client roles run to completion under a timeout.  Readiness is a printed
line, never a sleep.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PeerProcess, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class Program(PeerProcess):
    """A long-running program: stdout lines on a queue, stderr kept, ended by its pid."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self._start(argv, env, EXAMPLES.parent, subprocess.DEVNULL)


def _argv(script: str, *args: str) -> list[str]:
    if script == "localnet":
        return [sys.executable, "-m", "localnet", *args]
    return [sys.executable, str(EXAMPLES / script), *args]


@pytest.fixture
def run(spawn):
    """Run an example (or the localnet command) to completion; returns (status, stdout)."""

    def run(script: str, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
        result = subprocess.run(_argv(script, *args), env=spawn.env(), cwd=EXAMPLES.parent,
                                capture_output=True, text=True, timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    return run


@pytest.fixture
def start(spawn):
    """Start a serving example and wait for its ready line; ended by pid after the test."""

    def start(script: str, *args: str, ready: str | None) -> Program:
        program = Program(_argv(script, *args), spawn.env())
        spawn.children.append(program)
        if ready is not None:
            program.expect(ready)
        return program

    return start


def test_simple_connection(run, start) -> None:
    server = start("simple_connection.py", "serve", ready="serving greet and add as "
                   "'simple-server'; Ctrl-C to stop")
    status, out, err = run("simple_connection.py", "call", "--count", "2")
    assert status == 0, err
    assert out.splitlines() == [
        f"greet('Ada') -> 'hello Ada, from simple-server (pid {server.pid})'",
        f"greet('Ada #2') -> 'hello Ada #2, from simple-server (pid {server.pid})'",
        "add(2, 3) -> 5",
        "add(2, b=40) -> 42",
    ]
    assert server.expect("greet(") == "greet('Ada') called"
    status, out, _ = run("localnet", "call", "simple-server", "greet", "Ada")
    assert out == f"'hello Ada, from simple-server (pid {server.pid})'\n"


def test_simple_connection_caller_without_server_says_what_to_do(run) -> None:
    status, out, err = run("simple_connection.py", "call")
    assert status == 1
    assert "serve' first" in err and "Traceback" not in err


def test_hub_subscription(run, start) -> None:
    listener = start("hub_subscription.py", "listen", "--count", "3",
                     ready="listening for tick from hubs only")
    assert run("localnet", "emit", "tick", "99")[1] == "tick(99): delivered to 0 subscribers\n"
    assert run("localnet", "emit", "--hub", "tick", "98")[1] == \
        "tick(98): delivered to 1 subscriber\n"
    assert re.fullmatch(r"tick 98 from localnet-cli-\d+ \(hub: True\)", listener.expect("tick"))
    hub = start("hub_subscription.py", "hub", "--interval", "0.05", ready="hub 'clock-hub' "
                "publishing tick every 0.05 s")
    assert listener.expect("tick") == "tick 1 from clock-hub (hub: True)"
    assert listener.expect("tick") == "tick 2 from clock-hub (hub: True)"
    assert listener.expect("received") == "received 3 ticks"
    assert listener.wait_exit() == 0
    assert hub.expect("published tick 2") == "published tick 2"
    assert hub.stop() == 0  # SIGTERM: the hub leaves cleanly


def test_hub_with_a_count_finishes_on_its_own(run, start) -> None:
    listener = start("hub_subscription.py", "listen", ready="listening for tick")
    status, out, err = run("hub_subscription.py", "hub", "--count", "3", "--interval", "0.01")
    assert status == 0, err
    assert out.splitlines()[1:4] == ["published tick 1", "published tick 2", "published tick 3"]
    assert out.splitlines()[-1] == "done: 3 ticks published, 3 handled by subscribers"
    assert [listener.expect("tick") for _ in range(3)] == [
        f"tick {n} from clock-hub (hub: True)" for n in (1, 2, 3)]


def test_tagged_connections(run, start) -> None:
    v2 = start("tagged_connections.py", "v2", ready="app-v2 offers 'render' (its function "
               "render)")
    status, out, err = run("tagged_connections.py", "v1", "--count", "2")
    assert status == 0, err
    assert out.splitlines() == [
        "app-v1 offers 'render' (its function render_frame)",
        "render_frame(7)           here   -> 'v1 rendered frame 7'",
        "render_frame(7, peer=...) app-v2 -> 'v2 rendered frame 7 at quality 1'",
        "render_frame(8, peer=...) app-v2 -> 'v2 rendered frame 8 at quality 1'",
    ]
    assert v2.expect("render(") == "render(7, quality=1) called"
    assert "connections:   render" in run("localnet", "info", "app-v2")[1]


def test_numpy_array(run, start) -> None:
    pytest.importorskip("numpy")
    server = start("numpy_array.py", "serve", ready="serving checksum as 'array-server'")
    status, out, err = run("numpy_array.py", "send", "--mib", "16", "--count", "2")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "sending a float64 array of shape (2097152,), 16.0 MiB"
    assert lines.count("checksum matches") == 2
    assert re.match(r"array-server: shape \(2097152,\), float64, sha256 [0-9a-f]{12}\.\.\.",
                    lines[1])
    assert server.expect("checksum of").startswith("checksum of float64 array (2097152,)")


def test_worker_pool(run, start) -> None:
    workers = [start("worker_pool.py", "worker", ready="worker 'worker-") for _ in range(3)]
    status, out, err = run("worker_pool.py", "drive", "--items", "30")
    assert status == 0, err
    lines = out.splitlines()
    names = sorted(f"worker-{w.pid}" for w in workers)
    assert lines[0] == f"3 workers: {', '.join(names)}"
    assert re.fullmatch(r"30 items done in \d+\.\d\d s", lines[1])
    counts = [re.fullmatch(r"  (worker-\d+): (\d+) items?", line) for line in lines[2:-1]]
    assert all(counts) and sum(int(m[2]) for m in counts if m) == 30
    assert lines[-1] == f"sum of squares: {sum(i * i for i in range(30))}"


def test_worker_pool_survives_a_dying_worker(run, start, runtime_dir) -> None:
    doomed = start("worker_pool.py", "worker", "--delay", "0.02", ready="worker 'worker-")
    start("worker_pool.py", "worker", "--delay", "0.02", ready="worker 'worker-")
    driver = start("worker_pool.py", "drive", "--items", "60", ready="2 workers")
    doomed.expect("work(")
    doomed.kill9()
    assert driver.expect("sum of squares") == f"sum of squares: {sum(i * i for i in range(60))}"
    assert driver.wait_exit() == 0
    wait_until(lambda: not list(runtime_dir.glob(f"p-{doomed.pid}-*.sock")),
               what="the registry to remove the dead worker's socket")


def test_with_peer_alone(run) -> None:
    status, out, err = run("with_peer.py")
    assert status == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"this is <Peer 'with_peer-(\d+)' pid=\1 \[RUNNING\]>", lines[0])
    assert lines[1:] == ["no other peers", "no peer offers greet",
                         "script_done delivered to 0 subscriber(s)"]


def test_with_peer_calls_and_publishes(run, start) -> None:
    server = start("simple_connection.py", "serve", ready="serving")
    listener = start("localnet", "listen", "script_done", ready=None)
    wait_until(lambda: any("listening for script_done" in line for line in listener.stderr),
               what="the listener to subscribe")
    status, out, err = run("with_peer.py")
    assert status == 0, err
    assert "other peers:" in out and re.search(r"  simple-server\s+pid \d+\s+connections: "
                                               r"add, greet", out)
    assert f"simple-server.greet('with_peer') -> 'hello with_peer, from simple-server " \
        f"(pid {server.pid})'" in out
    assert out.splitlines()[-1] == "script_done delivered to 1 subscriber(s)"
    assert re.search(r"  script_done\('with_peer-\d+', ok=True\)$", listener.expect(""))
    assert listener.stop() == 0
