"""RFC 6856 (POP3 support for UTF-8): SASLprep for credentials, and the LANG catalogue.

SASLprep (RFC 4013) is the stringprep (RFC 3454) profile RFC 6856 §2 asks for: "Servers that
include the USER argument in the UTF8 capability ... SHOULD apply SASLprep ... to the
arguments of the USER and PASS commands", treated as *query* strings (unassigned code points
allowed).  The tables are the standard library's :mod:`stringprep` and the Unicode 3.2
normalisation it is defined on (``unicodedata.ucd_3_2_0``); nothing here is a hand-made table.

LANG (RFC 6856 §3) switches the human-readable text of ``+OK``/``-ERR`` lines.  Only the text
changes: the status indicator, RFC 2449 response codes and every number a client may parse
stay as they are; replies whose text is machine-readable (STAT, LIST, UIDL, the octet count
of RETR) are not in the catalogue and pass through untouched.  A translation is looked up
from the English text the core (or the shell, via ``LoginRejected`` and the like) wrote, so
the English texts stay the single source and any text without a translation falls back to
English instead of failing.

May import: the standard library only.
"""

from __future__ import annotations

import re
import stringprep
import unicodedata
from typing import Final

__all__ = [
    "DEFAULT_LANGUAGE",
    "LANGUAGES",
    "localize",
    "lookup_language",
    "saslprep",
    "translate",
]

#: The language pobox's texts are written in (the catalogues translate from it), and the
#: server's default language (RFC 6856 §3 "LANG *") unless ``pop3_language`` says otherwise.
DEFAULT_LANGUAGE: Final = "en"

#: The languages LANG offers, tag (RFC 5646) to description in that language.
LANGUAGES: Final[dict[str, str]] = {"en": "English", "de": "Deutsch"}

#: RFC 4647 §2.1 basic language range (what LANG takes), or "*".
_LANGUAGE_RANGE: Final = re.compile(rb"\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")

# ------------------------------------------------------------------ SASLprep (RFC 4013)

#: RFC 4013 §2.3: the prohibited output, as stringprep (RFC 3454) tables.
_PROHIBITED: Final = (
    stringprep.in_table_c12,  # non-ASCII space characters
    stringprep.in_table_c21,  # ASCII control characters
    stringprep.in_table_c22,  # non-ASCII control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties or deprecated
    stringprep.in_table_c9,  # tagging characters
)


def saslprep(text: str) -> str:
    """Prepare ``text`` as a SASLprep query string (RFC 4013, RFC 3454 §7).

    Returns:
        the prepared string: non-ASCII spaces mapped to SPACE, "commonly mapped to nothing"
        characters removed, NFKC-normalised.

    Raises:
        ValueError: the result is empty, holds a prohibited character, or breaks the
            bidirectional rule (RFC 3454 §6); the message says which.
    """
    # Printable ASCII (U+0020-U+007E) is left as it is by every step of the profile: no
    # character of it is mapped, changed by NFKC, prohibited (C.2.1 is the ASCII controls)
    # or right-to-left. Most names and passwords are such, and each login prepares two.
    if text and text.isascii() and text.isprintable():
        return text
    return _saslprep_profile(text)


def _saslprep_profile(text: str) -> str:
    """SASLprep's steps, in order (:func:`saslprep`, which skips them for printable ASCII)."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    if not prepared:
        raise ValueError("empty after SASLprep")
    for char in prepared:
        if any(table(char) for table in _PROHIBITED):
            raise ValueError(f"prohibited character U+{ord(char):04X}")
    # RFC 3454 §6: right-to-left text may hold no left-to-right character and must start
    # and end with a right-to-left one.
    in_d1 = stringprep.in_table_d1
    if any(in_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not (in_d1(prepared[0]) and in_d1(prepared[-1]))
    ):
        raise ValueError("mixes right-to-left and left-to-right text")
    return prepared


# ------------------------------------------------------------------ LANG (RFC 6856 §3)


def lookup_language(arg: bytes, default: str = DEFAULT_LANGUAGE) -> str | None:
    """Return the offered language tag a LANG argument picks, or ``None``.

    ``*`` is ``default`` (the server's default language, RFC 6856 §3); otherwise RFC 4647
    §3.4 "lookup": the range, then the range with its last subtag cut off, and so on,
    compared without regard to case (``DE-de`` picks ``de``).
    """
    if not _LANGUAGE_RANGE.fullmatch(arg):
        return None
    if arg == b"*":
        return default
    subtags = arg.decode("ascii").lower().split("-")
    while subtags:
        tag = "-".join(subtags)
        if tag in LANGUAGES:
            return tag
        subtags.pop()
    return None


#: German texts: the English text (exactly as the core and the shell write it) to German.
_DE: Final[dict[str, str]] = {
    # The core's own replies, and the default greeting (login_greeting).
    "pobox ready.": "pobox bereit.",
    "Empty command.": "Leerer Befehl.",
    "Invalid characters in command.": "Ungültige Zeichen im Befehl.",
    "Unknown command.": "Unbekannter Befehl.",
    "Already logged in.": "Bereits angemeldet.",
    "Not logged in.": "Nicht angemeldet.",
    "Command not available.": "Befehl nicht verfügbar.",
    "Too many arguments.": "Zu viele Argumente.",
    "Too many bad commands.": "Zu viele fehlerhafte Befehle.",
    "Line too long.": "Zeile zu lang.",
    "Invalid line count.": "Ungültige Zeilenzahl.",
    "USER takes exactly one argument: a user name.": (
        "USER erwartet genau ein Argument: einen Benutzernamen."
    ),
    "PASS takes one argument: the password.": "PASS erwartet ein Argument: das Passwort.",
    "APOP takes two arguments: a user name and an MD5 digest.": (
        "APOP erwartet zwei Argumente: einen Benutzernamen und einen MD5-Hash."
    ),
    "AUTH takes a mechanism and an optional initial response.": (
        "AUTH erwartet ein Verfahren und optional eine erste Antwort."
    ),
    "RETR takes one argument: a message number.": (
        "RETR erwartet ein Argument: eine Nachrichtennummer."
    ),
    "DELE takes one argument: a message number.": (
        "DELE erwartet ein Argument: eine Nachrichtennummer."
    ),
    "TOP takes two arguments: a message number and a line count.": (
        "TOP erwartet zwei Argumente: eine Nachrichtennummer und eine Zeilenzahl."
    ),
    "User name is not valid UTF-8.": "Der Benutzername ist kein gültiges UTF-8.",
    "Password is not valid UTF-8.": "Das Passwort ist kein gültiges UTF-8.",
    "User name not allowed by SASLprep (RFC 4013).": (
        "Der Benutzername ist nach SASLprep (RFC 4013) nicht erlaubt."
    ),
    "Password not allowed by SASLprep (RFC 4013).": (
        "Das Passwort ist nach SASLprep (RFC 4013) nicht erlaubt."
    ),
    "No user name given; send USER first.": "Kein Benutzername angegeben; zuerst USER senden.",
    "Plaintext authentication disallowed on non-secure connections.": (
        "Klartext-Anmeldung ist auf unverschlüsselten Verbindungen nicht erlaubt."
    ),
    "Unsupported authentication mechanism.": "Nicht unterstütztes Anmeldeverfahren.",
    "Invalid base64 data in initial response.": "Ungültige Base64-Daten in der ersten Antwort.",
    "Invalid base64 data in continued response.": "Ungültige Base64-Daten in der Antwort.",
    "Authentication aborted by client.": "Anmeldung vom Client abgebrochen.",
    "Authentication response too long.": "Anmeldeantwort zu lang.",
    "Already using TLS.": "TLS ist bereits aktiv.",
    "Begin TLS negotiation now.": "TLS-Aushandlung jetzt beginnen.",
    "Capability list follows": "Liste der Fähigkeiten folgt",
    "Language listing follows": "Liste der Sprachen folgt",
    "Language changed.": "Sprache geändert.",
    "Invalid language range.": "Ungültiger Sprachbereich.",
    "UTF-8 mode on.": "UTF-8-Modus eingeschaltet.",
    "Logged in.": "Angemeldet.",
    "Logging out.": "Abmeldung.",
    # Texts the shell hands the core (LoginRejected, MessageUnavailable).
    "Authentication failed.": "Anmeldung fehlgeschlagen.",
    "Temporary authentication failure.": "Vorübergehender Fehler bei der Anmeldung.",
    "Too many failed logins, try again later.": (
        "Zu viele fehlgeschlagene Anmeldungen, bitte später erneut versuchen."
    ),
    "Mailbox is locked by another POP3 session, try later.": (
        "Das Postfach ist von einer anderen POP3-Sitzung gesperrt, bitte später versuchen."
    ),
    "Cannot open the mailbox, try later.": (
        "Das Postfach kann nicht geöffnet werden, bitte später versuchen."
    ),
    "Message is no longer available.": "Die Nachricht ist nicht mehr verfügbar.",
    "Message was removed by another process.": (
        "Die Nachricht wurde von einem anderen Prozess entfernt."
    ),
    "Cannot read the message, try later.": (
        "Die Nachricht kann nicht gelesen werden, bitte später versuchen."
    ),
}

#: German texts with values in them: English pattern ({} is a value) to German.
_DE_PATTERNS: Final = (
    ("Message {} marked to be deleted.", "Nachricht {} zum Löschen markiert."),
    ("Message {} is deleted.", "Nachricht {} ist gelöscht."),
    ("There's no message {}.", "Es gibt keine Nachricht {}."),
    ("Invalid message number: {}", "Ungültige Nachrichtennummer: {}"),
    ("Unsupported language: {}", "Nicht unterstützte Sprache: {}"),
    ("maildrop has {} messages ({} octets)", "Postfach hat {} Nachrichten ({} Oktette)"),
    (
        "Logging out, but {} message(s) could not be deleted.",
        "Abmeldung, aber {} Nachricht(en) konnten nicht gelöscht werden.",
    ),
)


def _compile(patterns: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple(
        (re.compile("(.*?)".join(re.escape(part) for part in english.split("{}"))), german)
        for english, german in patterns
    )


_CATALOGUES: Final[dict[str, tuple[dict[str, str], tuple[tuple[re.Pattern[str], str], ...]]]] = {
    "de": (_DE, _compile(_DE_PATTERNS)),
}

#: A status line: indicator, optional RFC 2449 response code, text.
_STATUS: Final = re.compile(rb"(\+OK |-ERR )(\[[^]]*\] )?(.*)\r\n", re.DOTALL)


def localize(text: str, language: str) -> str:
    """Return ``text`` (an English reply text) in ``language``, or unchanged if none."""
    catalogue = _CATALOGUES.get(language)
    if catalogue is None:
        return text
    exact, patterns = catalogue
    translated = exact.get(text)
    if translated is not None:
        return translated
    for pattern, template in patterns:
        found = pattern.fullmatch(text)
        if found is not None:
            return template.format(*found.groups())
    return text


def translate(line: bytes, language: str) -> bytes:
    """Return the status line ``line`` with its text in ``language`` where there is one.

    Anything else (a continuation ``+ ...``, a text without a translation, English) comes
    back unchanged.
    """
    match = _STATUS.fullmatch(line)
    if match is None:
        return line
    indicator, code, raw = match.groups()
    text = raw.decode("utf-8", "replace")
    translated = localize(text, language)
    if translated is text:
        return line
    return indicator + (code or b"") + translated.encode() + b"\r\n"
