"""RETR with ``sendfile``: a Maildir file learnt to be in wire form goes out as stored.

A real server and a real client over loopback.  Which path a RETR took shows in what went
through the server's transport (:class:`CountingTransport`): the whole message on the
encoder's path, only the reply line and ``.CRLF`` with ``sendfile``.  Every RETR's octets
are checked by the client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import pytest

from pobox.server._driver import Pop3Protocol
from pobox.server._sendfile import cached
from pobox.testing import RunningServer, running_server
from tests.server.test_retr_writes import CountingTransport
from tests.tls.helpers import Pki, ssl_port

#: Lines of mail in wire form: CRLF, none starting with a dot.
LINE = b"All work and no play makes Jack a dull boy, all work and no play ok.\r\n"


def wire_ready(octets: int) -> bytes:
    """A message stored with CRLF line ends and no dot line, of about ``octets``."""
    return b"Subject: big\r\n\r\n" + LINE * (octets // len(LINE))


def store(srv: RunningServer, data: bytes, name: str = "1700000000.M1P1.test") -> Path:
    """Write ``data`` as a message file in alice's ``new/``, as stored by an MTA."""
    new = srv.maildir("alice") / "new"
    for sub in ("new", "cur", "tmp"):
        (srv.maildir("alice") / sub).mkdir(parents=True, exist_ok=True)
    path = new / name
    path.write_bytes(data)
    return path


def on_wire(stored: bytes) -> bytes:
    """What RETR sends for ``stored`` (CRLF-stored): dots stuffed, ``.CRLF`` at the end."""
    body = (b"." + stored if stored.startswith(b".") else stored).replace(b"\r\n.", b"\r\n..")
    return body + b".\r\n"


class Client:
    """A POP3 client that reads exact octet counts (messages of megabytes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def login(cls, port: int, tls: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
        )
        client = cls(reader, writer)
        assert (await client.line()).startswith(b"+OK")
        for command in (b"USER alice", b"PASS secret"):
            writer.write(command + b"\r\n")
            assert (await client.line()).startswith(b"+OK")
        return client

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), 30)

    async def retr(self, octets: int) -> bytes:
        """RETR 1; return the reply line and the ``octets`` that follow it."""
        self.writer.write(b"RETR 1\r\n")
        status = await self.line()
        return status + await asyncio.wait_for(self.reader.readexactly(octets), 30)

    async def rest(self) -> bytes:
        """Read everything until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), 30)

    async def close(self) -> None:
        """QUIT if the connection is still up, then close it."""
        if not self.reader.at_eof():
            self.writer.write(b"QUIT\r\n")
            await self.reader.read()
        self.writer.close()
        await self.writer.wait_closed()


def driver_of(srv: RunningServer) -> Pop3Protocol:
    (driver,) = srv.server._sessions
    assert isinstance(driver, Pop3Protocol)
    return driver


def counting(srv: RunningServer) -> CountingTransport:
    """Wrap the transport of the server's one session; return the wrapper."""
    driver = driver_of(srv)
    wrapper = CountingTransport(driver._transport)  # type: ignore[arg-type]
    driver._transport = wrapper  # type: ignore[assignment]
    return wrapper


async def waiting_for_socket(driver: Pop3Protocol) -> None:
    """Return once the driver waits for the client's socket to take more (it stopped reading)."""
    while driver._drained is None or driver._io_since is None:
        await asyncio.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestSendfile:
    """Learnt once through the encoder, a wire-ready file then goes out with sendfile."""

    async def test_second_retr_is_sent_from_the_file(self, tmp_path: Path) -> None:
        """RETR 1 through the encoder teaches the server; RETR 2 and 3 use sendfile."""
        data = wire_ready(600_000)
        async with running_server(tmp_path) as srv:
            store(srv, data)
            client = await Client.login(srv.port)
            writes = counting(srv)
            expected = b"+OK %d octets\r\n" % len(data) + on_wire(data)
            sizes = []
            for _ in range(3):
                writes.writes.clear()
                assert expected == await client.retr(len(data) + 3)
                sizes.append(sum(map(len, writes.writes)))
            assert sizes[0] >= len(data)  # the encoder's path
            head = len(b"+OK %d octets\r\n" % len(data))
            assert [head + 3, head + 3] == sizes[1:]  # the file itself went out with sendfile
            assert 1 == len(srv.server.ctx.wire_ready)
            await client.close()

    @pytest.mark.parametrize(
        "data",
        [
            wire_ready(300_000) + b".dot line\r\n",
            wire_ready(300_000).replace(b"\r\n", b"\n"),
            b".first" + wire_ready(300_000),
            wire_ready(300_000) + b"no line end",
        ],
        ids=["dot-line", "lf-stored", "dot-first", "no-final-crlf"],
    )
    async def test_not_wire_ready_never_sent_as_stored(self, tmp_path: Path, data: bytes) -> None:
        """Files RETR must change are never remembered: each RETR goes through the encoder."""
        async with running_server(tmp_path) as srv:
            store(srv, data)
            client = await Client.login(srv.port)
            writes = counting(srv)
            crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if not crlf.endswith(b"\r\n"):
                crlf += b"\r\n"
            expected = on_wire(crlf)
            for _ in range(2):
                writes.writes.clear()
                got = await client.retr(len(expected))
                assert expected == got[got.index(b"\r\n") + 2 :]
                assert sum(map(len, writes.writes)) > len(data)
            assert 0 == len(srv.server.ctx.wire_ready)
            await client.close()

    async def test_file_written_to_goes_through_the_encoder_again(self, tmp_path: Path) -> None:
        """A write to a learnt file (same size, now with a dot line) is seen: it is stuffed."""
        data = wire_ready(300_000)
        async with running_server(tmp_path) as srv:
            path = store(srv, data)
            client = await Client.login(srv.port)
            await client.retr(len(data) + 3)
            await client.retr(len(data) + 3)
            assert 1 == len(srv.server.ctx.wire_ready)
            with path.open("r+b") as f:  # same size, a line now starts with a dot
                f.seek(len(b"Subject: big\r\n\r\n") + len(LINE))
                f.write(b".")
            changed = path.read_bytes()
            expected = on_wire(changed)
            got = await client.retr(len(expected))
            assert expected == got[got.index(b"\r\n") + 2 :]
            await client.close()

    async def test_never_over_tls(self, tmp_path: Path) -> None:
        """Over TLS every RETR goes through the encoder and the TLS transport."""
        data = wire_ready(300_000)
        pki = Pki.create(tmp_path / "pki")
        async with running_server(tmp_path, ssl_listen=["127.0.0.1:0"], **pki.settings) as srv:
            store(srv, data)
            client = await Client.login(ssl_port(srv), pki.client_context())
            writes = counting(srv)
            for _ in range(3):
                writes.writes.clear()
                await client.retr(len(data) + 3)
                assert sum(map(len, writes.writes)) > len(data)
            await client.close()

    async def test_file_not_in_the_page_cache_is_sent_from_a_worker_thread(
        self, tmp_path: Path
    ) -> None:
        """A learnt file dropped from the page cache is sent (in a worker thread: the event
        loop never waits for the disk), exactly, and the duplicates it used are closed."""
        data = wire_ready(4 * 1024 * 1024)
        async with running_server(tmp_path) as srv:
            path = store(srv, data)
            client = await Client.login(srv.port)
            await client.retr(len(data) + 3)  # learnt
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert not cached(fd, 0, len(data))  # what the driver will see
            finally:
                os.close(fd)
            before = open_fds()
            writes = counting(srv)
            got = await client.retr(len(data) + 3)
            assert b"+OK %d octets\r\n" % len(data) + on_wire(data) == got
            assert len(b"+OK %d octets\r\n" % len(data)) + 3 == sum(map(len, writes.writes))
            assert before == open_fds()
            await client.close()

    async def test_client_that_reads_late_gets_every_octet(self, tmp_path: Path) -> None:
        """The socket fills (EAGAIN), the server waits for it, and the rest follows exactly;
        the descriptor it waited on is closed afterwards."""
        data = wire_ready(16 * 1024 * 1024)
        async with running_server(tmp_path) as srv:
            store(srv, data)
            client = await Client.login(srv.port)
            await client.retr(len(data) + 3)  # learnt
            before = open_fds()
            client.writer.write(b"RETR 1\r\n")
            await waiting_for_socket(driver_of(srv))  # stopped reading: the socket is full
            status = await client.line()
            assert on_wire(data) == await asyncio.wait_for(
                client.reader.readexactly(len(data) + 3), 30
            )
            assert status.startswith(b"+OK")
            client.writer.write(b"NOOP\r\n")
            assert b"+OK\r\n" == await client.line()
            assert before == open_fds()
            await client.close()

    async def test_client_that_stops_reading_is_dropped(self, tmp_path: Path) -> None:
        """A client that never reads the rest is dropped at ``idle_timeout``, as on the
        encoder's path, and nothing of the wait is left open."""
        data = wire_ready(16 * 1024 * 1024)
        async with running_server(tmp_path, idle_timeout=1) as srv:
            store(srv, data)
            client = await Client.login(srv.port)
            await client.retr(len(data) + 3)  # learnt
            before = open_fds()
            client.writer.write(b"RETR 1\r\n")
            driver = driver_of(srv)
            await waiting_for_socket(driver)
            while not driver._ended:  # the session ends at idle_timeout
                await asyncio.sleep(0.05)
            rest = await client.rest()
            assert not rest.endswith(b"\r\n.\r\n")
            await client.close()
            await asyncio.wait_for(driver.done, 30)
            assert before >= open_fds()

    async def test_file_cut_short_while_sent_ends_the_session(self, tmp_path: Path) -> None:
        """A file truncated while it goes out: no terminator, the connection closes."""
        data = wire_ready(16 * 1024 * 1024)
        async with running_server(tmp_path) as srv:
            path = store(srv, data)
            client = await Client.login(srv.port)
            await client.retr(len(data) + 3)  # learnt
            client.writer.write(b"RETR 1\r\n")
            driver = driver_of(srv)
            await waiting_for_socket(driver)
            os.truncate(path, 1024 * 1024)
            rest = await client.rest()
            assert rest.startswith(b"+OK %d octets\r\n" % len(data))
            assert len(rest) < len(data)
            assert not rest.endswith(b".\r\n")
            await client.close()
            await asyncio.wait_for(driver.done, 30)
            assert 0 == len(srv.server.ctx.wire_ready)


class TestUvloop:
    """pobox's default loop has no ``loop.sendfile``: the driver's own path runs there too."""

    async def test_sendfile_on_uvloop(self, tmp_path: Path) -> None:
        """On uvloop, a client with a small receive buffer (the socket fills: ``EAGAIN``,
        a wait on a duplicate descriptor) gets the learnt file whole, sent as stored."""
        import uvloop  # noqa: PLC0415 - only this test needs it

        data = wire_ready(8 * 1024 * 1024)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)

        def login(port: int) -> None:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"USER alice\r\nPASS secret\r\n")
            reader = sock.makefile("rb")
            for _ in range(3):
                assert reader.readline().startswith(b"+OK")
            reader.close()

        def retr() -> bytes:
            sock.sendall(b"RETR 1\r\n")
            reader = sock.makefile("rb")
            try:
                return reader.readline() + reader.read(len(data) + 3)
            finally:
                reader.close()

        async def serve() -> tuple[str, list[bytes], int]:
            async with running_server(tmp_path) as srv:
                store(srv, data)
                await asyncio.to_thread(login, srv.port)
                got = [await asyncio.to_thread(retr)]  # learnt
                writes = counting(srv)
                got.append(await asyncio.to_thread(retr))
                through_transport = sum(map(len, writes.writes))
                await asyncio.to_thread(sock.sendall, b"QUIT\r\n")
                await asyncio.to_thread(sock.recv, 100)
                sock.close()
                loop = type(asyncio.get_running_loop()).__module__
                return loop, got, through_transport

        def on_uvloop() -> tuple[str, list[bytes], int]:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(serve())

        loop, got, through_transport = await asyncio.to_thread(on_uvloop)
        expected = b"+OK %d octets\r\n" % len(data) + on_wire(data)
        assert ("uvloop", [expected, expected]) == (loop, got)
        assert len(b"+OK %d octets\r\n" % len(data)) + 3 == through_transport
