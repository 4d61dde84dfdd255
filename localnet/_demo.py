"""``localnet demo``: a small scene of peers, to watch calls and events flow.

Three child processes join a private runtime directory: a hub that
publishes ``frame_done`` events and two workers that offer ``render`` and
subscribe to the hub's events.  This process (the "director") lists them,
calls them, makes the hub publish, kills one worker with SIGKILL and shows
it pruned, then ends every process it started, by pid, also on Ctrl-C.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import IO

import localnet

WORKER = """
import os, sys, localnet

NAME = sys.argv[1]

@localnet.connect()
def render(frame, quality=1):
    return f"frame {frame} at quality {quality}, rendered by {NAME} (pid {os.getpid()})"

@localnet.subscribe("frame_done", hubs_only=True)
def on_frame_done(frame, path=None):
    print(f"received frame_done(frame={frame}, path={path!r})", flush=True)

peer = localnet.Peer(name=NAME, group="render").start()
localnet.serve_forever(peer, ready=lambda: print("READY", flush=True))
"""

HUB = """
import localnet

@localnet.event("frame_done")
def frame_done(*args, **kwargs):
    return args, kwargs

@localnet.connect()
def finish(frame):
    frame_done(frame, path=f"/renders/{frame:04d}.exr")
    return f"published frame_done for frame {frame}"

@localnet.connect()
def deliveries():
    peer.flush(5)
    return {name: (c.sent, c.delivered, c.failed) for name, c in peer.stats().subscribers.items()}

peer = localnet.Peer(name="hub", hub=True).start()
localnet.serve_forever(peer, ready=lambda: print("READY", flush=True))
"""


class _Child:
    def __init__(self, label: str, code: str, args: list[str], env: dict[str, str],
                 lines: queue.Queue[tuple[str, str]]) -> None:
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", code, *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._lines = lines
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put((self.label, line.rstrip("\n")))

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Demo:
    """The director of the scene; ``run()`` returns the exit status."""

    def __init__(self, out: IO[str] = sys.stdout, pause: float = 0.4) -> None:
        self.out = out
        self.pause = pause
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.children: dict[str, _Child] = {}
        self.unmatched: dict[str, list[str]] = {}
        self.directory = Path(tempfile.mkdtemp(prefix="localnet-demo-"))

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _wait_for(self, label: str, prefix: str, timeout: float = 15.0) -> str:
        """Relay children's lines until ``label`` has printed a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            pending = self.unmatched.setdefault(label, [])
            for i, line in enumerate(pending):
                if line.startswith(prefix):
                    del pending[: i + 1]
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise localnet.Timeout(f"{label} did not print {prefix!r} within {timeout:g} s")
            try:
                who, line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line != "READY":
                self.say(f"    [{who}] {line}")
            self.unmatched.setdefault(who, []).append(line)

    def _beat(self) -> None:
        time.sleep(self.pause)  # pacing for a human reader, not synchronisation

    def run(self) -> int:
        env = dict(os.environ, LOCALNET_DIR=str(self.directory))
        for key in ("LOCALNET_NAME", "LOCALNET_GROUP", "LOCALNET_HUB"):
            env.pop(key, None)
        try:
            self._scene(env)
            return 0
        except KeyboardInterrupt:
            self.say("\ninterrupted; cleaning up")
            return 130
        finally:
            self._cleanup()

    def _scene(self, env: dict[str, str]) -> None:
        self.say(f"localnet demo: a private runtime directory at {self.directory}\n")
        self.say("1. Starting three peers as subprocesses: a hub and two workers")
        self.children["hub"] = _Child("hub", textwrap.dedent(HUB), [], env, self.lines)
        for name in ("worker-1", "worker-2"):
            self.children[name] = _Child(name, textwrap.dedent(WORKER), [name], env, self.lines)
        for label in self.children:
            self._wait_for(label, "READY")
        with localnet.Peer(name="director", directory=self.directory):
            self._beat()
            self.say("\n2. Discovery through the registry: localnet.peers()")
            for p in localnet.peers():
                role = "hub" if p.hub else "worker"
                self.say(f"    {p.name:<9} pid {p.pid:<7} {role:<6} group={p.group!s:<7} "
                         f"connections={p.connections}")
            self._beat()
            self.say("\n3. Remote calls: render(frame, peer=...)")
            render = localnet.peer("worker-1").render
            for frame, name in ((1, "worker-1"), (2, "worker-2")):
                result = localnet.peer(name).call("render", frame, quality=2, timeout=5)
                self.say(f"    render({frame}, peer={name!r}) -> {result!r}")
            self.say(f"    localnet.peer('worker-1').render(3) -> {render(3)!r}")
            self._beat()
            self.say("\n4. Events: the hub publishes frame_done; both workers are subscribed")
            for frame in (1, 2):
                self.say(f"    hub.finish({frame}) -> {localnet.peer('hub').finish(frame)!r}")
                self._wait_for("worker-1", "received frame_done")
                self._wait_for("worker-2", "received frame_done")
            self._beat()
            self.say("\n5. Killing worker-2 with SIGKILL")
            victim = self.children["worker-2"]
            victim.proc.kill()
            victim.proc.wait(5)
            deadline = time.monotonic() + 5
            while "worker-2" in [p.name for p in localnet.peers()]:
                if time.monotonic() > deadline:
                    raise localnet.Timeout("worker-2 was not pruned")
                time.sleep(0.01)  # peers() itself confirms liveness with psutil
            self.say("    peers() now lists: " + ", ".join(p.name for p in localnet.peers()))
            try:
                localnet.peer("worker-2")
            except localnet.PeerNotFound as exc:
                self.say(f"    localnet.peer('worker-2') raises PeerNotFound: {exc}")
            self.say(f"    hub.finish(3) -> {localnet.peer('hub').finish(3)!r}")
            self._wait_for("worker-1", "received frame_done")
            for name, (sent, delivered, failed) in localnet.peer("hub").deliveries().items():
                self.say(f"    hub's stats for {name}: sent {sent}, delivered {delivered}, "
                         f"failed {failed}")
            self._beat()
            self.say("\n6. Errors travel too: a remote exception is re-raised as its own type")
            try:
                localnet.peer("worker-1").call("render", timeout=5)
            except TypeError as exc:
                self.say(f"    render() with no frame -> TypeError: {exc}")
        self.say("\nDone: every process of the demo is stopped and its directory removed.")

    def _cleanup(self) -> None:
        for child in self.children.values():
            child.end()
        try:
            pid = int((self.directory / "registry.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        while proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                proc.kill()
                return
            time.sleep(0.01)  # not our child: nothing to wait on but its state
    except psutil.NoSuchProcess:
        pass


def main(pause: float = 0.4) -> int:
    return Demo(pause=pause).run()
