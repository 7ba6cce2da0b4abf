"""The user-database interface: verify a login, look a user up.

An :class:`Authenticator` answers "is this the password of this user?" with the user's
record or ``None``.  ``None`` means *bad credentials* whether the user is unknown or the
password wrong: callers cannot tell them apart, and a good backend spends the same work on
both (it verifies against a dummy hash for unknown users), so nobody can enumerate users by
timing.  Hash verification is CPU work and runs off the event loop.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.records` (the
:class:`User` record is defined there, shared with storage and delivery).
"""

from __future__ import annotations

from typing import Protocol

from pobox.errors import PoboxError
from pobox.records import User

__all__ = ["AuthError", "AuthTemporaryError", "Authenticator", "TokenVerifier", "User"]


class AuthError(PoboxError):
    """The user database could not be consulted."""

    resp_code: str | None = "SYS/PERM"


class AuthTemporaryError(AuthError):
    """The user database is unavailable for now (RFC 3206 ``SYS/TEMP``)."""

    resp_code = "SYS/TEMP"


class Authenticator(Protocol):
    """Verifies passwords and looks users up."""

    async def authenticate(self, username: str, password: bytes) -> User | None:
        """Return the user if ``password`` is right, else ``None`` (also for unknown users).

        Raises:
            AuthTemporaryError: the database is unavailable; the client should retry later.
        """

    async def lookup(self, username: str) -> User | None:
        """Return the user record without checking a password (for delivery)."""

    async def credentials(self, username: str) -> str | None:
        """Return the stored password ``{SCHEME}data`` of a user who may log in, else ``None``.

        For the challenge-response logins (SASL SCRAM-*, CRAM-MD5, APOP), which need the
        stored form, not a check of a plaintext.  ``None`` for unknown users and users who
        may not log in.

        Raises:
            AuthTemporaryError: the database is unavailable; the client should retry later.
        """


class TokenVerifier(Protocol):
    """Checks OAuth 2.0 bearer tokens (SASL OAUTHBEARER, XOAUTH2)."""

    async def verify_token(self, username: str, token: str) -> bool:
        """Return whether ``token`` is valid now and was issued for ``username``."""
