"""RFC 6856 end to end: Python's poplib against a real ``pobox serve`` on loopback.

poplib has ``utf8()`` and sends user names and passwords as UTF-8; LANG has no method, so it
goes through ``_shortcmd``/``_longcmd`` as raw commands.
"""

from __future__ import annotations

import asyncio
import poplib
import unicodedata
from pathlib import Path

import pytest

from pobox.config import KEYS
from pobox.protocol._i18n import LANGUAGES
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
