"""Mail location templates as Dovecot writes them: ``maildir:~/Maildir``, ``maildir:/srv/%d/%n``.

A location is ``maildir:<path>[:<KEY>=<value>...]`` (Dovecot's ``mail_location`` and the
userdb ``mail`` field). Dovecot splits it on ``:`` and joins the parts around an empty one, so
``::`` stands for a literal colon; the options after the path (``INDEX=``, ``CONTROL=``,
``LAYOUT=``, ...) tune Dovecot's own files and are ignored here. A location without a format
prefix is taken as a Maildir path.

Variables (Dovecot's "user variables", https://doc.dovecot.org/configuration_manual/
config_file/config_variables/), expanded in the path only:

======  ===============  =====================================================
short   long             value
======  ===============  =====================================================
``%u``  ``%{user}``      the full user name (``alice@example.org``)
``%n``  ``%{username}``  the part before the first ``@`` (the whole name if none)
``%d``  ``%{domain}``    the part after the first ``@``, empty if none
``%h``  ``%{home}``      the home directory
``%%``                   a literal ``%``
======  ===============  =====================================================

Dovecot's ``%[-][0]<width>``, ``%<offset>.<width>`` (substring and zero padding) and the ``L``
(lower case) and ``U`` (upper case) modifiers are supported, e.g. ``%Ln`` or ``%1Ln``; other
modifiers (``H``, ``M``, ...) and variables are refused. A leading ``~`` stands for the home
directory. The expanded path must be absolute.

User names come from the client: a value that would escape its directory (containing ``/``
or NUL, or equal to ``.`` or ``..``) is refused, whatever the user database allowed.

May import: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = ["LocationError", "MailLocation", "parse_location"]

#: ``[-][0]<width>[.[0][-]<width>]<modifiers>`` after ``%`` (Dovecot's ``var_expand``).
_SPEC = re.compile(r"(-?)(0?)(\d*)(?:\.(0?)(-?)(\d*))?([A-Z]*)")
_SUPPORTED_MODIFIERS = frozenset("LU")
_SHORT_NAMES = {"u": "user", "n": "username", "d": "domain", "h": "home"}
#: Values that come from the login name and must stay inside one path component.
_NAME_VARIABLES = frozenset({"user", "username", "domain"})


class LocationError(ValueError):
    """A mail location is malformed or cannot be expanded for a user."""


@dataclass(frozen=True, slots=True)
class MailLocation:
    """A parsed mail location: the path template and the (ignored) options.

    Attributes:
        template: the path, still holding ``%`` variables and ``~``.
        options: the ``KEY=value`` options that followed the path, kept for reference.
    """

    template: str
    options: tuple[str, ...]

    def expand(self, name: str, home: str | None) -> PurePosixPath:
        """Return the Maildir path for the user ``name`` with home directory ``home``.

        Raises:
            LocationError: a variable is unknown, a value is unsafe or missing, or the result
                is not an absolute path.
        """
        local, at, domain = name.partition("@")
        values: dict[str, str | None] = {
            "user": name,
            "username": local if at else name,
            "domain": domain,
            "home": home or None,
        }
        path = _expand(self.template, values)
        if path == "~" or path.startswith("~/"):
            if not home:
                msg = f"user {name!r} has no home directory, needed for '~' in {self.template!r}"
                raise LocationError(msg)
            path = home.rstrip("/") + path[1:]
        if not path.startswith("/"):
            msg = f"mail location {self.template!r} gives {path!r}, which is not absolute"
            raise LocationError(msg)
        return PurePosixPath(path)


def parse_location(location: str) -> MailLocation:
    """Parse ``maildir:<path>[:<options>]`` (or a bare path) into a :class:`MailLocation`.

    Raises:
        LocationError: another mailbox format, or no path.
    """
    if location.startswith("maildir:"):
        rest = location[len("maildir:") :]
    elif re.match(r"[a-z0-9]+:", location):
        # "mbox:~/mail", "sdbox:/srv/mail/%u": a format pobox does not read.
        msg = f"mail location {location!r}: only the maildir format is supported"
        raise LocationError(msg)
    else:
        rest = location
    template, *options = _split_colons(rest)
    if not template:
        msg = f"mail location {location!r} has no path"
        raise LocationError(msg)
    return MailLocation(template=template, options=tuple(options))


def _split_colons(text: str) -> list[str]:
    """Split on ``:``, where ``::`` is a literal colon (Dovecot's ``split_next_arg``)."""
    raw = text.split(":")
    parts: list[str] = []
    index = 0
    while index < len(raw):
        part = raw[index]
        index += 1
        while index < len(raw) and raw[index] == "":
            index += 1
            if index == len(raw):
                break  # a trailing ":" is ignored
            part = f"{part}:{raw[index]}"
            index += 1
        parts.append(part)
    return parts


def _expand(template: str, values: Mapping[str, str | None]) -> str:
    """Expand Dovecot's ``%`` variables in ``template``."""
    out: list[str] = []
    index = 0
    while index < len(template):
        char = template[index]
        if char != "%":
            out.append(char)
            index += 1
            continue
        spec = _SPEC.match(template, index + 1)
        assert spec is not None  # every part of the pattern is optional
        index = spec.end()
        if index >= len(template):
            msg = f"mail location {template!r} ends inside a variable"
            raise LocationError(msg)
        if template[index] == "{":
            close = template.find("}", index)
            if close < 0:
                msg = f"mail location {template!r} has an unterminated %{{"
                raise LocationError(msg)
            name = template[index + 1 : close]
            index = close + 1
        else:
            name = template[index]
            index += 1
            if name == "%":
                out.append("%")
                continue
            name = _SHORT_NAMES.get(name, f"%{name}")
        unsupported = "".join(sorted(set(spec.group(7)) - _SUPPORTED_MODIFIERS))
        if unsupported:
            msg = f"mail location {template!r}: modifier {unsupported} is not supported"
            raise LocationError(msg)
        out.append(_format(template, name, values, spec))
    return "".join(out)


def _format(template: str, name: str, values: Mapping[str, str | None], spec: re.Match[str]) -> str:
    """Return one variable's value after modifiers, offset and width."""
    if name not in values:
        msg = f"mail location {template!r}: unknown variable {name!r}"
        raise LocationError(msg)
    value = values[name]
    if value is None:
        msg = f"mail location {template!r} needs the home directory, but the user has none"
        raise LocationError(msg)
    if name in _NAME_VARIABLES and ("/" in value or "\0" in value or value in {".", ".."}):
        msg = f"user name part {value!r} cannot be used in a path"
        raise LocationError(msg)
    for modifier in spec.group(7):
        value = value.lower() if modifier == "L" else value.upper()
    sign, zero, number, zero2, sign2, number2 = spec.group(1, 2, 3, 4, 5, 6)
    width = int(number or 0) * (-1 if sign else 1)
    offset = 0
    zero_padding = bool(zero)
    if spec.group(6) is not None:  # "<offset>.<width>"
        offset = width
        width = int(number2 or 0) * (-1 if sign2 else 1)
        zero_padding = bool(zero2)
    value = value[offset:]  # a negative offset keeps the last -offset characters
    if width == 0:
        return value
    if zero_padding:
        return value.rjust(width, "0")
    if width < 0:
        width = max(len(value) + width, 0)
    return value[:width]
