"""Command framing and parsing: bytes in, :class:`Command` (or a parse failure) out.

Framing (RFC 1939 §3, RFC 2449 §4): a command line ends with CRLF; a bare LF is accepted
too, as Dovecot and Courier do, because hand-typed sessions (``nc``, some telnets) send it.
A command line, CRLF included, may be at most 255 octets (RFC 2449 §4).  A longer line is
*not* buffered: the framer drops its bytes as they arrive and reports one
:data:`LINE_TOO_LONG` when its end is seen, so memory stays bounded whatever the client sends.
Each byte is scanned once (the scan resumes where the last one stopped): framing is O(n).

May import: the standard library only.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "LINE_TOO_LONG",
    "MAX_COMMAND_LINE",
    "Command",
    "LineFramer",
    "ParseFailure",
    "Verb",
    "parse_command",
    "parse_number",
]

#: RFC 2449 §4: "command lines ... MUST NOT exceed 255 octets, including the terminating CRLF".
MAX_COMMAND_LINE: Final = 255

#: The longest decimal we parse for a message number or TOP line count.  Longer numbers are
#: still *valid syntax* for "a number too big to name a message" (RFC 1939 leaves the range
#: open), so callers map this to "no such message", never to a crash or a bignum.
_MAX_DIGITS: Final = 20


class _TooLong(enum.Enum):
    LINE_TOO_LONG = enum.auto()


#: Returned by :meth:`LineFramer.next_line` in place of a line that was too long.
LINE_TOO_LONG: Final = _TooLong.LINE_TOO_LONG


class LineFramer:
    """Split a byte stream into lines of at most ``max_line`` octets (CRLF included)."""

    __slots__ = ("_buf", "_discarding", "_eof", "_scan", "max_line")

    def __init__(self, max_line: int = MAX_COMMAND_LINE) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._discarding = False
        self._eof = False
        self.max_line = max_line

    def feed(self, data: bytes) -> None:
        """Append received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def at_eof(self) -> bool:
        """Whether the peer closed and every complete line has been taken."""
        return self._eof and self._buf.find(b"\n", self._scan) < 0

    def discard_buffered(self) -> int:
        """Drop everything buffered (used after STLS, RFC 2595 §4); return the count dropped."""
        dropped = len(self._buf)
        self._buf.clear()
        self._scan = 0
        self._discarding = False
        return dropped

    def next_line(self) -> bytes | _TooLong | None:
        """Return the next line without its line ending, :data:`LINE_TOO_LONG`, or ``None``.

        ``None`` means no complete line is buffered yet.
        """
        nl = self._buf.find(b"\n", self._scan)
        if nl < 0:
            self._scan = len(self._buf)
            if self._scan > self.max_line:
                # Too long already: forget the bytes, remember only that we are skipping.
                self._discarding = True
                self._buf.clear()
                self._scan = 0
            return None
        buf = self._buf
        self._scan = 0
        if self._discarding or nl + 1 > self.max_line:
            del buf[: nl + 1]
            self._discarding = False
            return LINE_TOO_LONG
        line = bytes(buf[: nl - 1 if nl and buf[nl - 1] == 0x0D else nl])  # CRLF or LF
        del buf[: nl + 1]
        return line


class Verb(enum.Enum):
    """The POP3 command keywords pobox knows (RFC 1939, 2449, 2595, 5034, 6856)."""

    USER = "USER"
    PASS = "PASS"
    APOP = "APOP"
    AUTH = "AUTH"
    STLS = "STLS"
    CAPA = "CAPA"
    QUIT = "QUIT"
    STAT = "STAT"
    LIST = "LIST"
    RETR = "RETR"
    DELE = "DELE"
    NOOP = "NOOP"
    RSET = "RSET"
    TOP = "TOP"
    UIDL = "UIDL"
    UTF8 = "UTF8"
    LANG = "LANG"

    #: Members are singletons compared by identity: hashed by identity too, in C.  Enum's own
    #: ``__hash__`` is a Python call, and every command looks its verb up three times.
    __hash__ = object.__hash__


_VERBS: Final = {v.value.encode(): v for v in Verb}

#: The bytes no command line may hold: the C0 controls but TAB, and DEL (one C search, not
#: a Python step per byte).
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Command(NamedTuple):
    """A parsed command line: the verb and its raw arguments.

    ``rest`` is everything after the keyword and one space, unsplit (PASS takes it whole:
    RFC 1939 §7 lets a password contain spaces); ``args`` is ``rest`` split on whitespace.
    Immutable, and a named tuple rather than a frozen dataclass: one is built per command
    line, and a frozen dataclass's ``__init__`` sets each field through a Python call.
    """

    verb: Verb
    args: tuple[bytes, ...]
    rest: bytes

    def __repr__(self) -> str:
        """Mask the argument of PASS so a repr never shows a password."""
        if self.verb is Verb.PASS:
            return "Command(verb=<Verb.PASS>, args=<masked>)"
        return f"Command(verb={self.verb!r}, args={self.args!r})"


@dataclass(frozen=True, slots=True)
class ParseFailure:
    """A line that is not a command; ``reason`` is the text of the ``-ERR`` reply."""

    reason: str


def parse_command(line: bytes) -> Command | ParseFailure:
    """Parse one command line (without its line ending).

    Keywords are case-insensitive (RFC 1939 §3).  A NUL or other control byte (except
    TAB) anywhere in the line makes it invalid.
    """
    if not line.strip():
        return ParseFailure("Empty command.")
    if _CONTROL.search(line) is not None:
        return ParseFailure("Invalid characters in command.")
    keyword, _, rest = line.partition(b" ")
    verb = _VERBS.get(keyword.upper())
    if verb is None:
        return ParseFailure("Unknown command.")
    return Command(verb, tuple(rest.split()), rest)


def parse_number(arg: bytes) -> int | None:
    """Parse a non-negative decimal argument; ``None`` if it is not one.

    Only ASCII digits count: ``+1``, ``-1``, ``1.0``, ``0x1`` and Unicode digits do not.
    Numbers beyond :data:`_MAX_DIGITS` digits are reported as ``-1`` ("too big"), so the
    caller can say "no such message" instead of "invalid".
    """
    if not arg or not arg.isdigit():  # bytes.isdigit() is ASCII-only
        return None
    if len(arg) > _MAX_DIGITS:
        return -1
    return int(arg)
