"""Exhausted system resources reach the user as localnet errors that say what to do.

``Peer.start()`` used to let raw ``OSError`` s escape (``Too many open
files``, ``No space left on device``).  They now arrive as
:class:`localnet.OutOfResources` (also an ``OSError`` with the same errno),
whose message names what ran out and how to fix it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

START = """
import errno, os, resource, sys
import localnet
import localnet._registry_client  # imported now: an import needs descriptors too
Peer, OutOfResources = localnet.Peer, localnet.OutOfResources

def attempt():
    try:
        Peer(name="starved").start()
        print("STARTED", flush=True)
    except OutOfResources as exc:
        print("OUT", errno.errorcode[exc.errno], "|", exc, flush=True)
    except Exception as exc:
        print("RAW", type(exc).__name__, exc, flush=True)
"""


def _run(code: str, argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv + [sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _env(directory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LOCALNET_DIR"] = str(directory)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def test_start_without_descriptors_raises_out_of_resources(runtime_dir: Path) -> None:
    code = START + """
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
open_now = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))  # room for nothing new
attempt()
"""
    out = _run(code, [], _env(runtime_dir))
    assert out.startswith("OUT EMFILE |"), out
    assert "ulimit -n" in out and "file descriptors" in out, out


def test_start_in_a_full_runtime_directory_raises_out_of_resources(tmp_path: Path) -> None:
    # A private mount namespace with a tmpfs that has no inode left: nothing
    # of ours is visible outside it, and it vanishes with the child.
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-m", "true"], capture_output=True,
                                         timeout=10).returncode != 0:
        pytest.skip("needs unshare -m (a private mount namespace) to fill a file system")
    directory = tmp_path / "full"
    directory.mkdir(mode=0o700)
    script = (f'mount -t tmpfs -o size=1m,nr_inodes=2,mode=700 tmpfs "{directory}" && '
              f'touch "{directory}/filler" && exec "$@"')
    out = _run(START + "attempt()\n", [unshare, "-m", "sh", "-c", script, "sh"],
               _env(directory))
    assert out.startswith(f"OUT {errno.errorcode[errno.ENOSPC]} |"), out
    assert "LOCALNET_DIR" in out, out
