"""The shell's side of STLS: nothing buffered in plaintext survives into TLS."""

from __future__ import annotations

import asyncio

from pobox.server._session import _take_buffered


class TestTakeBuffered:
    """_take_buffered empties a StreamReader without waiting."""

    async def test_takes_everything_buffered(self):
        """Bytes already in the reader are returned, all of them."""
        reader = asyncio.StreamReader()
        reader.feed_data(b"CAPA\r\n")
        reader.feed_data(b"USER mallory\r\n")

        assert b"CAPA\r\nUSER mallory\r\n" == _take_buffered(reader)

    async def test_empty_does_not_wait(self):
        """With nothing buffered it returns at once, and the reader still works after."""
        reader = asyncio.StreamReader()

        taken = _take_buffered(reader)
        reader.feed_data(b"NOOP\r\n")

        assert b"" == taken
        assert b"NOOP\r\n" == await asyncio.wait_for(reader.read(100), 5)

    async def test_eof(self):
        """At end of file it returns what was buffered and stops."""
        reader = asyncio.StreamReader()
        reader.feed_data(b"QUIT\r\n")
        reader.feed_eof()

        assert b"QUIT\r\n" == _take_buffered(reader)
