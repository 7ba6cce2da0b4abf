"""The delivery spool: stored form, sizes and digest, memory bound, concurrent readers."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pobox.storage.spool import Spool

#: Messages made of the octets that matter to line endings and stuffing.
_messages = st.binary(max_size=200).map(lambda raw: bytes(b"ab\r\n."[octet % 5] for octet in raw))


class TestStoredForm:
    """What the spool keeps: the message with each CRLF turned into LF."""

    @given(_messages, st.lists(st.integers(min_value=1, max_value=7), max_size=60))
    def test_pieces_give_what_one_replace_gives(self, data: bytes, cuts: list[int]) -> None:
        """However the message is cut into pieces, the result is data.replace(CRLF, LF)."""
        spool = Spool(memory_max=16)
        start = 0
        for cut in [*cuts, len(data)]:
            spool.write(data[start : start + cut])
            start += cut
        spool.write(data[start:])
        spool.finish()
        stored = data.replace(b"\r\n", b"\n")
        wire = len(stored) + stored.count(b"\n") - stored.count(b"\r\n")
        expected = (stored, len(stored), wire, hashlib.sha256(stored).hexdigest())
        assert expected == (spool.getvalue(), spool.size, spool.wire_size, spool.digest)
        spool.close()

    def test_cr_at_the_end_of_a_piece_before_lf(self) -> None:
        """A CRLF split between two pieces is one LF."""
        spool = Spool()
        spool.write(b"a\r")
        spool.write(b"\nb\r")
        spool.finish()
        assert b"a\nb\r" == spool.getvalue()


class TestMemory:
    """Memory stays bounded: past memory_max the message moves to a temporary file."""

    def test_small_message_stays_in_memory(self) -> None:
        """A message up to memory_max is kept in memory."""
        with Spool.from_bytes(b"x" * 100, memory_max=100) as spool:
            assert spool.in_memory

    def test_large_message_moves_to_a_file(self) -> None:
        """One octet more and the spool is a file; reading gives the same octets."""
        data = bytes(range(256)) * 10
        with Spool.from_bytes(data, memory_max=100) as spool:
            assert (False, data) == (spool.in_memory, b"".join(spool.chunks(99)))

    def test_readers_do_not_share_a_position(self) -> None:
        """Two readers interleaved each read the whole message from its start."""
        data = b"0123456789" * 50
        with Spool.from_bytes(data, memory_max=10) as spool:
            first, second = spool.chunks(7), spool.chunks(7)
            out_first, out_second = [], []
            for a, b in zip(first, second, strict=True):
                out_first.append(a)
                out_second.append(b)
            assert (data, data) == (b"".join(out_first), b"".join(out_second))


class TestLifecycle:
    """Reading needs a finished, open spool."""

    def test_reading_before_finish_is_refused(self) -> None:
        """A spool still being written cannot be read."""
        spool = Spool()
        spool.write(b"x")
        with pytest.raises(ValueError, match="still being written"):
            spool.getvalue()
        spool.close()

    def test_writing_after_finish_is_refused(self) -> None:
        """Nothing can be added once finished."""
        with Spool.from_bytes(b"x") as spool, pytest.raises(ValueError, match="after finish"):
            spool.write(b"y")

    def test_closed_spool_cannot_be_read(self) -> None:
        """After close the content is gone."""
        spool = Spool.from_bytes(b"x" * 1000, memory_max=10)
        spool.close()
        with pytest.raises(ValueError, match="closed"):
            spool.getvalue()
