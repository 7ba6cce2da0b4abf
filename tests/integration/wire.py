"""A tiny raw-socket POP3 client for byte-exact integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar


class Wire:
    """A connection that sends raw bytes and reads raw replies.

    Every connection made is remembered in :attr:`opened`, so a fixture can close those a
    test left open (an unclosed socket is a ResourceWarning, which the suite treats as an
    error).
    """

    opened: ClassVar[list[Wire]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Wire.opened.append(self)

    @classmethod
    async def close_all(cls) -> None:
        """Close every connection still open."""
        while cls.opened:
            await cls.opened.pop().close()

    @classmethod
    async def connect(cls, host: str, port: int) -> Wire:
        """Connect and return the client (the greeting is not read yet)."""
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def line(self, timeout: float = 20) -> bytes:
        """Read one reply line, CRLF included."""
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def multiline(self, timeout: float = 20) -> bytes:
        """Read a status line and, if +OK, the body up to and including ``.CRLF``."""
        status = await self.line(timeout)
        if not status.startswith(b"+OK"):
            return status
        body = await asyncio.wait_for(self.reader.readuntil(b"\r\n.\r\n"), timeout)
        return status + body

    async def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes) -> bytes:
        """Send one command line and read one reply line."""
        await self.send(line + b"\r\n")
        return await self.line()

    async def login(self, user: bytes = b"alice", password: bytes = b"secret") -> None:
        """Read the greeting and log in, asserting success."""
        assert (await self.line()).startswith(b"+OK")
        assert b"+OK\r\n" == await self.command(b"USER " + user)
        assert b"+OK Logged in.\r\n" == await self.command(b"PASS " + password)

    async def attempt(self, user: bytes = b"alice", password: bytes = b"secret") -> bytes:
        """Read the greeting, send USER and PASS; return the reply to PASS, whatever it is."""
        await self.line()
        await self.command(b"USER " + user)
        return await self.command(b"PASS " + password)

    async def read_all(self, timeout: float = 5) -> bytes:
        """Read until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        """Close the connection without QUIT."""
        self.writer.close()
        # RuntimeError: the event loop is already gone
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.wait_closed()
