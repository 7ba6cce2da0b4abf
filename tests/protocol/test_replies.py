"""Reply formatting and the message encoder of pobox.protocol._replies."""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pobox.protocol import MessageEncoder
from pobox.protocol._replies import TopFilter, err, ok


def encode(*chunks: bytes) -> bytes:
    """Encode ``chunks`` as one message and finish it."""
    encoder = MessageEncoder()
    return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()


def top(lines: int, *chunks: bytes) -> bytes:
    """Run normalized ``chunks`` through a TopFilter."""
    topfilter = TopFilter(lines)
    return b"".join(topfilter.feed(c) for c in chunks)


class TestStatusLines:
    """ok() and err(): one status line each."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (ok(), b"+OK\r\n"),
            (ok("2 320"), b"+OK 2 320\r\n"),
            (ok("caf\u00e9"), b"+OK caf\xc3\xa9\r\n"),
            (err("No."), b"-ERR No.\r\n"),
            (err("No.", None), b"-ERR No.\r\n"),
            (err("No.", ""), b"-ERR No.\r\n"),
            (err("Locked.", "IN-USE"), b"-ERR [IN-USE] Locked.\r\n"),
            (err("Try later.", "SYS/TEMP"), b"-ERR [SYS/TEMP] Try later.\r\n"),
        ],
    )
    def test_format(self, line, expected):
        """+OK/-ERR, a space and the text, an RFC 2449 code in brackets, CRLF."""
        assert expected == line


class TestMessageEncoder:
    """MessageEncoder: stored bytes to the wire form of RFC 1939 §3."""

    @pytest.mark.parametrize(
        ("chunks", "expected"),
        [
            ((b"a\nb\n",), b"a\r\nb\r\n.\r\n"),
            ((b"a\r\nb\r\n",), b"a\r\nb\r\n.\r\n"),
            ((b"a\rb",), b"a\rb\r\n.\r\n"),
            ((b".a\n.\n",), b"..a\r\n..\r\n.\r\n"),
            ((b"a\r", b"\n.b"), b"a\r\n..b\r\n.\r\n"),
            ((b"a\n", b".b"), b"a\r\n..b\r\n.\r\n"),
            ((b"a\r", b"", b"\n"), b"a\r\n.\r\n"),
            ((b"a\r",), b"a\r\r\n.\r\n"),
            ((b"",), b".\r\n"),
            ((), b".\r\n"),
        ],
    )
    def test_encode(self, chunks, expected):
        """LF becomes CRLF, dots are stuffed across chunks, the terminator is added."""
        assert expected == encode(*chunks)

    @pytest.mark.parametrize(
        ("chunks", "expected"),
        [
            ((b"." + b"a" * 2000 + b"\n.b\n",), b".." + b"a" * 2000 + b"\r\n..b\r\n.\r\n"),
            ((b"a" * 2000 + b".a.\n",), b"a" * 2000 + b".a.\r\n.\r\n"),
            (
                (b"a" * 2000 + b"\n", b"." + b"a" * 2000),
                b"a" * 2000 + b"\r\n.." + b"a" * 2000 + b"\r\n.\r\n",
            ),
            ((b"a" * 2000, b"." + b"a" * 2000), b"a" * 2000 + b"." + b"a" * 2000 + b"\r\n.\r\n"),
            ((b"a" * 2000 + b"\n.\n",), b"a" * 2000 + b"\r\n..\r\n.\r\n"),
        ],
    )
    def test_encode_sparse_dots(self, chunks, expected):
        """Long LF chunks with few dots (the one-byte search) are stuffed the same way."""
        assert expected == encode(*chunks)

    @pytest.mark.parametrize(
        ("chunks", "expected"),
        [
            ((b"a.\n" * 400,), b"a.\r\n" * 400 + b".\r\n"),
            ((b".a\n" * 400,), b"..a\r\n" * 400 + b".\r\n"),
            ((b"ab\n" * 400 + b".c\n",), b"ab\r\n" * 400 + b"..c\r\n.\r\n"),
            ((b".b\n" + b"ab\n" * 400,), b"..b\r\n" + b"ab\r\n" * 400 + b".\r\n"),
            ((b"ab\n" * 400 + b"a.b\n",), b"ab\r\n" * 400 + b"a.b\r\n.\r\n"),
            ((b"ab\n" * 400, b".c\n"), b"ab\r\n" * 400 + b"..c\r\n.\r\n"),
        ],
        ids=["dense-dots-mid-line", "dense-dots", "sparse-dot", "dot-first", "no-dot", "cut"],
    )
    def test_encode_short_lf_lines(self, chunks, expected):
        """LF mail of short lines (a hostile file's: not the regex's) is stuffed the same way."""
        assert expected == encode(*chunks)

    @given(
        st.lists(
            st.lists(st.sampled_from([b".", b"a", b"\n", b"\r", b"a" * 600]), max_size=30).map(
                b"".join
            ),
            max_size=5,
        )
    )
    def test_encode_matches_the_rfc_rule(self, chunks):
        """However the message is cut into chunks, the output is CRLF-normalized and stuffed."""
        whole = b"".join(chunks)
        normalized = whole.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if normalized and not normalized.endswith(b"\r\n"):
            normalized += b"\r\n"
        expected = re.sub(rb"(?m)^\.", b"..", normalized.replace(b"\r\n", b"\n")).replace(
            b"\n", b"\r\n"
        )
        assert expected + b".\r\n" == encode(*chunks)

    @pytest.mark.parametrize(
        ("chunks", "expected"),
        [
            ((b"." + b"a" * 2000 + b"\r\n.b\r\n",), b".." + b"a" * 2000 + b"\r\n..b\r\n.\r\n"),
            ((b"a" * 2000 + b"\r\n",), b"a" * 2000 + b"\r\n.\r\n"),
            (
                (b"a" * 2000, b"." + b"a" * 2000 + b"\r\n"),
                b"a" * 2000 + b"." + b"a" * 2000 + b"\r\n.\r\n",
            ),
            (
                (b"a" * 2000 + b"\r", b"\n." + b"a" * 2000 + b"\r\n"),
                b"a" * 2000 + b"\r\n.." + b"a" * 2000 + b"\r\n.\r\n",
            ),
            (
                (b"a" * 2000 + b"\r\n", b"\nb" + b"a" * 2000 + b"\r\n"),
                b"a" * 2000 + b"\r\n\r\nb" + b"a" * 2000 + b"\r\n.\r\n",
            ),
            ((b"a" * 2000 + b"\nb\r\n.c\r\n",), b"a" * 2000 + b"\r\nb\r\n..c\r\n.\r\n"),
            ((b"a" * 2000 + b"\n.b\r\n",), b"a" * 2000 + b"\r\n..b\r\n.\r\n"),
            ((b"\n" + b"a" * 2000 + b"\r\r",), b"\r\n" + b"a" * 2000 + b"\r\r\r\n.\r\n"),
            ((b".\r\n.\r\n",), b"..\r\n..\r\n.\r\n"),
            ((b".\r.\n",), b"..\r.\r\n.\r\n"),
            (((b"." + b"a" * 38 + b"\r\n") * 40,), (b".." + b"a" * 38 + b"\r\n") * 40 + b".\r\n"),
            ((b"ab\r\n.c\r\n" * 100,), b"ab\r\n..c\r\n" * 100 + b".\r\n"),
        ],
        ids=[
            "dot-first",
            "no-dot",
            "dot-first-mid-line",
            "crlf-split-before-dot",
            "bare-lf-first",
            "bare-lf",
            "bare-lf-before-dot",
            "bare-lf-first-cr-last",
            "dense-dots",
            "dense-dots-bare-lf",
            "dense-dots-found-late",
            "short-lines",
        ],
    )
    def test_encode_crlf(self, chunks, expected):
        """CRLF mail: dots found and stuffed in one search; a bare LF still becomes CRLF."""
        assert expected == encode(*chunks)

    @given(
        lines=st.lists(
            st.sampled_from([b"", b".", b"..", b"a", b".a", b"a" * 700, b"\r", b"x\ny"]),
            max_size=40,
        ),
        cut_at=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    )
    def test_crlf_mail_matches_the_rfc_rule(self, lines, cut_at):
        """CRLF mail cut anywhere (inside a CRLF, before a dot) is stuffed as RFC 1939 says."""
        whole = b"\r\n".join(lines)
        cuts = sorted({0, len(whole), *(c for c in cut_at if c < len(whole))})
        chunks = [whole[a:b] for a, b in itertools.pairwise(cuts)]
        normalized = whole.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if normalized and not normalized.endswith(b"\r\n"):
            normalized += b"\r\n"
        expected = re.sub(rb"(?m)^\.", b"..", normalized.replace(b"\r\n", b"\n")).replace(
            b"\n", b"\r\n"
        )
        assert expected + b".\r\n" == encode(*chunks)

    def test_flush(self):
        """flush hands back a held CR once."""
        encoder = MessageEncoder()

        assert b"a" == encoder.normalize(b"a\r")
        assert b"\r" == encoder.flush()
        assert b"" == encoder.flush()

    def test_normalize_does_not_stuff(self):
        """normalize only fixes line ends; stuff adds the dots."""
        encoder = MessageEncoder()

        assert b".a\r\n.b" == encoder.normalize(b".a\n.b")
        assert b"..a\r\n..b" == encoder.stuff(b".a\r\n.b")
        assert b"" == encoder.stuff(b"")


class TestTopFilter:
    """TopFilter: header, blank line, and n body lines of normalized data."""

    @pytest.mark.parametrize(
        ("lines", "chunks", "expected"),
        [
            (0, (b"A\r\n\r\nx\r\n",), b"A\r\n\r\n"),
            (1, (b"A\r\n\r\nx\r\ny\r\n",), b"A\r\n\r\nx\r\n"),
            (1, (b"A\r\n", b"\r\n", b"x", b"\r\n", b"y\r\n"), b"A\r\n\r\nx\r\n"),
            (0, (b"A", b"\r\n", b"B\r\n"), b"A\r\nB\r\n"),
            (5, (b"A\r\n\r\nx",), b"A\r\n\r\nx"),
        ],
    )
    def test_feed(self, lines, chunks, expected):
        """The output stops right after the n-th body line."""
        assert expected == top(lines, *chunks)

    def test_done(self):
        """done turns true at the last wanted line, and later input gives nothing."""
        topfilter = TopFilter(1)

        topfilter.feed(b"A\r\n\r\n")
        assert not topfilter.done
        topfilter.feed(b"x\r\n")
        assert topfilter.done
        assert b"" == topfilter.feed(b"y\r\n")

    def test_not_blank_after_partial_line(self):
        """A CRLF that ends a line begun in the chunk before is not a blank line."""
        topfilter = TopFilter(0)

        topfilter.feed(b"A")
        topfilter.feed(b"\r\n")

        assert not topfilter.done
