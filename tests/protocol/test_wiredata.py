"""WireData: message octets the shell sends itself (``sendfile``), accounted by the core."""

from __future__ import annotations

import pytest

from pobox.protocol import (
    PAUSED,
    ClientWorkarounds,
    EndOfMessage,
    LocalProtocolError,
    MessageData,
    WireData,
)
from tests.protocol.helpers import Msg, logged_in, run


def _retr(size: int, command: bytes = b"RETR 1\r\n", **kwargs: object):
    conn = logged_in([Msg(size, "u1")], **kwargs)
    events, out = run(conn, command)
    assert PAUSED == events[-1]
    assert b"" == out
    return conn


class TestWireData:
    """The reply line is queued before the shell's octets, the terminator after them."""

    def test_reply_line_first_then_terminator(self):
        """WireData queues the reply line; EndOfMessage adds only ``.CRLF`` after a CRLF."""
        conn = _retr(10)
        conn.send(WireData(10, ends_line=True))
        assert b"+OK 10 octets\r\n" == conn.data_to_send()
        conn.send(EndOfMessage())
        _, out = run(conn)
        assert b".\r\n" == out
        assert (1, 13) == (conn.stats.retr_count, conn.stats.retr_bytes)

    def test_no_line_end_gets_crlf(self):
        """Octets that do not end a line get the CRLF the encoder would add."""
        conn = _retr(5)
        conn.send(WireData(5, ends_line=False))
        conn.data_to_send()
        conn.send(EndOfMessage())
        assert b"\r\n.\r\n" == run(conn)[1]
        assert 5 + 5 == conn.stats.retr_bytes

    def test_then_encoder_continues_at_line_start(self):
        """After octets ending a line, a dot first in the next chunk is stuffed."""
        conn = _retr(20)
        conn.send(WireData(4, ends_line=True))
        conn.data_to_send()
        conn.send(MessageData(b".x\r\n"))
        conn.send(EndOfMessage())
        assert b"..x\r\n.\r\n" == run(conn)[1]

    def test_top_refused(self):
        """TOP cuts lines: WireData is refused, and nothing is queued."""
        conn = _retr(10, b"TOP 1 0\r\n")
        with pytest.raises(LocalProtocolError, match="WireData"):
            conn.send(WireData(10, ends_line=True))
        assert b"" == conn.data_to_send()

    def test_workarounds_refused(self):
        """Client workarounds change octets: WireData is refused."""
        conn = _retr(10, workarounds=ClientWorkarounds.OUTLOOK_NO_NULS)
        with pytest.raises(LocalProtocolError, match="WireData"):
            conn.send(WireData(10, ends_line=True))

    def test_after_a_held_cr_refused(self):
        """A CR held back from the last chunk must reach the wire first: refused."""
        conn = _retr(10)
        conn.send(MessageData(b"ab\r"))
        with pytest.raises(LocalProtocolError, match="WireData"):
            conn.send(WireData(5, ends_line=True))
