"""AUTH, APOP and the brute-force defence against a real pobox on loopback.

Python's poplib has no SASL, so AUTH exchanges are driven with raw bytes and with curl, whose
pop3:// supports PLAIN, LOGIN, CRAM-MD5, OAUTHBEARER and XOAUTH2 (curl 7.88 has no SCRAM).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import poplib
import time
from pathlib import Path

import jwt
import pytest

from pobox.testing import RunningServer, running_server
from tests.helpers import need
from tests.integration.wire import Wire

MECHS = "PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256"


async def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; return its exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        need("curl"),
        "-sS",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out


def scram_client_final(
    server_first: bytes, client_first_bare: bytes, password: bytes, hash_name: str
) -> tuple[bytes, bytes]:
    """Compute a SCRAM client-final message and the expected server signature (RFC 5802 §3)."""
    fields = dict(f.split(b"=", 1) for f in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        hash_name, password, base64.b64decode(fields[b"s"]), int(fields[b"i"])
    )
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = b"c=biws,r=" + fields[b"r"]
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.digest(stored_key, auth_message, hash_name)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_signature = hmac.digest(
        hmac.digest(salted, b"Server Key", hash_name), auth_message, hash_name
    )
    return (
        without_proof + b",p=" + base64.b64encode(proof),
        b"v=" + base64.b64encode(server_signature),
    )


async def scram_login(srv: RunningServer, mech: bytes, hash_name: str, password: bytes) -> bytes:
    """Log in as alice with SCRAM over raw bytes; return the final reply."""
    w = await Wire.connect(srv.host, srv.port)
    await w.line()
    bare = b"n=alice,r=clientnonce123"
    await w.send(b"AUTH " + mech + b" " + base64.b64encode(b"n,," + bare) + b"\r\n")
    challenge = await w.line()
    assert challenge.startswith(b"+ ")
    server_first = base64.b64decode(challenge[2:].strip())
    final, expected = scram_client_final(server_first, bare, password, hash_name)
    await w.send(base64.b64encode(final) + b"\r\n")
    reply = await w.line()
    if reply.startswith(b"+ "):
        assert expected == base64.b64decode(reply[2:].strip())
        await w.send(b"\r\n")
        reply = await w.line()
    await w.close()
    return reply


class TestRawExchanges:
    """AUTH over a raw socket, against stored passwords in several schemes."""

    async def test_plain_initial_response(self, tmp_path: Path) -> None:
        """AUTH PLAIN with an initial response logs in."""
        async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            reply = await w.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"))
            assert b"+OK Logged in.\r\n" == reply
            assert b"+OK 0 0\r\n" == await w.command(b"STAT")

    async def test_token_mechanisms_offered_only_with_a_verifier(self, tmp_path: Path) -> None:
        """CAPA's SASL names the configured mechanisms in upper case, the token ones only
        when there is a token verifier (none here), at every connection."""
        mechs = "plain XOAUTH2 OAUTHBEARER cram-md5"
        async with running_server(tmp_path, auth_mechanisms=mechs) as srv:
            for _ in range(2):
                w = await Wire.connect(srv.host, srv.port)
                await w.line()
                await w.send(b"CAPA\r\n")
                capa = await w.multiline()
                assert b"\r\nSASL PLAIN CRAM-MD5\r\n" in capa
                reply = await w.command(b"AUTH XOAUTH2")
                assert reply.startswith(b"-ERR")
                await w.close()

    @pytest.mark.parametrize(
        ("mech", "hash_name"), [(b"SCRAM-SHA-256", "sha256"), (b"SCRAM-SHA-1", "sha1")]
    )
    async def test_scram_with_plaintext_password(
        self, tmp_path: Path, mech: bytes, hash_name: str
    ) -> None:
        """SCRAM works for a {PLAIN} user; the server proves itself with the server-final."""
        async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
            assert b"+OK Logged in.\r\n" == await scram_login(srv, mech, hash_name, b"secret")

    async def test_scram_with_stored_keys(self, tmp_path: Path) -> None:
        """SCRAM-SHA-256 works against Dovecot's {SCRAM-SHA-256} stored keys."""
        async with running_server(tmp_path, scheme="SCRAM-SHA-256", auth_mechanisms=MECHS) as srv:
            assert b"+OK Logged in.\r\n" == await scram_login(
                srv, b"SCRAM-SHA-256", "sha256", b"secret"
            )

    async def test_scram_wrong_password(self, tmp_path: Path) -> None:
        """A wrong SCRAM password fails with -ERR [AUTH]."""
        async with running_server(tmp_path, scheme="SCRAM-SHA-256", auth_mechanisms=MECHS) as srv:
            reply = await scram_login(srv, b"SCRAM-SHA-256", "sha256", b"wrong")
            assert b"-ERR [AUTH] Authentication failed.\r\n" == reply

    async def test_scram_against_a_hash_fails_like_a_wrong_password(self, tmp_path: Path) -> None:
        """A user whose password is a one-way hash cannot use SCRAM-SHA-256."""
        async with running_server(tmp_path, scheme="SHA512-CRYPT", auth_mechanisms=MECHS) as srv:
            reply = await scram_login(srv, b"SCRAM-SHA-256", "sha256", b"secret")
            assert b"-ERR [AUTH] Authentication failed.\r\n" == reply

    async def test_locked_maildrop(self, tmp_path: Path) -> None:
        """AUTH goes through the same maildrop lock as USER/PASS: -ERR [IN-USE]."""
        async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
            first = await Wire.connect(srv.host, srv.port)
            await first.login()
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            reply = await w.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"))
            assert reply.startswith(b"-ERR [IN-USE] ")

    async def test_log_names_the_method(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The Login line says which mechanism was used."""
        caplog.set_level(logging.INFO, logger="pobox")
        logging.getLogger("pobox").propagate = True
        try:
            async with running_server(
                tmp_path, scheme="SCRAM-SHA-256", auth_mechanisms=MECHS
            ) as srv:
                await scram_login(srv, b"SCRAM-SHA-256", "sha256", b"secret")
                await asyncio.sleep(0.1)
        finally:
            logging.getLogger("pobox").propagate = False
        logins = [r.getMessage() for r in caplog.records if "Login: " in r.getMessage()]
        assert 1 == len(logins)
        assert "user=<alice>, method=SCRAM-SHA-256, rip=127.0.0.1" in logins[0]


@pytest.mark.external
class TestCurl:
    """curl's SASL over pop3://."""

    @pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
    async def test_mechanism(self, tmp_path: Path, mech: str) -> None:
        """curl logs in with the mechanism and lists the maildrop."""
        async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
            srv.deliver("alice", b"Subject: x\n\nhi\n")
            status, out = await curl(
                "--user", "alice:secret", "--login-options", f"AUTH={mech}",
                f"pop3://{srv.host}:{srv.port}/",
            )  # fmt: skip
            assert (0, b"1 18\r\n") == (status, out)

    async def test_cram_md5_with_stored_context(self, tmp_path: Path) -> None:
        """curl's CRAM-MD5 works against Dovecot's {CRAM-MD5} stored context."""
        async with running_server(tmp_path, scheme="CRAM-MD5", auth_mechanisms=MECHS) as srv:
            status, _ = await curl(
                "--user", "alice:secret", "--login-options", "AUTH=CRAM-MD5",
                f"pop3://{srv.host}:{srv.port}/",
            )  # fmt: skip
            assert 0 == status

    async def test_cram_md5_wrong_password(self, tmp_path: Path) -> None:
        """A wrong CRAM-MD5 password is a login failure (curl exit 67)."""
        async with running_server(tmp_path, auth_mechanisms=MECHS) as srv:
            status, _ = await curl(
                "--user", "alice:nope", "--login-options", "AUTH=CRAM-MD5",
                f"pop3://{srv.host}:{srv.port}/",
            )  # fmt: skip
            assert 67 == status

    @pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
    async def test_oauth_jwt(self, tmp_path: Path, mech: str) -> None:
        """A JWT signed with the configured key logs in; a wrongly signed one does not."""
        key = tmp_path / "jwt.key"
        key.write_bytes(b"0123456789abcdef0123456789abcdef")
        good = jwt.encode(
            {"sub": "alice", "exp": int(time.time()) + 600}, key.read_bytes(), "HS256"
        )
        bad = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, b"x" * 32, "HS256")
        expired = jwt.encode(
            {"sub": "alice", "exp": int(time.time()) - 10}, key.read_bytes(), "HS256"
        )
        async with running_server(
            tmp_path / "srv", auth_mechanisms=f"{MECHS} {mech}", oauth_jwt_key_file=str(key)
        ) as srv:
            results = []
            for token in (good, bad, expired):
                status, _ = await curl(
                    "--user", "alice", "--oauth2-bearer", token, "--login-options", f"AUTH={mech}",
                    f"pop3://{srv.host}:{srv.port}/",
                )  # fmt: skip
                results.append(status)
            assert [0, 67, 67] == results


class TestApop:
    """APOP with Python's poplib, a real client."""

    async def test_poplib_apop(self, tmp_path: Path) -> None:
        """poplib's apop() logs in when APOP is on; the greeting carries the timestamp."""
        async with running_server(tmp_path, apop=True) as srv:

            def session() -> tuple[bytes, bytes]:
                pop = poplib.POP3(srv.host, srv.port, timeout=10)
                try:
                    welcome = pop.getwelcome()
                    reply = pop.apop("alice", "secret")
                    return welcome, reply
                finally:
                    pop.quit()

            welcome, reply = await asyncio.to_thread(session)
            assert welcome.startswith(b"+OK pobox ready. <")
            assert welcome.endswith(b">")
            assert b"+OK Logged in." == reply

    async def test_wrong_password(self, tmp_path: Path) -> None:
        """A wrong APOP password fails like a wrong USER/PASS."""
        async with running_server(tmp_path, apop=True) as srv:

            def session() -> bytes:
                pop = poplib.POP3(srv.host, srv.port, timeout=10)
                try:
                    pop.apop("alice", "nope")
                except poplib.error_proto as exc:
                    return bytes(exc.args[0])
                finally:
                    pop.close()
                return b"logged in"

            assert b"-ERR [AUTH] Authentication failed." == await asyncio.to_thread(session)

    async def test_hashed_password_cannot_apop(self, tmp_path: Path) -> None:
        """A user whose password is a one-way hash fails APOP like a wrong password."""
        async with running_server(tmp_path, scheme="SHA512-CRYPT", apop=True) as srv:
            w = await Wire.connect(srv.host, srv.port)
            greeting = await w.line()
            stamp = greeting[greeting.index(b"<") : greeting.index(b">") + 1]
            digest = hashlib.md5(stamp + b"secret").hexdigest().encode()
            assert b"-ERR [AUTH] Authentication failed.\r\n" == await w.command(
                b"APOP alice " + digest
            )

    async def test_no_timestamp_without_apop(self, tmp_path: Path) -> None:
        """Without apop = true the greeting has no timestamp."""
        async with running_server(tmp_path) as srv:
            w = await Wire.connect(srv.host, srv.port)
            assert b"+OK pobox ready.\r\n" == await w.line()
