"""The framer and the command parser of pobox.protocol._parser."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import pytest

from pobox.protocol._parser import (
    LINE_TOO_LONG,
    Command,
    LineFramer,
    ParseFailure,
    Verb,
    parse_command,
    parse_number,
)


def lines(framer: LineFramer) -> list[object]:
    """Take every complete line the framer holds."""
    out: list[object] = []
    while (line := framer.next_line()) is not None:
        out.append(line)
    return out


class TestLineFramer:
    """LineFramer: CRLF or LF framing with a hard line limit."""

    def test_crlf_and_lf(self):
        """Lines end at CRLF or at a bare LF; the line end is removed."""
        framer = LineFramer()
        framer.feed(b"a\r\nb\nc\r\n")

        assert [b"a", b"b", b"c"] == lines(framer)

    def test_only_one_cr_removed(self):
        """Only the CR right before LF is part of the line end."""
        framer = LineFramer()
        framer.feed(b"a\r\r\n\r\n\rb\n")

        assert [b"a\r", b"", b"\rb"] == lines(framer)

    def test_partial_line_waits(self):
        """A line is returned only once its LF has arrived, whatever the pieces."""
        framer = LineFramer()

        framer.feed(b"US")
        assert framer.next_line() is None
        framer.feed(b"ER a\r")
        assert framer.next_line() is None
        framer.feed(b"\nNO")

        assert [b"USER a"] == lines(framer)
        framer.feed(b"OP\n")
        assert [b"NOOP"] == lines(framer)

    def test_limit(self):
        """255 octets with the line end pass; 256 are LINE_TOO_LONG."""
        framer = LineFramer()
        framer.feed(b"a" * 253 + b"\r\n" + b"b" * 254 + b"\r\n" + b"c" * 254 + b"\n")

        assert [b"a" * 253, LINE_TOO_LONG, b"c" * 254] == lines(framer)

    def test_custom_limit(self):
        """max_line sets the limit."""
        framer = LineFramer(max_line=4)
        framer.feed(b"ab\r\nabc\r\nabcd\n")

        assert [b"ab", LINE_TOO_LONG, LINE_TOO_LONG] == lines(framer)

    def test_long_partial_line_is_dropped(self):
        """Over 255 octets without LF are dropped at once and reported once at the LF."""
        framer = LineFramer()
        framer.feed(b"x" * 256)

        assert framer.next_line() is None
        assert 0 == len(framer._buf)

        framer.feed(b"y" * 100)
        assert framer.next_line() is None
        framer.feed(b"z\r\nNOOP\r\n")
        assert [LINE_TOO_LONG, b"NOOP"] == lines(framer)

    def test_255_octets_without_lf_are_kept(self):
        """255 octets without LF are kept: the LF may still make a valid line of them."""
        framer = LineFramer()
        framer.feed(b"x" * 254)
        assert framer.next_line() is None

        framer.feed(b"\n")

        assert [b"x" * 254] == lines(framer)

    def test_at_eof(self):
        """at_eof is true once the peer closed and no complete line is left."""
        framer = LineFramer()
        framer.feed(b"a\nb")
        assert not framer.at_eof

        framer.feed(b"")
        assert not framer.at_eof
        assert b"a" == framer.next_line()
        assert framer.next_line() is None
        assert framer.at_eof

    def test_discard_buffered(self):
        """discard_buffered drops what is buffered, the skipping of a long line included."""
        framer = LineFramer()
        framer.feed(b"x" * 300)
        framer.next_line()
        framer.feed(b"abc\nSTAT\r\n")

        assert 10 == framer.discard_buffered()
        framer.feed(b"NOOP\r\n")
        assert [b"NOOP"] == lines(framer)


class TestParseCommand:
    """parse_command: keyword, arguments, and what is not a command."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"STAT", Command(Verb.STAT, (), b"")),
            (b"stat", Command(Verb.STAT, (), b"")),
            (b"RETR 1", Command(Verb.RETR, (b"1",), b"1")),
            (b"Top 1  2 ", Command(Verb.TOP, (b"1", b"2"), b"1  2 ")),
            (b"PASS  a b ", Command(Verb.PASS, (b"a", b"b"), b" a b ")),
            (b"USER a\tb", Command(Verb.USER, (b"a", b"b"), b"a\tb")),
            (b"LIST \xff", Command(Verb.LIST, (b"\xff",), b"\xff")),
        ],
    )
    def test_commands(self, line, expected):
        """The keyword is case-insensitive; args split on whitespace; rest is raw."""
        assert expected == parse_command(line)

    @pytest.mark.parametrize(
        "keyword",
        b"USER PASS APOP AUTH STLS CAPA QUIT STAT LIST RETR DELE NOOP RSET TOP UIDL".split(),
    )
    def test_every_keyword(self, keyword):
        """Every RFC 1939/2449/2595/5034 keyword is known."""
        parsed = parse_command(keyword.lower())

        assert isinstance(parsed, Command)
        assert keyword.decode() == parsed.verb.value

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            (b"", "Empty command."),
            (b" \t ", "Empty command."),
            (b"\x00", "Invalid characters in command."),
            (b"NOOP\x1f", "Invalid characters in command."),
            (b"NOOP\x7f", "Invalid characters in command."),
            (b"PASS a\rb", "Invalid characters in command."),
            (b"FOO", "Unknown command."),
            (b" STAT", "Unknown command."),
            (b"STAT\t", "Unknown command."),
            (b"\xc3\x9cSER a", "Unknown command."),
        ],
    )
    def test_failures(self, line, reason):
        """Empty lines, control octets and unknown keywords are failures with a reason."""
        assert ParseFailure(reason) == parse_command(line)

    def test_repr_masks_password(self):
        """The repr of a PASS command does not show the password."""
        text = repr(parse_command(b"PASS hunter2"))

        assert "Command(verb=<Verb.PASS>, args=<masked>)" == text

    def test_repr_of_other_commands(self):
        """The repr of other commands shows the arguments."""
        assert "Command(verb=<Verb.RETR: 'RETR'>, args=(b'1',))" == repr(parse_command(b"RETR 1"))


class TestParseNumber:
    """parse_number: ASCII decimal only."""

    @pytest.mark.parametrize(
        ("arg", "expected"),
        [
            (b"0", 0),
            (b"1", 1),
            (b"007", 7),
            (b"99999999999999999999", 99999999999999999999),
            (b"999999999999999999999", -1),
            (b"1" * 200, -1),
            (b"", None),
            (b"-1", None),
            (b"+1", None),
            (b"1.0", None),
            (b"0x1", None),
            (b" 1", None),
            (b"1 ", None),
            ("\u0661".encode(), None),
            ("\u00b2".encode(), None),
        ],
    )
    def test_parse(self, arg, expected):
        """Digits give their value, over 20 digits give -1, anything else None."""
        assert expected == parse_number(arg)
