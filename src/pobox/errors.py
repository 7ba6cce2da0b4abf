"""The root of pobox's exception tree.

Every error pobox raises on purpose derives from :class:`PoboxError`.  Errors that a POP3
client may be told about carry ``resp_code``: an RFC 2449 / RFC 3206 extended response code
(``AUTH``, ``IN-USE``, ``SYS/TEMP``, ``SYS/PERM``, ``LOGIN-DELAY``) or ``None``.

May import: the standard library only.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ListenError", "PoboxError"]


class PoboxError(Exception):
    """Base class of every error pobox raises on purpose."""

    #: RFC 2449/3206 response code to show the client, if any.
    resp_code: str | None = None


class ConfigError(PoboxError):
    """The configuration is invalid; the message names the key path."""


class ListenError(ConfigError):
    """A listener cannot be bound: the message names the key, the address and the fix.

    ``in_use`` tells a port another process holds (which may free itself: ``pobox`` exits
    with 71, EX_OSERR) from an address this host cannot have (78, EX_CONFIG).  Made by
    :func:`pobox.binding.listen_error` (this module imports nothing: the sans-IO cores use it).
    """

    def __init__(self, message: str, *, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use
