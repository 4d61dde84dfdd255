"""The runtime directory: where peers and the registry keep their sockets.

Resolution order: the ``directory`` argument, ``$LOCALNET_DIR``,
``$XDG_RUNTIME_DIR/localnet``, ``/tmp/localnet-<uid>``.  A missing directory
is created with mode 0700.  An existing one is used only when it is a real
directory, owned by this user, with permission bits exactly 0700; otherwise
it is refused with a message that says what to do - never changed: a
directory the user made (0755, 0500, ...) is the user's to chmod.  A path
too long for the socket addresses inside it is refused before anything is
created.

Different directories are independent namespaces: each has its own registry.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import ConfigurationError

REGISTRY_SOCKET = "registry.sock"
REGISTRY_LOCK = "registry.lock"
SPAWN_LOCK = "spawn.lock"
REGISTRY_PID = "registry.pid"

# sockaddr_un.sun_path is 108 bytes on Linux, 104 on the BSDs; keep a margin.
_MAX_SOCKET_PATH = 100


def default_runtime_dir() -> Path:
    """The directory the environment selects, before any check."""
    explicit = os.environ.get("LOCALNET_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "localnet"
    return Path(tempfile.gettempdir()) / f"localnet-{os.getuid()}"


def runtime_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Return the runtime directory, creating it safely when it is missing.

    Raises:
        ConfigurationError: the directory is unsafe or unusable; the message
            says why and what to do.
    """
    path = Path(directory) if directory is not None else default_runtime_dir()
    path = Path(os.path.abspath(path))
    longest = path / "p-4294967295-999999.sock"
    if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"the runtime directory path {str(path)!r} is too long for Unix socket "
            f"addresses (at most about {_MAX_SOCKET_PATH - 25} bytes); set LOCALNET_DIR "
            "to a shorter path"
        )
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the localnet runtime directory {str(path)!r}: {exc.strerror}; "
            "set LOCALNET_DIR to a directory you own"
        ) from exc
    else:
        os.chmod(path, 0o700)  # ours, just made: a umask such as 0277 must not leave it 0500
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is not a private (0700) directory of this user."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot inspect runtime directory {str(path)!r}: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise ConfigurationError(
            f"the runtime directory {str(path)!r} is a symbolic link; refusing to use it. "
            "Remove it or set LOCALNET_DIR to a real directory you own"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigurationError(f"the runtime directory {str(path)!r} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigurationError(
            f"the runtime directory {str(path)!r} is owned by uid {st.st_uid}, not by you "
            f"(uid {os.getuid()}); refusing to use it. Set LOCALNET_DIR to a directory you own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(
            f"the runtime directory {str(path)!r} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
            f"Run 'chmod 700 {path}' or set LOCALNET_DIR to a private directory"
        )
    mode = st.st_mode & 0o777  # setgid, inherited from a parent, grants nothing
    if mode != 0o700:
        raise ConfigurationError(
            f"the runtime directory {str(path)!r} has mode {mode:04o}; localnet uses only "
            f"a directory private to you (0700) and does not change yours. Run "
            f"'chmod 700 {path}', or set LOCALNET_DIR to another path (a missing "
            "directory is created with mode 0700)"
        )
