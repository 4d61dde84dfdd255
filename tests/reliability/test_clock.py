"""A wall-clock step must not make live peers look dead.

A process's creation time as psutil gives it is the kernel's start time in
clock ticks plus the boot time, and the kernel derives the boot time from
the wall clock: an NTP step, a resumed laptop or a restored VM moves every
process's creation time at once.  The test simulates such steps at the
boundary where localnet used to read them: a ``sitecustomize`` loaded by
every child (the registry included) adds one second to psutil's boot time
and creation times 0.7 s after the process began, and another second at
1.4 s.  Peers must stay listed, callable and reachable by events, and their
names must stay theirs, throughout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import registry_pid

import localnet

pytestmark = pytest.mark.slow

STEPPED_CLOCK = """
import time
_T0 = time.monotonic()

def _offset():
    return float(min(int((time.monotonic() - _T0) / 0.7), 2))

import psutil
_create_time = psutil.Process.create_time
_boot_time = psutil.boot_time
psutil.Process.create_time = lambda self: _create_time(self) + _offset()
psutil.boot_time = lambda: _boot_time() + _offset()
"""

STEADY = """
seen = []

@localnet.connect()
def echo(x):
    return x

@localnet.connect()
def count():
    return len(seen)

@localnet.subscribe("tick")
def on_tick(n):
    seen.append(n)

localnet.serve_forever(localnet.Peer(name="steady"), ready=lambda: say("READY"))
"""


def test_a_wall_clock_step_does_not_make_live_peers_look_dead(spawn, runtime_dir: Path,
                                                              tmp_path: Path) -> None:
    site = tmp_path / "stepped-clock"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STEPPED_CLOCK)
    root = str(Path(__file__).resolve().parents[2])
    stepped = {"PYTHONPATH": os.pathsep.join([str(site), root])}
    spawn(STEADY, **stepped)
    registry = registry_pid(runtime_dir)
    assert registry is not None

    @localnet.event("tick")
    def tick(*args, **kwargs):
        return args, kwargs

    with localnet.Peer(name="observer") as me:
        # Watch for 3 s: both steps happen in every child within 1.4 s of its
        # start, and the registry sweeps liveness every 0.5 s.
        sent = 0
        window_end = time.monotonic() + 3.0
        while time.monotonic() < window_end:
            assert [p.name for p in localnet.peers()] == ["steady"]
            assert localnet.peer("steady").echo(sent) == sent
            tick(sent)
            sent += 1
        me.flush(10)
        assert localnet.peer("steady").count() == sent
        assert me.stats().subscribers["steady"].delivered == sent
        # The name is still held by its live owner, stepped clock or not.
        late = spawn("""
            try:
                localnet.Peer(name="steady").start()
                say("TOOK IT")
            except localnet.NameTaken:
                say("TAKEN")
        """, ready=None, **stepped)
        assert late.expect("T") == "TAKEN"
        assert late.wait_exit() == 0
    assert registry_pid(runtime_dir) == registry  # the same registry throughout
