"""Errors of binding a listener, named after the configuration key that gave the address.

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

from pobox.errors import ListenError

__all__ = ["binding", "listen_error"]


def listen_error(key: str, address: str, exc: OSError) -> ListenError:
    """Return the :class:`ListenError` of ``exc``: the key, the address and the fix."""
    in_use = exc.errno == errno.EADDRINUSE
    if isinstance(exc, socket.gaierror):
        what = f"cannot resolve the host of {address} ({exc.strerror}): change {key}"
    elif in_use:
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
    return ListenError(f"{key}: {what}", in_use=in_use)


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
        raise listen_error(key, address, exc) from exc
