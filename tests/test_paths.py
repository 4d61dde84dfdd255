"""The runtime directory rules (DESIGN.md section 3)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import localnet
from localnet import _paths


def test_directory_is_created_private(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    assert _paths.runtime_dir(target) == target
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700


def test_environment_chooses_the_directory(runtime_dir: Path) -> None:
    assert _paths.runtime_dir() == runtime_dir


def test_xdg_runtime_dir_is_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOCALNET_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert _paths.default_runtime_dir() == tmp_path / "localnet"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert _paths.default_runtime_dir().name == f"localnet-{os.getuid()}"


@pytest.mark.parametrize("mode", [0o755, 0o500, 0o711, 0o750, 0o600])
def test_existing_directory_of_another_mode_is_refused_not_changed(tmp_path: Path,
                                                                   mode: int) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    os.chmod(target, mode)
    try:
        with pytest.raises(localnet.ConfigurationError,
                           match=rf"has mode {mode:04o}.*'chmod 700 {target}'.*LOCALNET_DIR"):
            _paths.runtime_dir(target)
        assert stat.S_IMODE(os.stat(target).st_mode) == mode  # left as it was
    finally:
        os.chmod(target, 0o700)  # let tmp_path be cleaned up


def test_private_directory_with_inherited_setgid_is_used(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    os.chmod(target, 0o2700)
    assert _paths.runtime_dir(target) == target
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o2700


def test_created_directory_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        _paths.runtime_dir(tmp_path / "rt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "rt").st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    os.chmod(target, mode)
    with pytest.raises(localnet.ConfigurationError, match="writable by group or others"):
        _paths.runtime_dir(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode  # left as it was


def test_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(localnet.ConfigurationError, match="symbolic link"):
        _paths.runtime_dir(link)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another user")
def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    target.mkdir(mode=0o700)
    os.chown(target, 65534, 65534)
    with pytest.raises(localnet.ConfigurationError, match="owned by uid 65534"):
        _paths.runtime_dir(target)


def test_too_long_path_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 90)
    with pytest.raises(localnet.ConfigurationError, match="too long"):
        _paths.runtime_dir(target)
    assert not target.exists()


def test_peer_refuses_unsafe_directory(tmp_path: Path) -> None:
    target = tmp_path / "rt"
    target.mkdir()
    os.chmod(target, 0o777)
    with pytest.raises(localnet.ConfigurationError):
        localnet.Peer(name="x", directory=target).start()
