"""The DATA decoder (:mod:`pobox.delivery._data`): wire lines in, unstuffed message out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pobox.delivery._data import DataDecoder, DataError


def _decode(
    lines: list[bytes], *, max_size: int | None = None, max_line: int = 1000
) -> tuple[bytes, DataError | None, bool]:
    """Feed ``lines``; return the message taken out in batches, the error, and whether it ended."""
    decoder = DataDecoder(max_size=max_size, max_line=max_line)
    out = bytearray()
    for line in lines:
        if decoder.feed(line):
            break
        out += decoder.take(8)
    out += decoder.take(0)
    return bytes(out), decoder.error, decoder.done


def _wire_lines(message: bytes) -> list[bytes]:
    """Return ``message`` (CRLF lines) as a client sends it: dot-stuffed, then ``.CRLF``."""
    lines = message.split(b"\r\n")[:-1]
    return [(b"." * line.startswith(b".")) + line + b"\r\n" for line in lines] + [b".\r\n"]


class TestEnd:
    """Where the message ends (RFC 5321 §4.5.2)."""

    def test_single_dot_line_ends_the_message(self) -> None:
        """``.CRLF`` ends the message and is not part of it."""
        assert (b"a\r\nb\r\n", None, True) == _decode([b"a\r\n", b"b\r\n", b".\r\n"])

    def test_empty_message(self) -> None:
        """``.CRLF`` right after DATA is an empty message."""
        assert (b"", None, True) == _decode([b".\r\n"])

    def test_bare_lf_dot_ends_nothing(self) -> None:
        """``<LF>.<LF>`` inside a line is content, not the end (no SMTP smuggling)."""
        assert (b"a\n.\nb\r\n", None, False) == _decode([b"a\n.\nb\r\n"])

    def test_dot_after_a_too_long_line_is_content(self) -> None:
        """The last part of an over-long line is no end marker, even when it is ``.CRLF``."""
        decoder = DataDecoder(max_size=None, max_line=10)
        assert (False, False) == (decoder.feed(b"x" * 20), decoder.feed(b".\r\n"))
        assert decoder.feed(b".\r\n")
        assert DataError.LINE_TOO_LONG is decoder.error

    def test_feeding_after_the_end_is_an_error(self) -> None:
        """Nothing may follow the end-of-data line."""
        decoder = DataDecoder(max_size=None, max_line=10)
        decoder.feed(b".\r\n")
        with pytest.raises(ValueError, match="after the end"):
            decoder.feed(b"x\r\n")


class TestUnstuffing:
    """A leading dot is removed (RFC 5321 §4.5.2)."""

    def test_doubled_dot_becomes_one(self) -> None:
        """``..x`` is ``.x`` in the message."""
        assert (b".x\r\n..\r\n", None, True) == _decode([b"..x\r\n", b"...\r\n", b".\r\n"])

    def test_single_leading_dot_is_dropped(self) -> None:
        """A line starting with one dot and more characters loses the dot."""
        assert (b"x\r\n", None, True) == _decode([b".x\r\n", b".\r\n"])

    @given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r\n", b"")), max_size=20))
    def test_stuffed_message_comes_back(self, lines: list[bytes]) -> None:
        """Any message, stuffed as a client sends it, decodes to itself."""
        message = b"".join(line + b"\r\n" for line in lines)
        assert (message, None, True) == _decode(_wire_lines(message))


class TestLimits:
    """Limits broken are reported at the end; nothing more is kept."""

    def test_message_over_max_size(self) -> None:
        """More wire octets than max_size: TOO_BIG, the message dropped, read to the end."""
        assert (b"", DataError.TOO_BIG, True) == _decode(
            [b"12345\r\n", b"12345\r\n", b".\r\n"], max_size=10
        )

    def test_message_at_max_size(self) -> None:
        """Exactly max_size wire octets (stuffing and CRLF counted) are accepted."""
        assert (b".23\r\n", None, True) == _decode([b"..23\r\n", b".\r\n"], max_size=6)

    def test_received_counts_wire_octets(self) -> None:
        """``received`` counts the octets on the wire, the end-of-data line excluded."""
        decoder = DataDecoder(max_size=None, max_line=100)
        for line in (b"..a\r\n", b"bc\r\n", b".\r\n"):
            decoder.feed(line)
        assert 9 == decoder.received

    def test_line_over_max_line(self) -> None:
        """A whole line longer than max_line (CRLF counted) is LINE_TOO_LONG."""
        assert (b"", DataError.LINE_TOO_LONG, True) == _decode(
            [b"ok\r\n", b"x" * 9 + b"\r\n", b".\r\n"], max_line=10
        )

    def test_line_in_parts(self) -> None:
        """A line that came in parts (no CRLF at the end of the first) is LINE_TOO_LONG."""
        assert (b"", DataError.LINE_TOO_LONG, True) == _decode(
            [b"xxxx", b"xx\r\n", b".\r\n"], max_line=100
        )

    def test_first_limit_broken_is_reported(self) -> None:
        """A message too big and then with a long line reports TOO_BIG."""
        assert (b"", DataError.TOO_BIG, True) == _decode(
            [b"12345\r\n", b"x" * 50 + b"\r\n", b".\r\n"], max_size=5, max_line=20
        )

    def test_error_replies(self) -> None:
        """Each limit has its RFC 3463 reply."""
        assert ["552 5.3.4 Message too big for system", "500 5.5.2 Line too long"] == [
            DataError.TOO_BIG.reply,
            DataError.LINE_TOO_LONG.reply,
        ]


class TestBatches:
    """The message is handed out in batches: memory holds one at most."""

    def test_nothing_below_the_minimum(self) -> None:
        """take() hands out nothing until ``minimum`` octets are pending."""
        decoder = DataDecoder(max_size=None, max_line=100)
        decoder.feed(b"abc\r\n")
        assert (b"", b"abc\r\n", b"") == (decoder.take(6), decoder.take(5), decoder.take(0))

    def test_pending_octets_stay_below_a_batch(self) -> None:
        """With take() after each line, no more than a batch and a line is ever pending."""
        decoder = DataDecoder(max_size=None, max_line=100)
        largest = 0
        for _ in range(1000):
            decoder.feed(b"y" * 70 + b"\r\n")
            largest = max(largest, len(decoder.take(1024)))
        assert 1024 + 72 > largest >= 1024
