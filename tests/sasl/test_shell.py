"""The shell's side of SASL and APOP: stored credentials, tokens, certificates, settings."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import jwt
import pytest

from pobox.auth.base import User
from pobox.auth.oauth import JwtVerifier
from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.protocol import Secret
from pobox.server._session import _may_log_in, client_identity, secret_from_stored


class TestCredentials:
    """PasswdFileAuthenticator.credentials()."""

    async def test_stored_forms(self, tmp_path: Path) -> None:
        """The stored password comes back with its scheme; bare data gets the default."""
        passwd = tmp_path / "passwd"
        passwd.write_text(
            "tim:{PLAIN}tanstaaf::::::\n"
            "bare:tanstaaf::::::\n"
            "nologin:{PLAIN}x::::::nologin=y\n"
            "anyone:::::::nopassword=y\n"
        )
        auth = PasswdFileAuthenticator(passwd, default_scheme="PLAIN", check_interval=0)

        assert ["{PLAIN}tanstaaf", "{PLAIN}tanstaaf", None, None, None] == [
            await auth.credentials(u) for u in ("tim", "bare", "nologin", "anyone", "nobody")
        ]


class TestSecretFromStored:
    """secret_from_stored()."""

    def test_plain(self):
        """{PLAIN} and {CLEAR} give the plaintext password."""
        assert Secret(password=b"p:w") == secret_from_stored("{PLAIN}p:w")
        assert Secret(password=b"pw") == secret_from_stored("{CLEAR}pw")

    def test_scram(self):
        """{SCRAM-SHA-256} gives the stored keys."""
        salt = base64.b64encode(b"s" * 16).decode()
        key = base64.b64encode(b"k" * 32).decode()
        secret = secret_from_stored(f"{{SCRAM-SHA-256}}4096,{salt},{key},{key}")

        assert secret.scram is not None
        assert ("sha256", 4096, b"s" * 16, b"k" * 32) == (
            secret.scram.hash_name,
            secret.scram.iterations,
            secret.scram.salt,
            secret.scram.stored_key,
        )

    def test_cram_md5(self):
        """{CRAM-MD5} gives the 32-byte HMAC-MD5 context."""
        assert Secret(cram_md5_context=b"\x01" * 32) == secret_from_stored("{CRAM-MD5}" + "01" * 32)

    def test_one_way_hash(self):
        """A one-way hash gives nothing a challenge-response mechanism could use."""
        assert Secret() == secret_from_stored("{SHA512-CRYPT}$6$salt$hash")


class TestJwtVerifier:
    """JwtVerifier: HS256 tokens with exp, for the user in sub or email."""

    KEY = b"0123456789abcdef0123456789abcdef"

    @pytest.fixture
    def verifier(self, tmp_path: Path) -> JwtVerifier:
        """A verifier whose key file ends with a newline, as editors write it."""
        key_file = tmp_path / "key"
        key_file.write_bytes(self.KEY + b"\n")
        return JwtVerifier(key_file)

    async def test_email_claim(self, verifier: JwtVerifier) -> None:
        """A token whose email is the user is accepted."""
        token = jwt.encode({"email": "tim@x", "exp": time.time() + 60}, self.KEY, "HS256")

        assert await verifier.verify_token("tim@x", token)

    async def test_other_user(self, verifier: JwtVerifier) -> None:
        """A token for someone else is refused."""
        token = jwt.encode({"sub": "bob", "exp": time.time() + 60}, self.KEY, "HS256")

        assert not await verifier.verify_token("tim", token)

    async def test_exp_required(self, verifier: JwtVerifier) -> None:
        """A token without exp is refused."""
        token = jwt.encode({"sub": "tim"}, self.KEY, "HS256")

        assert not await verifier.verify_token("tim", token)

    async def test_alg_none(self, verifier: JwtVerifier) -> None:
        """An unsigned token (alg none) is refused."""
        token = jwt.encode({"sub": "tim", "exp": time.time() + 60}, None, "none")

        assert not await verifier.verify_token("tim", token)

    async def test_garbage(self, verifier: JwtVerifier) -> None:
        """Something that is not a JWT is refused, not an exception."""
        assert not await verifier.verify_token("tim", "not a token")


class TestClientIdentity:
    """client_identity() from getpeercert()."""

    def test_email_first(self):
        """The subject's emailAddress wins over its commonName."""
        cert = {"subject": ((("commonName", "Tim"),), (("emailAddress", "tim@x"),))}

        assert "tim@x" == client_identity(cert)

    def test_common_name(self):
        """Without an email the commonName is the identity."""
        assert "tim" == client_identity({"subject": ((("commonName", "tim"),),)})

    def test_no_certificate(self):
        """No verified certificate (None or {}) is no identity."""
        assert [None, None] == [client_identity(None), client_identity({})]


class TestSettings:
    """The new configuration keys."""

    def test_defaults(self):
        """PLAIN and LOGIN by default, no APOP, Dovecot's 3 failures per connection."""
        config = build_config({})

        assert ("PLAIN LOGIN", False, 3, "pobox") == (
            config.auth_mechanisms,
            config.apop,
            config.max_auth_failures,
            config.log_format,
        )

    @pytest.mark.parametrize(
        ("key", "value", "message"),
        [
            ("auth_mechanisms", "PLAIN GSSAPI", "auth_mechanisms: unknown ['GSSAPI']"),
            ("max_auth_failures", 0, "max_auth_failures: must be at least 1"),
            ("log_format", "syslog", "log_format: 'syslog' is not one of pobox, dovecot or json"),
        ],
    )
    def test_invalid(self, key, value, message):
        """Bad values are refused at start-up, naming the key."""
        with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[")):
            build_config({key: value})


class TestMayLogIn:
    """Certificate and token logins honour nologin like password logins."""

    def test_flags(self):
        """nologin and noauthenticate refuse the user unless their value is false."""
        users = [
            User("a"),
            User("b", extra={"nologin": "y"}),
            User("c", extra={"noauthenticate": ""}),
            User("d", extra={"nologin": "no"}),
        ]

        assert ["a", None, None, "d"] == [u.name if u else None for u in map(_may_log_in, users)]
