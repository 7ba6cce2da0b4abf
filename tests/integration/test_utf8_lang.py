"""RFC 6856 end to end: Python's poplib against a real ``pobox serve`` on loopback.

poplib has ``utf8()`` and sends user names and passwords as UTF-8; LANG has no method, so it
goes through ``_shortcmd``/``_longcmd`` as raw commands.
"""

from __future__ import annotations

import asyncio
import base64
import poplib
import socket
import unicodedata
from pathlib import Path

import pytest

from pobox.config import KEYS
from pobox.protocol._i18n import LANGUAGES
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import deliver
from tests.helpers.process import pobox_serve

#: The user as the passwd-file has it, and the password (both NFC, as SASLprep leaves them).
USER = "josé"
PASSWORD = "pässwörd"


def _session(port: int) -> dict[str, object]:
    """Log in with UTF-8 credentials in forms SASLprep folds, switch to German, use the box."""
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        seen: dict[str, object] = {"capa": pop.capa()}
        seen["utf8"] = pop.utf8()
        seen["languages"] = pop._longcmd("LANG")[1]  # poplib has no LANG method
        seen["lang"] = pop._shortcmd("LANG de")
        # Fullwidth letters and a decomposed "ä": SASLprep's NFKC makes them the stored forms.
        pop.user("ｊｏｓé")
        seen["login"] = pop.pass_(unicodedata.normalize("NFD", PASSWORD))
        seen["stat"] = pop.stat()
        with pytest.raises(poplib.error_proto) as missing:
            pop.retr(9)
        seen["missing"] = missing.value.args[0]
        with pytest.raises(poplib.error_proto) as unknown:
            pop._shortcmd("LANG xx")
        seen["unknown"] = unknown.value.args[0]
        seen["back"] = pop._shortcmd("LANG *")
        seen["quit"] = pop.quit()
    finally:
        pop.close()
    return seen


def _wrong_password(port: int) -> bytes:
    """Try a wrong password after LANG de; return the -ERR line."""
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        pop.utf8()
        pop._shortcmd("LANG de")
        pop.user(USER)
        with pytest.raises(poplib.error_proto) as refused:
            pop.pass_("falsch")
        pop.quit()
    finally:
        pop.close()
    reply: bytes = refused.value.args[0]
    return reply


class TestPoplib:
    """UTF8 and LANG through a real client and a real server process."""

    async def test_utf8_login_and_german(self, tmp_path: Path) -> None:
        """UTF-8 names and passwords log in after SASLprep; LANG de changes texts, not codes."""
        async with pobox_serve(tmp_path / "srv", users={USER: PASSWORD}) as proc:
            deliver(tmp_path / "srv" / "mail" / USER, "Subject: grüße\n\nHallo\n".encode())
            seen = await asyncio.to_thread(_session, proc.port)
            refused = await asyncio.to_thread(_wrong_password, proc.port)

        capa = seen["capa"]
        assert isinstance(capa, dict)
        assert (["USER"], []) == (capa["UTF8"], capa["LANG"])
        assert b"+OK UTF-8 mode on." == seen["utf8"]
        assert [b"en English", b"de Deutsch"] == seen["languages"]
        assert "+OK de Sprache geändert.".encode() == seen["lang"]
        assert b"+OK Angemeldet." == seen["login"]
        assert (1, len("Subject: grüße\r\n\r\nHallo\r\n".encode())) == seen["stat"]
        assert b"-ERR Es gibt keine Nachricht 9." == seen["missing"]
        assert "-ERR Nicht unterstützte Sprache: xx".encode() == seen["unknown"]
        assert b"+OK en Language changed." == seen["back"]
        assert b"+OK Logging out." == seen["quit"]
        assert b"-ERR [AUTH] Anmeldung fehlgeschlagen." == refused


def _capa_and_commands(port: int) -> dict[str, object]:
    """Greeting, CAPA, and what UTF8 and LANG get, as a client sees them."""
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    try:
        seen: dict[str, object] = {"greeting": pop.getwelcome(), "capa": pop.capa()}
        for command in ("UTF8", "LANG de"):
            with pytest.raises(poplib.error_proto) as refused:
                pop._shortcmd(command)
            seen[command] = refused.value.args[0]
        seen["quit"] = pop.quit()
    finally:
        pop.close()
    return seen


class TestKeys:
    """``pop3_utf8``, ``pop3_lang`` and ``pop3_language`` in a real server."""

    async def test_off_and_german_default(self, tmp_path: Path) -> None:
        """Off: CAPA has neither and both commands are refused; texts in the default language."""
        async with pobox_serve(
            tmp_path / "srv", pop3_utf8=False, pop3_lang=False, pop3_language="de"
        ) as proc:
            seen = await asyncio.to_thread(_capa_and_commands, proc.port)

        capa = seen["capa"]
        assert isinstance(capa, dict)
        assert ("UTF8" not in capa, "LANG" not in capa) == (True, True)
        assert b"+OK pobox bereit." == seen["greeting"]
        assert "-ERR Befehl nicht verfügbar.".encode() == seen["UTF8"]
        assert "-ERR Befehl nicht verfügbar.".encode() == seen["LANG de"]
        assert b"+OK Abmeldung." == seen["quit"]

    def test_config_languages_are_the_cores(self) -> None:
        """The key's choices are exactly the languages the core has texts for."""
        assert tuple(LANGUAGES) == KEYS["pop3_language"].choices


class _FromAddress(poplib.POP3):
    """poplib's client, connecting from a loopback address of our choice."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=20)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source, 0))


#: The password as the passwd-file stores it: decomposed (NFD), as some tools write it.
DECOMPOSED = unicodedata.normalize("NFD", PASSWORD)
FULLWIDTH_NAME = "\uff4a\uff4f\uff53é"  # "josé" with fullwidth j, o, s


def _logins(port: int) -> dict[str, bytes]:
    """Try the UTF-8 credentials every way a client may send them; return each reply.

    Each attempt comes from its own loopback address, so that neither server's penalty for
    failed logins from one address (Dovecot's anvil doubles its delay) slows the next.
    """
    replies: dict[str, bytes] = {}
    sources = iter(range(2, 200))

    def attempt(label: str, *lines: bytes) -> None:
        pop = _FromAddress("127.0.0.1", port, f"127.0.0.{next(sources)}")
        try:
            for line in lines:
                try:
                    reply = pop._shortcmd(line.decode("utf-8", "surrogateescape"))
                except poplib.error_proto as refused:
                    reply = refused.args[0]
                    replies[label] = reply
                    return
                replies[label] = reply
        finally:
            pop.close()

    def plain(user: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return b"AUTH PLAIN " + token.encode()

    attempt("plain as stored", plain(USER, DECOMPOSED))
    attempt("plain composed", plain(USER, PASSWORD))
    attempt("plain fullwidth name", plain(FULLWIDTH_NAME, PASSWORD))
    attempt("plain prohibited name", plain("jos\ue000", PASSWORD))
    attempt("user/pass composed", b"USER " + USER.encode(), b"PASS " + PASSWORD.encode())
    attempt(
        "utf8 user/pass fullwidth",
        b"UTF8",
        b"USER " + FULLWIDTH_NAME.encode(),
        b"PASS " + PASSWORD.encode(),
    )
    attempt("utf8 prohibited name", b"UTF8", b"USER " + "jos\ue000".encode())
    return replies


#: Dovecot refuses non-ASCII user names by default (``auth_username_chars``): allow them all,
#: and answer failures at once.
DOVECOT_UTF8 = "auth_username_chars =\nauth_failure_delay = 0\n"


class TestNormalisedCredentials:
    """A decomposed stored password and other forms of a name, pobox beside Dovecot."""

    async def test_pobox(self, tmp_path: Path) -> None:
        """pobox: every form logs in; a prohibited name gets -ERR [AUTH], no traceback."""
        async with pobox_serve(
            tmp_path / "srv", users={USER: DECOMPOSED}, auth_mechanisms="PLAIN"
        ) as proc:
            replies = await asyncio.to_thread(_logins, proc.port)
            log = proc.log.read_text()

        assert {
            "plain as stored": b"+OK Logged in.",
            "plain composed": b"+OK Logged in.",
            "plain fullwidth name": b"+OK Logged in.",
            "plain prohibited name": b"-ERR [AUTH] Authentication failed.",
            "user/pass composed": b"+OK Logged in.",
            "utf8 user/pass fullwidth": b"+OK Logged in.",
            "utf8 prohibited name": b"-ERR [AUTH] User name not allowed by SASLprep (RFC 4013).",
        } == replies
        assert "Traceback" not in log

    def test_dovecot(self) -> None:
        """Dovecot (the reference) compares octets as sent: no SASLprep, no UTF8 command.

        Its {PLAIN} entry holds the decomposed octets: only those log in; the composed
        password (what keyboards type) and the fullwidth name fail, and UTF8 is unknown.
        """
        with (
            searchable_tmpdir() as tmp,
            running_dovecot(tmp, users={USER: DECOMPOSED}, extra_config=DOVECOT_UTF8) as dove,
        ):
            replies = _logins(dove.port)
            log = dove.log_tail(200)

        assert "Traceback" not in log, log
        failed = b"-ERR [AUTH] Authentication failed."
        assert {
            "plain as stored": b"+OK Logged in.",
            "plain composed": failed,
            "plain fullwidth name": failed,
            "plain prohibited name": failed,
            "user/pass composed": failed,
            "utf8 user/pass fullwidth": b"-ERR Unknown command.",
            "utf8 prohibited name": b"-ERR Unknown command.",
        } == replies
