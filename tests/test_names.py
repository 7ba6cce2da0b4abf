"""auth_username_format: the name a login or a delivery asks the user database for."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys

import pytest

from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.names import folder_name, parse_format
from pobox.testing import running_server
from tests.integration.wire import Wire


class TestParseFormat:
    """parse_format() and the formats it returns."""

    @pytest.mark.parametrize(
        ("template", "name", "expected"),
        [
            ("%Lu", "Alice@Example.ORG", "alice@example.org"),
            ("%u", "Alice@Example.ORG", "Alice@Example.ORG"),
            ("%Ln", "Alice@Example.ORG", "alice"),
            ("%n", "alice", "alice"),
            ("%d", "alice", ""),
            ("%Ud", "alice@example.org", "EXAMPLE.ORG"),
            ("%n@%Ld", "Bob@Mail.Example", "Bob@mail.example"),
            ("%{username}+%{domain}", "a@b", "a+b"),
            ("%L{user}", "ABC", "abc"),
            ("%LTu", "Alice  ", "alice"),
            ("%u%%", "a", "a%"),
            ("%Ln", "a@b@C", "a@b"),
        ],
    )
    def test_formats(self, template: str, name: str, expected: str) -> None:
        """Each variable and modifier does what Dovecot's does."""
        assert expected == parse_format(template)(name)

    @pytest.mark.parametrize("template", ["%x", "%L", "%", "%{host}", "%{user", "fixed", "%%"])
    def test_bad_templates(self, template: str) -> None:
        """Unknown variables, a dangling %, and templates with no variable are refused."""
        with pytest.raises(ValueError, match=r"^'.*': "):
            parse_format(template)

    def test_config_refuses_a_bad_template(self) -> None:
        """A bad template stops the configuration with the key named."""
        with pytest.raises(ConfigError, match=r"^auth_username_format: "):
            build_config({"auth_username_format": "%q"})

    def test_default_lowercases(self) -> None:
        """Dovecot's default, %Lu."""
        assert "%Lu" == build_config({}).auth_username_format


class TestLogins:
    """Every login mechanism goes through the format, and what is logged is the result."""

    async def test_user_pass_mixed_case(self, tmp_path, caplog) -> None:
        """USER Alice logs in as alice with the default %Lu."""
        caplog.set_level(logging.INFO)
        async with running_server(tmp_path) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.login(b"Alice")
            await wire.close()
        assert any("Login: user=<alice>, method=PLAIN" in r.getMessage() for r in caplog.records)

    async def test_sasl_plain_with_authzid(self, tmp_path) -> None:
        """AUTH PLAIN with authcid ALICE (and authzid the same) logs in as alice."""
        async with running_server(tmp_path, auth_mechanisms="PLAIN") as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.line()
            token = base64.b64encode(b"ALICE\0ALICE\0secret")
            assert b"+OK Logged in.\r\n" == await wire.command(b"AUTH PLAIN " + token)
            await wire.close()

    async def test_sasl_plain_authzid_in_another_case(self, tmp_path) -> None:
        """AUTH PLAIN with authzid Alice and authcid alice: the same user, logged in."""
        async with running_server(tmp_path, auth_mechanisms="PLAIN") as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.line()
            token = base64.b64encode(b"Alice\0alice\0secret")
            assert b"+OK Logged in.\r\n" == await wire.command(b"AUTH PLAIN " + token)
            await wire.close()

    async def test_sasl_plain_authzid_of_another_user(self, tmp_path) -> None:
        """AUTH PLAIN with authzid bob and authcid alice fails: no proxy logins."""
        async with running_server(tmp_path, auth_mechanisms="PLAIN") as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.line()
            token = base64.b64encode(b"bob\0alice\0secret")
            reply = await wire.command(b"AUTH PLAIN " + token)
            assert reply.startswith(b"-ERR [AUTH]")
            await wire.close()

    async def test_percent_u_keeps_case(self, tmp_path) -> None:
        """With %u, Alice is not alice: the login fails."""
        async with running_server(tmp_path, auth_username_format="%u") as srv:
            wire = await Wire.connect(srv.host, srv.port)
            assert b"-ERR [AUTH] Authentication failed.\r\n" == await wire.attempt(b"Alice")
            await wire.close()

    async def test_failures_counted_under_the_formatted_name(self, tmp_path, caplog) -> None:
        """A failed login is logged (and throttled) as the name the format made."""
        caplog.set_level(logging.INFO)
        async with running_server(tmp_path) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.attempt(b"ALICE", b"wrong")
            await wire.close()
        assert any("Authentication failed: user=<alice>" in r.getMessage() for r in caplog.records)


class TestUserAdd:
    """pobox user add warns about a name no login or delivery can reach."""

    def test_mixed_case_name_warns(self, tmp_path) -> None:
        """Adding Alice under %Lu says that logins look up alice."""
        result = subprocess.run(
            [sys.executable, "-m", "pobox", "user", "add", "Alice", "-f", str(tmp_path / "pw")],
            input=b"secret\n",
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert 0 == result.returncode
        assert b"look up 'alice'; add 'alice' instead" in result.stderr

    def test_lowercase_name_is_quiet(self, tmp_path) -> None:
        """Adding alice says nothing on standard error."""
        result = subprocess.run(
            [sys.executable, "-m", "pobox", "user", "add", "alice", "-f", str(tmp_path / "pw")],
            input=b"secret\n",
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert (0, b"") == (result.returncode, result.stderr)


class TestFolderName:
    """Folder names: what a Maildir++ folder may be called, and nothing that leaves it."""

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("inbox", "INBOX"),
            ("Junk", "Junk"),
            ("Junk E-mail", "Junk E-mail"),
            ("Lists.pobox", "Lists.pobox"),
            ("Courrier ind&AOk-sirable", "Courrier ind&AOk-sirable"),
            ("a" * 100, "a" * 100),
        ],
    )
    def test_accepted(self, name: str, expected: str) -> None:
        """Canonical names of acceptable folders."""
        assert expected == folder_name(name)

    @pytest.mark.parametrize(
        "name",
        ["", ".Junk", "Junk.", "a..b", "../x", "a/b", " Junk", "Junk ", "J\nX", "J\x00", "é",
         "a" * 101, "Junk:2", "J\tk"],
    )  # fmt: skip
    def test_refused(self, name: str) -> None:
        """Names that are empty, too long, or could leave the maildir or a header line."""
        assert folder_name(name) is None
