"""User databases: the interface (:mod:`pobox.auth.base`) and its backends.

:mod:`pobox.auth.schemes` verifies and makes Dovecot's ``{SCHEME}`` passwords, and
:mod:`pobox.auth.passwdfile` reads and edits Dovecot's passwd-file.
"""

from __future__ import annotations

from pobox.auth.base import Authenticator, AuthError, AuthTemporaryError, User
from pobox.auth.passwdfile import (
    PasswdFileAuthenticator,
    PasswdFileError,
    UserExists,
    add_user,
    set_password,
    validate_username,
)
from pobox.auth.schemes import (
    SUPPORTED_SCHEMES,
    SchemeError,
    UnknownScheme,
    hash_password,
    verify,
)

__all__ = [
    "SUPPORTED_SCHEMES",
    "AuthError",
    "AuthTemporaryError",
    "Authenticator",
    "PasswdFileAuthenticator",
    "PasswdFileError",
    "SchemeError",
    "UnknownScheme",
    "User",
    "UserExists",
    "add_user",
    "hash_password",
    "set_password",
    "validate_username",
    "verify",
]
