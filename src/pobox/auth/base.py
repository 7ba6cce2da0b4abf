"""The user-database interface: verify a login, look a user up.

An :class:`Authenticator` answers "is this the password of this user?" with the user's
record or ``None``.  ``None`` means *bad credentials* whether the user is unknown or the
password wrong: callers cannot tell them apart, and a good backend spends the same work on
both (it verifies against a dummy hash for unknown users), so nobody can enumerate users by
timing.  Hash verification is CPU work and runs off the event loop, in
:class:`HashWorkers`, which the authenticator and the SASL shell share.

May import: the standard library, :mod:`pobox.errors` and :mod:`pobox.records` (the
:class:`User` record is defined there, shared with storage and delivery).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
from collections.abc import Callable
from typing import Protocol, TypeVar

from pobox.errors import PoboxError
from pobox.records import User

__all__ = [
    "AuthError",
    "AuthTemporaryError",
    "Authenticator",
    "HashWorkers",
    "TokenVerifier",
    "User",
]

_T = TypeVar("_T")


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


class HashWorkers:
    """Run costly hash work (crypt, bcrypt, Argon2, PBKDF2) in worker threads, a few at once.

    At most ``limit`` (default: one per usable CPU) run at a time: Argon2 takes 64 MiB a
    check, and more checks at once than CPUs would only share them, thrash their caches and
    add memory.  Password checks and SCRAM key derivation go through the same workers, so
    the limit holds for all of them together.

    The threads are their own, not the event loop's default executor: that one runs the
    maildir work (listings, large reads, deliveries' writes and fsyncs), whose amount users
    and senders control, and a login must not wait behind it.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or len(os.sched_getaffinity(0)) or 1
        self._slots = asyncio.Semaphore(self.limit)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.limit, thread_name_prefix="pobox-hash"
        )

    async def run(self, func: Callable[..., _T], /, *args: object, **kwargs: object) -> _T:
        """Return ``func(*args, **kwargs)``, computed in a worker thread when a slot is free."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
            return await loop.run_in_executor(self._pool, call)
