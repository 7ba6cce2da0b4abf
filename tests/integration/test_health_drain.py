"""Health checks and the SIGTERM drain, end to end.

A real ``pobox serve`` process for the drain (signals, listeners, exit status); the health
endpoint over a real PostgreSQL store, with the throwaway cluster stopped and started again.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.config import Listen
from pobox.server._health import HealthServer, probes_of
from pobox.storage.postgres import PostgresStore
from pobox.testing import deliver_to_maildir
from tests.helpers.postgres import Postgres
from tests.helpers.process import ServeProcess, pobox_serve
from tests.integration.wire import Wire

USERS = {"alice": "secret", "bob": "secret"}


async def get_health(port: int) -> bytes:
    """Ask ``GET /health`` on loopback ``port``; return the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def count(folder: Path, user: str) -> int:
    """How many messages ``user``'s Maildir under ``folder`` holds."""
    maildir = folder / "mail" / user
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    """A `pobox serve` with two users, two messages each, a health port, drain_timeout 4 s."""
    async with pobox_serve(
        tmp_path, USERS, drain_timeout=4, health_listen="127.0.0.1:0", log_level="debug"
    ) as proc:
        for user in USERS:
            for number in (1, 2):
                deliver_to_maildir(tmp_path / "mail" / user, b"Subject: %d\n\nbody\n" % number)
        yield proc


async def health_port(proc: ServeProcess) -> int:
    line = await proc.wait_log(r"Health check on http://127\.0\.0\.1:\d+/health")
    return int(re.findall(r"127\.0\.0\.1:(\d+)/health", line)[0])


class TestDrain:
    """SIGTERM: no new connections, open sessions may finish, the rest end without UPDATE."""

    async def test_drain(self, node: ServeProcess, tmp_path: Path) -> None:
        """Alice's QUIT during the drain deletes; Bob, still idle at the deadline, gets
        -ERR [SYS/TEMP] and keeps his mail; new connections are refused; health says 503;
        the exit status is 0."""
        health = await health_port(node)
        alice = await Wire.connect("127.0.0.1", node.port)
        await alice.login(b"alice")
        bob = await Wire.connect("127.0.0.1", node.port)
        await bob.login(b"bob")
        assert (await alice.command(b"DELE 1")).startswith(b"+OK")
        assert (await bob.command(b"DELE 1")).startswith(b"+OK")
        before = await get_health(health)
        node.signal(signal.SIGTERM)
        await node.wait_log(r"master: draining: no new connections; 2 POP3 sessions and 0 del")
        during = await get_health(health)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", node.port)
        quit_reply = await alice.command(b"QUIT")
        closing = await bob.read_all(timeout=30)
        status = await asyncio.wait_for(node.proc.wait(), 30)
        log = node.text()
        assert before.startswith(b"HTTP/1.0 200 ")
        assert during.startswith(b"HTTP/1.0 503 ")
        assert during.endswith(b"draining\n")
        assert b"+OK Logging out.\r\n" == quit_reply
        expected = b"-ERR [SYS/TEMP] Server shutting down, no changes made; log in again.\r\n"
        assert expected == closing
        assert (0, 1, 2) == (status, count(tmp_path, "alice"), count(tmp_path, "bob"))
        assert "deadline reached: closing 1 POP3 sessions without UPDATE" in log
        assert "master: drained in" in log

    async def test_second_signal_stops_at_once(self, tmp_path: Path) -> None:
        """A second SIGTERM ends a long drain at once, still without UPDATE; exit status 0."""
        async with pobox_serve(tmp_path, USERS, drain_timeout=600) as node:
            deliver_to_maildir(tmp_path / "mail" / "alice", b"Subject: 1\n\nbody\n")
            alice = await Wire.connect("127.0.0.1", node.port)
            await alice.login(b"alice")
            assert (await alice.command(b"DELE 1")).startswith(b"+OK")
            node.signal(signal.SIGTERM)
            await node.wait_log(r"master: draining: no new connections")
            node.signal(signal.SIGTERM)
            closing = await alice.read_all(timeout=30)
            status = await asyncio.wait_for(node.proc.wait(), 30)
        assert closing.startswith(b"-ERR [SYS/TEMP] Server shutting down")
        assert (0, 1) == (status, count(tmp_path, "alice"))
        assert "SIGTERM again: stopping at once" in node.text()

    async def test_idle_lmtp_connection_gets_421(self, tmp_path: Path) -> None:
        """An idle LMTP connection does not hold the drain up, and gets 421 4.3.2 at its end."""
        async with pobox_serve(
            tmp_path, USERS, drain_timeout=60, lmtp_listen=["127.0.0.1:0"]
        ) as node:
            line = await node.wait_log(r"delivery: lmtp listening on")
            port = int(re.findall(r"(\d+)\)$", line)[0])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            greeting = await asyncio.wait_for(reader.readline(), 10)
            writer.write(b"LHLO mta.example\r\n")
            await writer.drain()
            while not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250 "):
                pass
            node.signal(signal.SIGTERM)
            closing = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            await writer.wait_closed()
            status = await asyncio.wait_for(node.proc.wait(), 30)
        assert greeting.startswith(b"220 ")
        assert closing.startswith(b"421 4.3.2 ")
        assert 0 == status
        assert "master: closing 1 idle delivery connections with 421" in node.text()

    async def test_delivery_in_progress_finishes(self, tmp_path: Path) -> None:
        """A message whose MAIL came before SIGTERM is still accepted (250) and stored."""
        async with pobox_serve(
            tmp_path, USERS, drain_timeout=60, lmtp_listen=["127.0.0.1:0"]
        ) as node:
            line = await node.wait_log(r"delivery: lmtp listening on")
            port = int(re.findall(r"(\d+)\)$", line)[0])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def reply() -> bytes:
                while True:
                    got = await asyncio.wait_for(reader.readline(), 10)
                    if got[3:4] != b"-":
                        return got

            await reply()
            for command in (b"LHLO mta.example", b"MAIL FROM:<s@example.org>", b"RCPT TO:<alice>"):
                writer.write(command + b"\r\n")
                assert (await reply()).startswith(b"250")
            node.signal(signal.SIGTERM)
            await node.wait_log(r"draining: no new connections; 0 POP3 sessions and 1 deliveries")
            writer.write(b"DATA\r\n")
            data = await reply()
            writer.write(b"Subject: late\r\n\r\nbody\r\n.\r\n")
            accepted = await reply()
            closing = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            await writer.wait_closed()
            status = await asyncio.wait_for(node.proc.wait(), 30)
        assert data.startswith(b"354")
        assert accepted.startswith(b"250")
        assert closing.startswith(b"421 4.3.2 ")
        assert (0, 1) == (status, count(tmp_path, "alice"))

    async def test_idle_node_exits_at_once(self, node: ServeProcess) -> None:
        """With no session open the drain ends without waiting for its deadline."""
        node.signal(signal.SIGTERM)
        status = await asyncio.wait_for(node.proc.wait(), 30)
        assert 0 == status
        assert "(0 sessions ended by the deadline)" in node.text()


class TestHealthOnPostgres:
    """The health check follows PostgreSQL: 503 while it is down, 200 once it is back."""

    async def test_down_and_back(self, pg_cluster: Postgres, pg_dsn: str) -> None:
        """200, then 503 naming the mail store while PostgreSQL is stopped, then 200 again."""
        store = PostgresStore(pg_dsn, pool_min=1, timeout=3)
        health = HealthServer(Listen("127.0.0.1", 0), probes_of([store]))
        await health.start()
        port = health.addresses[0][1]
        try:
            up = await get_health(port)
            pg_cluster.stop()
            try:
                answers = [await get_health(port)]
                async with asyncio.timeout(20):  # the last good result is kept 1 s
                    while answers[-1].startswith(b"HTTP/1.0 200"):
                        await asyncio.sleep(0.2)
                        answers.append(await get_health(port))
            finally:
                pg_cluster.restart()
            async with asyncio.timeout(30):
                while answers[-1].startswith(b"HTTP/1.0 503"):
                    await asyncio.sleep(0.2)
                    answers.append(await get_health(port))
            down = next(a for a in answers if a.startswith(b"HTTP/1.0 503"))
        finally:
            await health.aclose()
            await store.aclose()
        assert up.startswith(b"HTTP/1.0 200 ")
        assert b"\r\n\r\nmail store (PostgreSQL) " in down
        assert answers[-1].startswith(b"HTTP/1.0 200 ")
