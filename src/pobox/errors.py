"""The root of pobox's exception tree.

Every error pobox raises on purpose derives from :class:`PoboxError`.  Errors that a POP3
client may be told about carry ``resp_code``: an RFC 2449 / RFC 3206 extended response code
(``AUTH``, ``IN-USE``, ``SYS/TEMP``, ``SYS/PERM``, ``LOGIN-DELAY``) or ``None``.

May import: the standard library only.
"""

from __future__ import annotations

__all__ = ["ConfigError", "PoboxError"]


class PoboxError(Exception):
    """Base class of every error pobox raises on purpose."""

    #: RFC 2449/3206 response code to show the client, if any.
    resp_code: str | None = None


class ConfigError(PoboxError):
    """The configuration is invalid; the message names the key path."""
