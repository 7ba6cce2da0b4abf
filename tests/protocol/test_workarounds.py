"""Dovecot's ``pop3_client_workarounds`` in the core: ``outlook-no-nuls`` and ``oe-ns-eoh``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pobox.protocol import ClientWorkarounds, HeaderEnd, MessageEncoder, RetrieveMessage
from pobox.protocol._replies import WorkaroundEncoder

from .helpers import Msg, logged_in, pieces, retrieve, run

BOTH = ClientWorkarounds.OUTLOOK_NO_NULS | ClientWorkarounds.OE_NS_EOH


def wire(workarounds: ClientWorkarounds, stored: bytes, command: bytes = b"RETR 1\r\n") -> bytes:
    """What the client reads for ``command`` on one message holding ``stored``."""
    conn = logged_in([Msg(len(stored), "u1")], workarounds=workarounds)
    events, _ = run(conn, command)
    assert isinstance(events[0], RetrieveMessage)
    return retrieve(conn, stored, range(0, len(stored), 3))[1]


def header_end(stored: bytes, cuts: range | tuple[int, ...] = ()) -> bool:
    """Whether :class:`HeaderEnd` finds a header end in ``stored`` split at ``cuts``."""
    finder = HeaderEnd()
    for piece in pieces(stored, cuts):
        finder.feed_stored(piece)
    return finder.found


class TestOutlookNoNuls:
    """outlook-no-nuls sends each NUL as 0x80, one octet for one."""

    def test_nuls_become_0x80(self) -> None:
        """RETR sends 0x80 where the message holds NUL."""
        out = wire(ClientWorkarounds.OUTLOOK_NO_NULS, b"A: 1\n\na\0b\0\n")
        assert b"+OK 11 octets\r\nA: 1\r\n\r\na\x80b\x80\r\n.\r\n" == out

    def test_top_too(self) -> None:
        """TOP sends 0x80 where the message holds NUL."""
        out = wire(ClientWorkarounds.OUTLOOK_NO_NULS, b"A: \0\n\nx\ny\n", b"TOP 1 0\r\n")
        assert b"+OK\r\nA: \x80\r\n\r\n.\r\n" == out

    def test_off_by_default(self) -> None:
        """Without the workaround a NUL is sent as it is stored."""
        assert b"+OK 6 octets\r\nA: \0\r\n\r\n.\r\n" == wire(ClientWorkarounds.NONE, b"A: \0\n\n")


class TestOeNsEoh:
    """oe-ns-eoh adds the missing empty line that ends the header, before the terminator."""

    @pytest.mark.parametrize(
        ("stored", "sent"),
        [
            (b"A: 1\nB: 2\n", b"A: 1\r\nB: 2\r\n\r\n"),
            (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n\r\n"),
            (b"A: 1", b"A: 1\r\n\r\n"),
            (b"", b"\r\n"),
        ],
    )
    def test_added_when_missing(self, stored: bytes, sent: bytes) -> None:
        """A message without an empty line gets one CRLF more before ``.CRLF``."""
        out = wire(ClientWorkarounds.OE_NS_EOH, stored)
        assert out.endswith(b" octets\r\n" + sent + b".\r\n")

    @pytest.mark.parametrize(
        "stored", [b"A: 1\n\nbody\n", b"A: 1\r\n\r\n", b"\nbody\n", b"\r\nbody", b"A: 1\n\n"]
    )
    def test_not_added_when_present(self, stored: bytes) -> None:
        """A message with a header end (or an empty header) is sent as without the workaround."""
        assert wire(ClientWorkarounds.NONE, stored) == wire(ClientWorkarounds.OE_NS_EOH, stored)

    def test_top_of_header_only_message(self) -> None:
        """TOP of a message without a header end gets it too, as Dovecot sends it."""
        out = wire(ClientWorkarounds.OE_NS_EOH, b"A: 1\nB: 2\n", b"TOP 1 5\r\n")
        assert b"+OK\r\nA: 1\r\nB: 2\r\n\r\n.\r\n" == out

    def test_dots_still_stuffed(self) -> None:
        """Both workarounds on: dots are stuffed, NULs replaced, the header end added."""
        out = wire(BOTH, b"A: \0\n.B: 2\n")
        assert b"+OK 11 octets\r\nA: \x80\r\n..B: 2\r\n\r\n.\r\n" == out


class TestHeaderEnd:
    """HeaderEnd finds ``CRLFCRLF`` (or a first empty line) across any chunk boundary."""

    @given(
        st.lists(st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b":", b"\0"]), max_size=12),
        st.lists(st.integers(0, 24), max_size=6),
    )
    def test_same_as_whole(self, parts: list[bytes], cuts: list[int]) -> None:
        """Split anyhow, the answer is that of the normalized whole message."""
        stored = b"".join(parts)
        encoder = MessageEncoder()
        whole = b"\r\n" + encoder.normalize(stored)
        assert (b"\r\n\r\n" in whole) == header_end(stored, tuple(cuts))

    def test_encoder_and_finder_agree(self) -> None:
        """The encoder adds the header end exactly when the finder finds none."""
        for stored in (b"A\n", b"A\n\n", b"A\r", b"A\r\n\r", b"\r", b""):
            enc = WorkaroundEncoder(ClientWorkarounds.OE_NS_EOH)
            data = enc.encode(stored) + enc.stuff(enc.flush()) + enc.finish()
            plain = MessageEncoder()
            base = plain.encode(stored) + plain.stuff(plain.flush()) + plain.finish()
            added = 0 if header_end(stored) else 2
            assert len(base) + added == len(data), stored
