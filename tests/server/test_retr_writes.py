"""A small RETR leaves in one write: reply line, message and terminator (issue 13).

Each store's path is checked (Maildir read in the event loop, Maildir read in a worker thread,
PostgreSQL read ahead and read in pages) on a plain and on a TLS connection.  The server's own
transport is wrapped in a delegate that records each ``write`` and passes it on: the bytes
still cross a real socket to a real client, which checks them too.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from pobox.server._driver import Pop3Protocol
from pobox.testing import RunningServer, running_server
from tests.integration.wire import Wire
from tests.tls.helpers import Pki, ssl_port

#: A message of about 4 KB, as delivery stores it (LF), with a line that must be stuffed.
STORED = b"Subject: t\n\n" + b"line of text\n" * 300 + b".dot line\n" + b"end\n"
#: Its RETR reply as the client must see it.
REPLY = (
    b"+OK %d octets\r\n" % (len(STORED) + STORED.count(b"\n"))
    + STORED.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
    + b".\r\n"
)


class CountingTransport:
    """A transport that records what is written through it, then writes it."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Record ``data``, and write it."""
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _count_writes(srv: RunningServer) -> CountingTransport:
    """Wrap the transport of the server's one session; return the wrapper."""
    (driver,) = srv.server._sessions
    assert isinstance(driver, Pop3Protocol)
    counting = CountingTransport(driver._transport)  # type: ignore[arg-type]
    driver._transport = counting  # type: ignore[assignment]
    return counting


async def _retr_writes(srv: RunningServer, port: int, tls: ssl.SSLContext | None) -> list[bytes]:
    """Log in, RETR message 1 three times; return what the server wrote for each RETR."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
    )
    wire = Wire(reader, writer)
    await wire.login()
    counting = _count_writes(srv)
    writes = []
    for _ in range(3):
        counting.writes.clear()
        await wire.send(b"RETR 1\r\n")
        assert REPLY == await wire.multiline()
        writes.extend(counting.writes)
    await wire.close()
    return writes


class TestOneWrite:
    """The reply line, a small message and ``.CRLF`` go out in a single transport write."""

    @pytest.mark.parametrize("inline", [128 * 1024, 0], ids=["event-loop-read", "thread-read"])
    async def test_maildir_plain(self, tmp_path: Path, inline: int) -> None:
        """Maildir on a plain connection: one write per RETR, read inline or in a thread."""
        async with running_server(tmp_path, mail_inline_read_max=inline) as srv:
            srv.deliver("alice", STORED)
            assert [REPLY] * 3 == await _retr_writes(srv, srv.port, None)

    @pytest.mark.parametrize("inline", [128 * 1024, 0], ids=["event-loop-read", "thread-read"])
    async def test_maildir_tls(self, tmp_path: Path, inline: int) -> None:
        """Maildir on implicit TLS: one write per RETR to the TLS transport."""
        pki = Pki.create(tmp_path / "pki")
        async with running_server(
            tmp_path, ssl_listen=["127.0.0.1:0"], mail_inline_read_max=inline, **pki.settings
        ) as srv:
            srv.deliver("alice", STORED)
            writes = await _retr_writes(srv, ssl_port(srv), pki.client_context())
            assert [REPLY] * 3 == writes

    async def test_postgresql(self, tmp_path: Path, pg_dsn: str) -> None:
        """PostgreSQL (read ahead, then read in pages): one write per RETR."""
        settings = {"mail_location": "postgresql", "postgresql_dsn": pg_dsn}
        async with running_server(tmp_path, **settings) as srv:
            srv.deliver("alice", STORED)
            assert [REPLY] * 3 == await _retr_writes(srv, srv.port, None)
