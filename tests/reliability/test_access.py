"""Access: another user's process gets nothing executed, nothing read, nothing planted.

Run as root (CI is): the intruder runs as "nobody" through a system python3.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

import localnet
from localnet import _wire
from localnet._wire import Kind

# The intruder needs an interpreter "nobody" may execute (stdlib only).
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                      if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or SYSTEM_PYTHON is None,
    reason="needs root and a system python3 to run a process as another user")

NOBODY = 65534

# Run as "nobody": connect, send a HELLO and a CALL whose payload would
# create ``marker`` if it were ever unpickled, then report what came back.
INTRUDER = """
import socket, sys
address, frames = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(address)
except OSError as exc:
    print("CONNECT-REFUSED", exc.errno)
    sys.exit(0)
try:
    s.sendall(frames)
    got = s.recv(65536)
    print("EOF" if not got else "GOT-DATA " + got.hex())
except (ConnectionResetError, BrokenPipeError):
    print("EOF")
except socket.timeout:
    print("TIMEOUT")
"""


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (self.marker,))


def intrude(address: str, frames: bytes) -> str:
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", textwrap.dedent(INTRUDER), address, frames.hex()],
        user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=30,
        cwd="/", env={"PATH": os.environ.get("PATH", "")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def marker():
    root_only = Path(tempfile.mkdtemp(prefix="ln-sec-"))
    os.chmod(root_only, 0o700)
    yield root_only / "pwned"
    if (root_only / "pwned").exists():
        os.rmdir(root_only / "pwned")
    os.rmdir(root_only)


def evil_frames(marker: Path, kind: Kind, role: str) -> bytes:
    hello = _wire.encode_control({"role": role, "name": "intruder", "pid": 1})
    body = pickle.dumps(("echo", (Evil(str(marker)),), {}), 5) if kind == Kind.CALL \
        else _wire.encode_control(["list", {}])
    return (_wire.pack_header(Kind.HELLO, 0, len(hello)) + hello
            + _wire.pack_header(kind, 1, len(body)) + body)


def test_private_directory_keeps_other_users_out(runtime_dir: Path, marker: Path) -> None:
    with localnet.Peer(name="target") as peer:
        outcome = intrude(peer.address, evil_frames(marker, Kind.CALL, "call"))
        assert outcome.startswith("CONNECT-REFUSED")
        assert not marker.exists()


def test_peer_refuses_another_uid_before_reading(runtime_dir: Path, marker: Path) -> None:
    @localnet.connect()
    def echo(x):
        return x

    with localnet.Peer(name="target") as peer:
        # Open the door on purpose: only SO_PEERCRED stands in the way now.
        os.chmod(runtime_dir, 0o711)
        os.chmod(peer.address, 0o666)
        try:
            for role in ("call", "events"):
                outcome = intrude(peer.address, evil_frames(marker, Kind.CALL, role))
                assert outcome == "EOF"
                assert not marker.exists()
        finally:
            os.chmod(runtime_dir, 0o700)
        assert peer.stats().calls_served == 0
        assert peer.stats().received == {}


def test_registry_refuses_another_uid(runtime_dir: Path, marker: Path) -> None:
    with localnet.Peer(name="target"):
        os.chmod(runtime_dir, 0o711)
        registry = runtime_dir / "registry.sock"
        os.chmod(registry, 0o666)
        try:
            outcome = intrude(str(registry), evil_frames(marker, Kind.REQUEST, "registry"))
        finally:
            os.chmod(runtime_dir, 0o700)
        assert outcome == "EOF"  # no peer list for strangers


# -- the runtime directory ------------------------------------------------------
# (tests/test_paths.py covers the rules one by one; these are the attacks)

def test_directory_planted_by_another_user_is_refused(tmp_path: Path) -> None:
    from localnet import _paths

    planted = tmp_path / "rt"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(localnet.ConfigurationError, match="owned by uid 65534"):
        localnet.Peer(name="victim", directory=planted).start()
    with pytest.raises(localnet.ConfigurationError):
        _paths.runtime_dir(planted)


def test_symlink_planted_as_the_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "rt"
    link.symlink_to(elsewhere)
    with pytest.raises(localnet.ConfigurationError, match="symbolic link"):
        localnet.Peer(name="victim", directory=link).start()
    assert list(elsewhere.iterdir()) == []  # nothing was created through the link


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "rt"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(localnet.ConfigurationError, match="writable by group or others"):
        localnet.Peer(name="victim", directory=shared).start()
    assert list(shared.iterdir()) == []


def test_runtime_directory_and_sockets_are_private(runtime_dir: Path) -> None:
    import stat

    with localnet.Peer(name="private") as peer:
        assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(peer.address).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(runtime_dir / "registry.sock").st_mode) == 0o600
