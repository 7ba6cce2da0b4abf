"""User names as the user database sees them: Dovecot's ``auth_username_format``.

A client may type ``Alice`` or ``ALICE@Example.ORG``; Dovecot turns every name it is given,
at login and at delivery, into the name the user database is asked for with
``auth_username_format`` (default ``%Lu``: the whole name, lowercased). pobox does the same
with the same template language, restricted to what makes sense for a user name:

- ``%u`` the whole name, ``%n`` the part before the last ``@`` (the whole name if it has
  none), ``%d`` the part after it (empty if none); the long forms ``%{user}``,
  ``%{username}`` and ``%{domain}`` are the same;
- modifiers between ``%`` and the variable: ``L`` lowercases, ``U`` uppercases, ``T`` trims
  trailing white space (``%Ln``, ``%LTu``), as Dovecot's;
- ``%%`` is a literal ``%``; any other text is copied as it is.

The template is checked when the configuration is read (:func:`parse_format`), so an
unknown variable stops the start-up, never a login.

Folder names (``pop3_folders``, the userdb field of that name, delivery into a folder) follow
one rule too, :func:`folder_name`, used by the configuration and by every store.

May import: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_FORMAT", "INBOX", "UsernameFormat", "folder_name", "parse_format"]

#: The folder every maildrop has, and the only one POP3 serves by default.
INBOX: Final = "INBOX"
#: A folder name besides ``INBOX``: a Maildir++ folder's name as on disk, without its leading
#: dot (Dovecot's ``Junk``, ``Spam``, Outlook's ``Junk E-mail``, ``Lists.pobox`` for a
#: subfolder, ``Courrier ind&AOk-sirable``: IMAP's modified UTF-7, as Dovecot stores a name
#: that is not ASCII), at most 100 characters; nothing that could reach outside the maildir
#: (``/``, ``..``, a leading dot) or break a header line (``X-Folder:``) or a log line
#: (control characters).
_FOLDER_NAME: Final = re.compile(r"[A-Za-z0-9_+&-](?:[A-Za-z0-9_+&,. -]{0,98}[A-Za-z0-9_+&-])?")


def folder_name(name: str) -> str | None:
    """Return folder name ``name`` in its canonical form, ``None`` if it is not acceptable.

    ``INBOX`` in any case is ``INBOX``. Not acceptable: empty, over 100 characters, a ``/``,
    a control or non-ASCII character, a leading or trailing dot or space, ``..``.
    """
    if name.upper() == INBOX:
        return INBOX
    if _FOLDER_NAME.fullmatch(name) is None or ".." in name:
        return None
    return name


#: Dovecot's default (``auth_username_format = %Lu``).
DEFAULT_FORMAT: Final = "%Lu"

_LONG_NAMES: Final = {"user": "u", "username": "n", "domain": "d"}
_MODIFIERS: Final[dict[str, Callable[[str], str]]] = {
    "L": str.lower,
    "U": str.upper,
    "T": str.rstrip,
}


def _variable(name: str, which: str) -> str:
    local, at, domain = name.rpartition("@")
    if which == "u":
        return name
    if which == "n":
        return local if at else name
    return domain if at else ""


@dataclass(frozen=True, slots=True)
class UsernameFormat:
    """A parsed ``auth_username_format``: call it with a name to get the database's name."""

    template: str
    #: Literal text, or ``(variable, modifiers)``.
    parts: tuple[str | tuple[str, str], ...]

    def __call__(self, name: str) -> str:
        """Return ``name`` as the user database knows it."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            which, modifiers = part
            value = _variable(name, which)
            # Dovecot applies the modifiers right to left: %LTu trims, then lowercases.
            for modifier in reversed(modifiers):
                value = _MODIFIERS[modifier](value)
            out.append(value)
        return "".join(out)


def parse_format(template: str) -> UsernameFormat:
    """Parse an ``auth_username_format`` template.

    Raises:
        ValueError: an unknown variable or modifier, a ``%`` at the end, or a template that
            uses no variable at all (every user would be one user).
    """
    parts: list[str | tuple[str, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        i += 1
        if char != "%":
            literal.append(char)
            continue
        modifiers = ""
        while i < len(template) and template[i] in _MODIFIERS:
            modifiers += template[i]
            i += 1
        if i >= len(template):
            msg = f"{template!r}: a % without a variable at the end"
            raise ValueError(msg)
        char = template[i]
        i += 1
        if char == "%" and not modifiers:
            literal.append("%")
            continue
        if char == "{":
            end = template.find("}", i)
            name = template[i:end] if end >= 0 else template[i:]
            if end < 0 or name not in _LONG_NAMES:
                msg = f"{template!r}: unknown variable %{{{name}}} (known: user, username, domain)"
                raise ValueError(msg)
            char = _LONG_NAMES[name]
            i = end + 1
        elif char not in "und":
            msg = f"{template!r}: unknown variable %{modifiers}{char} (known: %u, %n, %d; L, U, T)"
            raise ValueError(msg)
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append((char, modifiers))
    if literal:
        parts.append("".join(literal))
    if not any(isinstance(part, tuple) for part in parts):
        msg = f"{template!r}: uses no variable (%u, %n or %d): every name would be one user"
        raise ValueError(msg)
    return UsernameFormat(template, tuple(parts))
