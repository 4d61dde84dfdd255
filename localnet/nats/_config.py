"""What joins a host's peers to a NATS deployment: the URL, the credentials, the namespace.

Read when a :class:`~localnet.Peer` is created; a keyword argument wins over
its environment variable.  Without a URL nothing here runs and nothing
tries the network.

============================== ============================================================
``nats=`` / ``LOCALNET_NATS``  the server(s): ``nats://[user:password@]host:port``, several
                               separated by commas; ``tls://`` for TLS
``LOCALNET_NATS_USER``,        user and password (when not in the URL)
``LOCALNET_NATS_PASSWORD``
``LOCALNET_NATS_TOKEN``        a token
``LOCALNET_NATS_CREDS``        a ``.creds`` file (JWT and NKey seed)
``LOCALNET_NATS_NKEY``         an NKey seed file
``LOCALNET_NATS_TLS_CA``       a CA bundle: connect with TLS, verifying the server against it
``LOCALNET_NATS_NAMESPACE``    the subject prefix (default ``localnet``): teams sharing one
                               deployment see only their own namespace's peers
``LOCALNET_HOST``              this host's name in listings and in ``name@host`` (default:
                               the machine's host name)
``LOCALNET_NATS_INSECURE_NO_AUTH=1``  join *without* credentials (see below)
============================== ============================================================

Unpickling runs code: a peer runs what any member of the deployment sends
it.  So joining without credentials is refused (:class:`ConfigurationError`)
unless ``LOCALNET_NATS_INSECURE_NO_AUTH=1`` says, loudly, that everyone who
can reach the server may run code in this process.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError

__all__ = ["NatsConfig", "from_settings"]

_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_OPT_OUT = "LOCALNET_NATS_INSECURE_NO_AUTH"


@dataclass(frozen=True)
class NatsConfig:
    """A validated NATS setting (see the module docstring)."""

    servers: tuple[str, ...]
    namespace: str
    host: str
    options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    authenticated: bool = True


def from_settings(url: str | None) -> NatsConfig | None:
    """The setting from ``url`` (the ``nats=`` keyword; "env": ``LOCALNET_NATS``), or None.

    Raises ConfigurationError for a malformed setting, missing credentials
    (without the opt-out) or a missing ``nats`` extra.
    """
    if url == "env":
        url = os.environ.get("LOCALNET_NATS") or None
    if url is None:
        return None
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"nats={url!r}: give a URL such as nats://user:pass@host:4222")
    servers = tuple(part.strip() for part in url.split(",") if part.strip())
    options: dict[str, Any] = {}
    authenticated = False
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigurationError(f"NATS server {server!r}: use nats://host:port or "
                                     "tls://host:port")
        if parts.username:
            authenticated = True
    env = os.environ
    if env.get("LOCALNET_NATS_USER"):
        options["user"] = env["LOCALNET_NATS_USER"]
        options["password"] = env.get("LOCALNET_NATS_PASSWORD", "")
        authenticated = True
    if env.get("LOCALNET_NATS_TOKEN"):
        options["token"] = env["LOCALNET_NATS_TOKEN"]
        authenticated = True
    if env.get("LOCALNET_NATS_CREDS"):
        options["user_credentials"] = _readable(env["LOCALNET_NATS_CREDS"], "LOCALNET_NATS_CREDS")
        authenticated = True
    if env.get("LOCALNET_NATS_NKEY"):
        options["nkeys_seed"] = _readable(env["LOCALNET_NATS_NKEY"], "LOCALNET_NATS_NKEY")
        authenticated = True
    if env.get("LOCALNET_NATS_TLS_CA"):
        options["tls"] = ssl.create_default_context(
            cafile=_readable(env["LOCALNET_NATS_TLS_CA"], "LOCALNET_NATS_TLS_CA"))
    if not authenticated and env.get(_OPT_OUT) != "1":
        raise ConfigurationError(
            "joining NATS without credentials would let anyone who can reach the server run "
            "code in this process (localnet unpickles what peers send). Give credentials "
            "(nats://user:password@host:port, LOCALNET_NATS_TOKEN, LOCALNET_NATS_CREDS or "
            f"LOCALNET_NATS_NKEY), or set {_OPT_OUT}=1 to accept that")
    namespace = env.get("LOCALNET_NATS_NAMESPACE", "localnet")
    if not _NAMESPACE.match(namespace):
        raise ConfigurationError(f"LOCALNET_NATS_NAMESPACE={namespace!r}: use 1-64 letters, "
                                 "digits, '-' or '_'")
    host = env.get("LOCALNET_HOST") or socket.gethostname()
    if not host or "@" in host or len(host) > 255 or any(c in host for c in "\0\n\r"):
        raise ConfigurationError(f"LOCALNET_HOST={host!r}: use 1-255 printable characters "
                                 "without '@'")
    try:
        import nats  # noqa: F401 - the extra must be there
    except ImportError:
        raise ConfigurationError("joining NATS needs the nats extra: "
                                 "pip install 'localnet[nats]'") from None
    return NatsConfig(servers, namespace, host, options, authenticated)


def _readable(path: str, name: str) -> str:
    if not os.path.isfile(path):
        raise ConfigurationError(f"{name}={path!r} is not a readable file")
    return path
