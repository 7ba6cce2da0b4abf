"""Errors of the protocol core.

Following h11, :class:`ProtocolError` is abstract: :class:`LocalProtocolError` means *we*
(the code driving the core) broke the rules, e.g. sent an event the current state does not
expect; :class:`RemoteProtocolError` means the peer did.  The POP3 core answers almost every
peer mistake with a ``-ERR`` reply instead of raising, so :class:`RemoteProtocolError` is
rare; the only thing a fuzzer may ever see escape from the core.

May import: the standard library only.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Abstract base of the core's errors; carries an RFC 2449/3206 response code."""

    def __init__(self, msg: str, resp_code: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; use Local- or RemoteProtocolError")
        super().__init__(msg)
        self.resp_code = resp_code


class LocalProtocolError(ProtocolError):
    """The shell driving the core misused it (a bug in pobox, not in the client)."""


class RemoteProtocolError(ProtocolError):
    """The client violated the protocol in a way that ends the session."""
