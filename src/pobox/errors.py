"""The root of pobox's exception tree.

Every error pobox raises on purpose derives from :class:`PoboxError`.  Errors that a POP3
client may be told about carry ``resp_code``: an RFC 2449 / RFC 3206 extended response code
(``AUTH``, ``IN-USE``, ``SYS/TEMP``, ``SYS/PERM``, ``LOGIN-DELAY``) or ``None``.

May import: the standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

__all__ = ["ConfigError", "ListenError", "PoboxError", "binding"]


class PoboxError(Exception):
    """Base class of every error pobox raises on purpose."""

    #: RFC 2449/3206 response code to show the client, if any.
    resp_code: str | None = None


class ConfigError(PoboxError):
    """The configuration is invalid; the message names the key path."""


class ListenError(ConfigError):
    """A listener cannot be bound: the message names the key, the address and the fix.

    ``in_use`` tells a port another process holds (which may free itself: ``pobox`` exits
    with 71, EX_OSERR) from an address this host cannot have (78, EX_CONFIG).
    """

    def __init__(self, key: str, address: str, exc: OSError) -> None:
        self.in_use = exc.errno == errno.EADDRINUSE
        if isinstance(exc, socket.gaierror):
            what = f"cannot resolve the host of {address} ({exc.strerror}): change {key}"
        elif self.in_use:
            what = f"another server listens on {address}: stop it or change {key}"
        elif exc.errno == errno.EACCES:
            what = (
                f"permission denied to listen on {address} (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE; a socket file, a directory you may write to): start "
                f"pobox as root, which gives root up after binding, or change {key}"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            what = f"{address} is not an address of this host: change {key}"
        else:
            what = f"cannot listen on {address}: {exc.strerror or exc}: check {key}"
        super().__init__(f"{key}: {what}")


@contextlib.contextmanager
def binding(key: str, address: str) -> Iterator[None]:
    """Turn an :class:`OSError` of binding ``address`` into a :class:`ListenError`.

    Args:
        key: the configuration key that names the address (``listen``, ``ssl_listen``...).
        address: ``HOST:PORT`` or ``unix:/path``, as the configuration gives it.
    """
    try:
        yield
    except OSError as exc:
        raise ListenError(key, address, exc) from exc
