"""The callback driver (:mod:`pobox.server._driver`) and the connection record it builds."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from pathlib import Path

import pytest

from pobox.server import _driver
from pobox.server._driver import Pop3Protocol
from pobox.storage.memory import MemoryStore
from pobox.testing import running_server
from tests.integration.wire import Wire

#: A message of 4,000 octets in CRLF form (14 + 26 + 99 * 40).
MESSAGE = b"Subject: t\r\n\r\n" + b"x" * 24 + b"\r\n" + (b"y" * 38 + b"\r\n") * 99


def _driver_tasks() -> list[asyncio.Task[object]]:
    """Return the tasks the drivers run now (one per event that must wait)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith("Pop3Protocol.")
    ]


class TestCallbacks:
    """Commands answered from the core are answered in the callbacks, with no task."""

    async def test_no_task_while_waiting_for_a_command(self, tmp_path: Path) -> None:
        """A logged-in session waiting for its next command has no task of its own."""
        store = MemoryStore()
        store.add("alice", MESSAGE)
        async with running_server(tmp_path, store=store) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.login()
            assert b"+OK 1 4000\r\n" == await wire.command(b"STAT")
            assert b"+OK\r\n" == await wire.command(b"NOOP")
            assert [] == _driver_tasks()
            await wire.close()

    async def test_retr_of_a_small_message(self, tmp_path: Path) -> None:
        """A small RETR comes back whole: reply line, message, terminator."""
        store = MemoryStore()
        store.add("alice", MESSAGE)
        async with running_server(tmp_path, store=store) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            await wire.login()
            await wire.send(b"RETR 1\r\n")
            assert b"+OK 4000 octets\r\n" + MESSAGE + b".\r\n" == await wire.multiline()
            await wire.close()


class TestMemory:
    """A connection's objects are freed when it ends, without the cyclic garbage collector."""

    async def test_ended_session_freed_by_reference_counting(self, tmp_path: Path) -> None:
        """With the cycle collector off, the driver of a Maildir session (login, RETR,
        QUIT) is gone once its connection is: no reference cycle keeps it (and its
        transport, session, core and maildrop) until a full collection, which thousands
        of idle sessions make rare."""
        async with running_server(tmp_path) as srv:
            srv.deliver("alice", b"Subject: t\n\n" + b"text\n" * 200)
            gc.collect()
            gc.disable()
            try:
                wire = await Wire.connect(srv.host, srv.port)
                await wire.login()
                (driver,) = srv.server._sessions
                assert isinstance(driver, Pop3Protocol)
                ref, done = weakref.ref(driver), driver.done
                del driver
                await wire.send(b"RETR 1\r\n")
                assert (await wire.multiline()).endswith(b"\r\n.\r\n")
                assert b"+OK" == (await wire.command(b"QUIT"))[:3]
                await wire.close()
                await done
                for _ in range(100):  # the transport's close callbacks, a loop pass or two
                    if ref() is None:
                        break
                    await asyncio.sleep(0)
                assert ref() is None, gc.get_referrers(ref())
            finally:
                gc.enable()


class TestFlowControl:
    """A client that does not read its replies is not answered faster than it reads."""

    async def test_pipelined_retrs_all_arrive(self, tmp_path: Path) -> None:
        """2,000 RETRs sent at once, read only afterwards, are all answered, in order."""
        store = MemoryStore()
        store.add("alice", MESSAGE)
        async with running_server(tmp_path, store=store) as srv:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((srv.host, srv.port))
            wire = Wire(*await asyncio.open_connection(sock=sock))
            await wire.login()
            count = 2000
            await wire.send(b"RETR 1\r\n" * count + b"QUIT\r\n")
            await asyncio.sleep(0.5)  # the server fills the socket buffers and must wait
            received = await wire.read_all(timeout=30)
            reply = b"+OK 4000 octets\r\n" + MESSAGE + b".\r\n"
            assert reply * count + b"+OK Logging out.\r\n" == received
            await wire.close()

    async def test_client_that_never_reads_is_closed(self, tmp_path: Path) -> None:
        """A client that stops reading its replies is closed at the idle timeout."""
        store = MemoryStore()
        store.add("alice", MESSAGE)
        async with running_server(tmp_path, store=store, idle_timeout=1) as srv:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((srv.host, srv.port))
            wire = Wire(*await asyncio.open_connection(sock=sock))
            await wire.login()
            wire.writer.transport.pause_reading()  # the client stops reading for good
            await wire.send(b"RETR 1\r\n" * 2000)
            assert await srv.server.wait_sessions(30)
            await wire.close()


class TestConnectionRecord:
    """The listener builds one record per connection that the session reads."""

    async def test_record_of_a_plain_connection(self, tmp_path: Path) -> None:
        """A direct connection's record has the socket's addresses and no TLS."""
        async with running_server(tmp_path) as srv:
            wire = await Wire.connect(srv.host, srv.port)
            assert (await wire.line()).startswith(b"+OK")
            drivers = list(srv.server._sessions)
            assert 1 == len(drivers)
            driver = drivers[0]
            assert isinstance(driver, Pop3Protocol)
            assert driver.session is not None
            info = driver.session.info
            local = wire.writer.get_extra_info("sockname")
            assert ("127.0.0.1", "127.0.0.1", False, False, None, local[1]) == (
                info.rip,
                info.lip,
                info.tls,
                info.secure,
                info.origin,
                info.peername[1],
            )
            await wire.close()


class TestShutdown:
    """Stopping the server does not wait on clients that have gone."""

    async def test_client_gone_during_a_failure_delay(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that closed while its failed login waited is not lingered on at shutdown.

        Its EOF was read already, so a lingering close would wait for a second one that never
        comes: with the linger made an hour long, the stop would not end at all.
        """
        monkeypatch.setattr(_driver, "CLOSE_TIMEOUT", 3600.0)
        async with contextlib.AsyncExitStack() as stack:
            srv = await stack.enter_async_context(
                running_server(tmp_path, auth_failure_delay=60.0, auth_failure_delay_max=60.0)
            )
            wire = await Wire.connect(srv.host, srv.port)
            await wire.line()
            assert (await wire.command(b"USER alice")).startswith(b"+OK")
            await wire.send(b"PASS wrong\r\n")
            await wire.close()
            await asyncio.sleep(0.2)  # the server reads the EOF during the delay
            await asyncio.wait_for(stack.aclose(), 30)
