"""The mbox format (``pobox.storage.mbox._format``) and the UIDL list (``._uidlist``).

Pure functions over bytes: every expected offset, size and UIDL is worked out by hand.
"""

from __future__ import annotations

import pytest

from pobox.storage.mbox._format import (
    FromQuoter,
    NotAnMbox,
    ParsedMessage,
    from_line,
    is_from_line,
    parse_mbox,
)
from pobox.storage.mbox._uidlist import UidList, assign_uidls

FROM = b"From a@b Mon Dec  7 15:00:00 2026\n"


def parse(data: bytes) -> list[ParsedMessage]:
    """Parse ``data`` as a whole file."""
    return parse_mbox(lambda offset, size: data[offset : offset + size], len(data))


def served(data: bytes) -> list[bytes]:
    """Return the content served of each message of ``data``."""
    return [
        b"".join(data[offset : offset + length] for offset, length in message.segments)
        for message in parse(data)
    ]


class TestFromLine:
    """Which lines start a message."""

    @pytest.mark.parametrize(
        "line",
        [
            b"From a@b Mon Dec  7 15:00:00 2026",
            b"From MAILER-DAEMON Tue Jan 13 01:02:03 1998",
            b"From a@b  Mon Dec 7 15:00 2026",
            b"From a@b Mon Dec  7 15:00:00 CET 2026",
            b"From a@b Mon Dec  7 15:00:00 2026 +0100",
            b"From a@b Mon Dec  7 15:00:00 2026 remote from uucphost",
            b"From a@b Mon Dec  7 15:00:00 2026\r",
        ],
    )
    def test_from_lines(self, line: bytes) -> None:
        """ctime(3) dates and the variants Dovecot takes start a message."""
        assert is_from_line(line)

    @pytest.mark.parametrize(
        "line",
        [
            b"From here on, nothing changed",
            b"From a@b",
            b"From  Mon Dec  7 15:00:00 2026",
            b"From a@b Mon Dec  7 2026",
            b">From a@b Mon Dec  7 15:00:00 2026",
            b"From a@b Mon Dec  7 15:00:00 2026" + b"x" * 1024,
        ],
    )
    def test_not_from_lines(self, line: bytes) -> None:
        """Prose, lines without a date, quoted lines and overlong lines do not."""
        assert not is_from_line(line)

    def test_from_line_written(self) -> None:
        """Delivery writes ``From <sender> <asctime in UTC>``."""
        expected = b"From a@example.org Thu Jan  1 00:00:00 1970\n"
        assert expected == from_line("a@example.org", 0)

    @pytest.mark.parametrize("sender", [None, "", "a b@c", "ä@b", "a\tb"])
    def test_odd_sender_is_mailer_daemon(self, sender: str | None) -> None:
        """A null, spaced or non-ASCII sender is written as MAILER-DAEMON."""
        assert from_line(sender, 0).startswith(b"From MAILER-DAEMON Thu Jan  1 ")


class TestParse:
    """Where messages start and end (as Dovecot reads them)."""

    def test_empty_file(self) -> None:
        """An empty file holds no message."""
        assert [] == parse(b"")

    def test_not_an_mbox(self) -> None:
        """A file that does not start with ``From `` is refused."""
        with pytest.raises(NotAnMbox):
            parse(b"Subject: x\n\nbody\n")

    def test_separator_line_is_not_content(self) -> None:
        """The empty line before the next From_ line, and the last LF, are separators."""
        data = FROM + b"one\n\n" + FROM + b"two\n\n"
        assert [b"one\n", b"two\n"] == served(data)

    def test_no_empty_line_before_from(self) -> None:
        """A From_ line right after a line ends the message before it (Dovecot does this)."""
        data = FROM + b"one\n" + FROM + b"two"
        assert [b"one", b"two"] == served(data)

    def test_from_without_date_does_not_split(self) -> None:
        """An unquoted ``From `` line that is no From_ line stays in the message."""
        data = FROM + b"a\n\nFrom here on\n\n"
        assert [b"a\n\nFrom here on\n"] == served(data)

    def test_quoted_from_is_not_unquoted(self) -> None:
        """``>From`` lines are served as stored (Dovecot does not unquote)."""
        data = FROM + b"a\n>From a@b Mon Dec  7 15:00:00 2026\n>>From x\n\n"
        assert [b"a\n>From a@b Mon Dec  7 15:00:00 2026\n>>From x\n"] == served(data)

    def test_empty_messages(self) -> None:
        """Empty messages, in the middle and at the end."""
        data = FROM + b"\n" + FROM + b"\n"
        assert [b"", b""] == served(data)

    def test_offsets_and_sizes(self) -> None:
        """Regions cover the file; sizes count LF as CRLF."""
        data = FROM + b"a\r\nb\n\n" + FROM + b"c"
        first, second = parse(data)
        assert (0, 40, 5, 6) == (first.start, first.end, first.stored, first.wire)
        assert (40, len(data), 1, 1) == (second.start, second.end, second.stored, second.wire)

    def test_content_length_is_not_trusted(self) -> None:
        """A lying Content-Length neither ends a message early nor swallows the next one."""
        data = FROM + b"Content-Length: 1\n\nlong body\n\n" + FROM + b"Content-Length: 999\n\nx\n"
        assert [b"\nlong body\n", b"\nx"] == served(data)

    def test_content_length_that_checks_out_is_used(self) -> None:
        """A Content-Length ending the body right before a From_ line (as dovecot-lda writes,
        From_ lines in the body unquoted) keeps those lines in the message, as Dovecot reads."""
        body = b"From x@y Mon Dec  7 15:00:00 2026\nsecond line\n"
        data = FROM + b"Content-Length: %d\n\n" % len(body) + body + b"\n" + FROM + b"next\n\n"
        assert [b"\n" + body, b"next\n"] == served(data)

    def test_content_length_to_the_end_of_the_file(self) -> None:
        """A Content-Length that ends the body at the end of the file (before its final LF)."""
        body = b"a\nFrom x@y Mon Dec  7 15:00:00 2026\n"
        data = FROM + b"Content-Length: %d\n\n" % len(body) + body + b"\n"
        assert [b"\n" + body] == served(data)

    @pytest.mark.parametrize("length", [b"5", b"12", b"99999", b"-1", b"x", b"1" * 40])
    def test_content_length_that_does_not_check_out(self, length: bytes) -> None:
        """A Content-Length pointing anywhere but a From_ line is ignored: From_ lines split."""
        data = (
            FROM + b"Content-Length: " + length + b"\n\nbody\n"
            b"From x@y Mon Dec  7 15:00:00 2026\nsecond\n\n"
        )
        assert [b"\nbody", b"second\n"] == served(data)

    def test_hidden_headers(self) -> None:
        """Dovecot's own headers, folded lines included, are not served; others are."""
        data = (
            FROM + b"Status: RO\nSubject: s\nX-UID: 3\nX-Keywords: a\n  b\nX-IMAPbase: 1 2\n"
            b"X-Status: A\nTo: t\n\nStatus: body line\n"
        )
        assert [b"Subject: s\nTo: t\n\nStatus: body line"] == served(data)

    def test_identity_ignores_hidden_headers_and_crlf(self) -> None:
        """A message keeps its identity when Status/X-UID are added or a CRLF becomes LF."""
        plain = parse(FROM + b"Subject: s\r\n\r\nbody\n")[0]
        marked = parse(FROM + b"Subject: s\r\nX-UID: 1\nStatus: RO\n\nbody\n")[0]
        other = parse(FROM + b"Subject: t\r\n\r\nbody\n")[0]
        assert plain.identity == marked.identity != other.identity

    def test_xuidl_header(self) -> None:
        """The X-UIDL header's value is found in the header, not in the body."""
        messages = parse(FROM + b"X-UIDL: abc\n\n" + FROM + b"\nX-UIDL: body\n")
        assert ["abc", None] == [message.xuidl for message in messages]


class TestQuoting:
    """Delivery quotes ``From `` at the start of every line, split anywhere."""

    @pytest.mark.parametrize("split", range(1, 12))
    def test_quoting_across_chunks(self, split: int) -> None:
        """``From `` becomes ``>From `` wherever the chunks split the text."""
        text = b"From x\nFrom y\nno From z\nFrom"
        quoter = FromQuoter()
        out = quoter.feed(text[:split]) + quoter.feed(text[split:]) + quoter.finish()
        assert b">From x\n>From y\nno From z\nFrom" == out

    def test_already_quoted_gets_one_more(self) -> None:
        """``>From`` lines are left as they are (mboxo quoting, as Dovecot writes)."""
        quoter = FromQuoter()
        assert b">From a\n" == quoter.feed(b">From a\n") + quoter.finish()


def message(identity: str, xuidl: str | None = None) -> ParsedMessage:
    """A parsed message with only an identity (and an X-UIDL header)."""
    return ParsedMessage(0, 0, b"From ", (), 0, 0, identity, xuidl)


class TestUidList:
    """UIDLs matched by identity, in order, never reused."""

    def test_round_trip(self) -> None:
        """The file's text reads back as the same list."""
        uidlist = UidList(validity=7, next_uid=3, entries=[("a", "1"), ("b", "2")])
        assert uidlist == UidList.parse(uidlist.render())

    @pytest.mark.parametrize("text", [b"", b"garbage\n", b"pobox-mbox-uidl 1 x 2\n", b"\xff"])
    def test_damaged_list_is_none(self, text: bytes) -> None:
        """A damaged list is ``None`` (started afresh, with a new uidvalidity)."""
        assert UidList.parse(text) is None

    def test_new_messages_numbered(self) -> None:
        """New messages get %08X%08X of uid and uidvalidity, in order."""
        current = UidList(validity=0x1234, next_uid=1)
        uidls, updated, changed = assign_uidls(
            current, [message("a"), message("b")], reuse_xuidl=False
        )
        assert ["0000000100001234", "0000000200001234"] == uidls
        assert (3, True) == (updated.next_uid, changed)

    def test_identical_messages_keep_their_own(self) -> None:
        """Two messages of one identity keep their UIDLs in order; deleting the first keeps
        the second's."""
        current = UidList(validity=1, next_uid=3, entries=[("a", "X1"), ("a", "X2")])
        both, _, changed = assign_uidls(current, [message("a"), message("a")], reuse_xuidl=False)
        removed = UidList(validity=1, next_uid=3, entries=[("a", "X2")])
        second, _, _ = assign_uidls(removed, [message("a")], reuse_xuidl=False)
        assert (["X1", "X2"], False, ["X2"]) == (both, changed, second)

    def test_never_reused(self) -> None:
        """A message that comes back after its entry was dropped gets a new UIDL."""
        current = UidList(validity=1, next_uid=2, entries=[])
        uidls, _, _ = assign_uidls(current, [message("a")], reuse_xuidl=False)
        assert ["0000000200000001"] == uidls

    def test_xuidl_reused_at_first_look(self) -> None:
        """With reuse, a unique valid X-UIDL header gives the UIDL when there is no list."""
        uidls, _, _ = assign_uidls(None, [message("a", "qpop-1"), message("b")], reuse_xuidl=True)
        assert "qpop-1" == uidls[0]
        assert "qpop-1" != uidls[1]

    def test_duplicate_xuidl_falls_back(self) -> None:
        """Two messages claiming one X-UIDL (a stranger can mail one) both get numbered UIDLs."""
        uidls, _, _ = assign_uidls(
            None, [message("a", "same"), message("b", "same")], reuse_xuidl=True
        )
        assert "same" not in uidls
        assert 2 == len(set(uidls))

    def test_invalid_xuidl_falls_back(self) -> None:
        """An X-UIDL that is no RFC 1939 unique-id (too long) is not used."""
        uidls, _, _ = assign_uidls(None, [message("a", "x" * 71)], reuse_xuidl=True)
        assert 16 == len(uidls[0])

    def test_xuidl_ignored_after_first_look(self) -> None:
        """Mail arriving after the list exists never takes its X-UIDL header."""
        current = UidList(validity=1, next_uid=1, entries=[])
        uidls, _, _ = assign_uidls(current, [message("a", "mine")], reuse_xuidl=True)
        assert ["0000000100000001"] == uidls

    def test_xuidl_ignored_without_reuse(self) -> None:
        """Without pop3_reuse_xuidl the header is never used."""
        uidls, _, _ = assign_uidls(None, [message("a", "qpop-1")], reuse_xuidl=False)
        assert "qpop-1" != uidls[0]
