"""OAuth 2.0 bearer tokens for SASL OAUTHBEARER / XOAUTH2: a JWT (RFC 7519) verifier.

:class:`JwtVerifier` accepts a token when it is a JWT signed with HMAC-SHA256 (``HS256``)
under the configured key, is not expired (``exp`` is required), and names the user in its
``sub`` or ``email`` claim.  Any other algorithm is refused, ``none`` included.

May import: the standard library, ``jwt`` (PyJWT) and :mod:`pobox.auth.base`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jwt

__all__ = ["JwtVerifier"]


class JwtVerifier:
    """A :class:`~pobox.auth.base.TokenVerifier` for HS256-signed JWTs.

    Args:
        key_file: the file holding the shared key (trailing whitespace is dropped).
    """

    def __init__(self, key_file: str | os.PathLike[str]) -> None:
        self._key = Path(key_file).read_bytes().rstrip()

    async def verify_token(self, username: str, token: str) -> bool:
        """Return whether ``token`` is a valid, unexpired JWT for ``username``."""
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.InvalidTokenError:
            return False
        return username in (claims.get("sub"), claims.get("email"))
