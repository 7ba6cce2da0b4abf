"""The load generator's checks: a wrong RETR content is an error, not a fast answer.

A tiny POP3 server on 127.0.0.1:0 serves one maildrop; the generator is given the messages it
should get back. No Dovecot, no pobox: this is about the checker.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import loadgen

MESSAGE = b"Subject: x\r\n\r\n.dot line\r\nplain\r\n.\r\n"


def stuffed(message: bytes) -> bytes:
    return b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in message.split(b"\r\n")
    )


async def serve_once(served: list[bytes]) -> tuple[asyncio.Server, int]:
    """Start a POP3 server whose maildrop holds ``served`` (stuffed on the wire)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK ready\r\n")
        while line := await reader.readline():
            verb, _, arg = line.strip().partition(b" ")
            if verb in {b"USER", b"PASS"}:
                writer.write(b"+OK\r\n")
            elif verb == b"STAT":
                writer.write(b"+OK %d %d\r\n" % (len(served), sum(map(len, served))))
            elif verb in {b"LIST", b"UIDL"}:
                lines = b"".join(
                    b"%d %s\r\n" % (n, str(len(m)).encode() if verb == b"LIST" else b"u%d" % n)
                    for n, m in enumerate(served, 1)
                )
                writer.write(b"+OK\r\n" + lines + b".\r\n")
            elif verb == b"RETR":
                writer.write(b"+OK\r\n" + stuffed(served[int(arg) - 1]) + b".\r\n")
            elif verb == b"QUIT":
                writer.write(b"+OK\r\n")
                break
            await writer.drain()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def load(served: list[bytes], expected: list[bytes], kind: str = "session") -> loadgen.LoadResult:
    """Run one session (or bulk for a moment) against a server holding ``served``."""

    async def main() -> loadgen.LoadResult:
        server, port = await serve_once(served)
        async with server:
            spec = loadgen.Spec(
                kind,
                "127.0.0.1",
                port,
                ("u",),
                "pw",
                1,
                0.05 if kind == "bulk" else 60.0,
                len(served),
                ops_limit=0 if kind == "bulk" else 1,
                expected=tuple(expected),
            )
            return await loadgen._run(spec)

    return asyncio.run(main())


class TestUnstuff:
    """``loadgen.unstuff``."""

    def test_removes_the_added_dots(self) -> None:
        """A stuffed body, first line and later lines, comes back as it was."""
        assert MESSAGE == loadgen.unstuff(stuffed(MESSAGE))
        assert b".a\r\nb\r\n" == loadgen.unstuff(b"..a\r\nb\r\n")


class TestContentCheck:
    """Every RETR is compared, un-stuffed, with the delivered messages."""

    def test_the_right_content_passes(self) -> None:
        """The messages served as delivered: one session, no error."""
        other = b"Subject: y\r\n\r\nbody\r\n"
        result = load([MESSAGE, other], [MESSAGE, other])
        assert (1, 0) == (result.ops, result.errors), result.first_error

    def test_another_order_passes(self) -> None:
        """A server numbering the maildrop in another order still returns each message once."""
        other = b"Subject: y\r\n\r\nbody\r\n"
        result = load([other, MESSAGE], [MESSAGE, other])
        assert (1, 0) == (result.ops, result.errors), result.first_error

    def test_a_changed_byte_of_the_same_size_fails(self) -> None:
        """One byte changed, size unchanged (LIST and RETR agree): still an error."""
        wrong = MESSAGE.replace(b"plain", b"plaiN")
        result = load([wrong], [MESSAGE])
        assert (0, 1) == (result.ops, result.errors)
        assert "content differs" in result.first_error

    def test_the_same_message_twice_fails(self) -> None:
        """Two RETRs returning the same delivered message: an error."""
        result = load([MESSAGE, MESSAGE], [MESSAGE, MESSAGE.replace(b"x", b"y")])
        assert (0, 1) == (result.ops, result.errors)

    def test_bulk_checks_content(self) -> None:
        """Bulk RETRs of a changed message are counted as errors, none as done."""
        wrong = MESSAGE.replace(b"plain", b"plaiN")
        result = load([wrong], [MESSAGE], kind="bulk")
        assert (0, True) == (result.ops, result.errors > 0)
