"""Listening sockets a worker process inherits from its master (``workers`` > 1).

The master (:mod:`pobox.server._workers`) binds every listener once, as root if need be, and
starts each worker with the descriptors and their keys.  A worker records them here before
its listeners start; :class:`~pobox.server.Pop3Server` and
:class:`~pobox.delivery.DeliveryServer` then take the sockets of a key instead of binding it.
In a single process (``workers = 1``) nothing is recorded and every listener binds as before.

The key names a listener as the configuration does: :func:`key` of its kind (``pop3``,
``pop3s``, ``lmtp``, ``smtp``) and its text (``127.0.0.1:110``, ``unix:/run/lmtp``).

May import: the standard library.
"""

from __future__ import annotations

import socket

__all__ = ["inherit", "key", "take"]

_inherited: dict[str, list[socket.socket]] = {}


def key(kind: str, address: str) -> str:
    """Return the key of the listener of ``kind`` on ``address`` (as the config writes it)."""
    return f"{kind} {address}"


def inherit(name: str, sockets: list[socket.socket]) -> None:
    """Record the sockets the master bound for the listener ``name`` (a :func:`key`)."""
    for sock in sockets:
        sock.setblocking(False)
    _inherited[name] = sockets


def take(name: str) -> list[socket.socket] | None:
    """Return (once) the inherited sockets of listener ``name``, or None: bind it yourself."""
    return _inherited.pop(name, None)
