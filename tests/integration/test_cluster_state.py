"""Cluster-wide state end to end: two pobox nodes on one PostgreSQL share the failed-login
throttle, the per-user connection limits and the session registry (kicks, dead nodes), and a
node whose state store is unreachable keeps serving with its own memory.

The nodes are two servers in this process (``running_server``), each with its own store,
userdb, state pool and heartbeat, as two hosts would have; only the database is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from pobox.cli import main
from pobox.server._cluster import Cluster
from pobox.state import FailureCounters
from pobox.testing import RunningServer, running_server
from tests.helpers.ports import free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import pobox_serve, serve_config
from tests.integration.wire import Wire

USERS = {"alice": "secret"}

#: Heartbeat of the test nodes: kicks within a second; a lease (3 beats) that a loaded
#: CI machine does not overrun by holding a node back.
HEARTBEAT = 0.5


def settings(dsn: str, node: str, **more: object) -> dict[str, object]:
    """Config keys of a node on the test database."""
    return {
        "mail_location": "postgresql",
        "postgresql_dsn": dsn,
        "postgresql_timeout": 3,
        "postgresql_pool_min": 1,
        "node_name": node,
        "shared_state_heartbeat": HEARTBEAT,
        "shared_state_timeout": 3,  # a slow test machine must not fall back by accident
        **more,
    }


@contextlib.asynccontextmanager
async def two_nodes(
    root: Path, dsn: str, **more: object
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two nodes, a and b, on one database, with the config keys ``more``."""
    async with running_server(root / "a", USERS, **settings(dsn, "a", **more)) as a:
        async with running_server(root / "b", USERS, **settings(dsn, "b", **more)) as b:
            yield a, b


def cluster_of(node: RunningServer) -> Cluster:
    """The node's place in the registry (what the ops tooling will use)."""
    cluster = node.server.ctx.cluster
    assert cluster is not None
    return cluster


def cluster_counters(node: RunningServer) -> FailureCounters:
    """The node's failure counters (the throttle's)."""
    throttle = node.server.ctx.throttle
    assert throttle is not None
    return throttle.counters


class RecordingCounters:
    """Real failure counters that note which calls reach them."""

    def __init__(self, counters: FailureCounters) -> None:
        self.counters = counters
        self.calls: list[str] = []

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Count, noted."""
        self.calls.append("counts")
        return await self.counters.counts(keys)

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Add, noted."""
        self.calls.append("add")
        return await self.counters.add(keys)

    async def clear(self, keys: Sequence[str]) -> None:
        """Clear, noted."""
        self.calls.append("clear")
        await self.counters.clear(keys)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check()`` holds (no timed assertion: a generous bound, then fail)."""
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"never happened: {what}")


class TestAcrossNodes:
    """What one node knows, the other acts on."""

    async def test_failures_on_a_throttle_on_b(self, tmp_path: Path, pg_dsn: str) -> None:
        """Two failures from an address on node a: its right password is refused on node b."""
        async with two_nodes(tmp_path, pg_dsn, auth_failures_per_ip=2) as (a, b):
            for _ in range(2):
                wire = await Wire.connect(a.host, a.port)
                assert (await wire.attempt(password=b"wrong")).startswith(b"-ERR [AUTH]")
                await wire.close()
            reply = await (await Wire.connect(b.host, b.port)).attempt()
        assert b"-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n" == reply

    async def test_failures_on_a_refuse_a_wrong_password_on_b(
        self, tmp_path: Path, pg_dsn: str
    ) -> None:
        """Node b, which never saw the address fail, refuses its wrong password as throttled
        (not as a failure, which is not counted): the counters are asked before the answer."""
        async with two_nodes(tmp_path, pg_dsn, auth_failures_per_ip=2) as (a, b):
            for _ in range(2):
                wire = await Wire.connect(a.host, a.port)
                await wire.attempt(password=b"wrong")
                await wire.close()
            reply = await (await Wire.connect(b.host, b.port)).attempt(password=b"wrong")
            counts = await cluster_counters(b).counts(["ip:127.0.0.1"])
        assert (b"-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n", [2]) == (
            reply,
            counts,
        )

    async def test_counters_asked_before_the_password_only_after_failures(
        self, tmp_path: Path, pg_dsn: str
    ) -> None:
        """An address this node has not seen fail is checked by the registration alone (no
        round trip of its own); once it failed here, before the password again."""
        async with two_nodes(tmp_path, pg_dsn) as (a, _):
            throttle = a.server.ctx.throttle
            assert throttle is not None
            recording = RecordingCounters(throttle.counters)
            throttle.counters = recording
            wire = await Wire.connect(a.host, a.port)
            await wire.login()
            await wire.command(b"QUIT")
            clean = list(recording.calls)
            wire = await Wire.connect(a.host, a.port)
            await wire.attempt(password=b"wrong")
            await wire.close()
            recording.calls.clear()
            await (await Wire.connect(a.host, a.port)).login()
        assert ([], ["counts"]) == (clean, recording.calls[:1])

    async def test_userip_limit_across_nodes(self, tmp_path: Path, pg_dsn: str) -> None:
        """Alice logged in on node a may not log in on node b from the same address, until
        she quits on a."""
        async with two_nodes(
            tmp_path, pg_dsn, pop3_lock_session=False, mail_max_userip_connections=1
        ) as (a, b):
            first = await Wire.connect(a.host, a.port)
            await first.login()
            refused = await (await Wire.connect(b.host, b.port)).attempt()
            assert b"+OK" == (await first.command(b"QUIT"))[:3]
            await (await Wire.connect(b.host, b.port)).login()
        assert (
            b"-ERR [IN-USE] Maximum number of connections from user+IP exceeded "
            b"(mail_max_userip_connections=1).\r\n"
        ) == refused

    async def test_user_limit_across_nodes(self, tmp_path: Path, pg_dsn: str) -> None:
        """mail_max_user_connections counts the user's sessions on every node."""
        async with two_nodes(
            tmp_path, pg_dsn, pop3_lock_session=False, mail_max_user_connections=1
        ) as (a, b):
            await (await Wire.connect(a.host, a.port)).login()
            refused = await (await Wire.connect(b.host, b.port)).attempt()
        assert (
            b"-ERR [IN-USE] Maximum number of connections from user exceeded "
            b"(mail_max_user_connections=1).\r\n"
        ) == refused

    async def test_registry_lists_every_node(self, tmp_path: Path, pg_dsn: str) -> None:
        """A session on node b is listed, with its node and address, on node a, until QUIT."""
        async with two_nodes(tmp_path, pg_dsn) as (a, b):
            wire = await Wire.connect(b.host, b.port)
            await wire.login()
            (found,) = await cluster_of(a).registry.sessions()
            assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            await eventually(lambda: _no_sessions(cluster_of(a)), "unregistered at QUIT")
        assert ("alice", "b", "127.0.0.1", False) == (found.user, found.node, found.rip, found.tls)

    async def test_login_refused_by_the_lock_is_not_counted(
        self, tmp_path: Path, pg_dsn: str
    ) -> None:
        """A login that passes the limits but finds the maildrop locked leaves no entry."""
        async with two_nodes(tmp_path, pg_dsn) as (a, b):
            await (await Wire.connect(a.host, a.port)).login()
            locked = await (await Wire.connect(b.host, b.port)).attempt()
            listed = [e.node for e in await cluster_of(b).registry.sessions()]
        assert locked.startswith(b"-ERR [IN-USE] Mailbox is locked")
        assert ["a"] == listed

    async def test_kick_on_a_ends_the_session_on_b(self, tmp_path: Path, pg_dsn: str) -> None:
        """A kick asked on node a ends alice's session on node b without UPDATE."""
        async with two_nodes(tmp_path, pg_dsn) as (a, b):
            b.deliver("alice", b"Subject: keep me\n\nbody\n")
            wire = await Wire.connect(b.host, b.port)
            await wire.login()
            assert b"+OK" == (await wire.command(b"DELE 1"))[:3]
            assert 1 == await cluster_of(a).registry.kick(user="alice")
            ended = await wire.read_all()
            await eventually(lambda: _no_sessions(cluster_of(a)), "the kicked one unregistered")
            assert 1 == b.count("alice")
            await (await Wire.connect(a.host, a.port)).login()
        assert b"-ERR [SYS/TEMP] Session ended by the administrator, no changes made.\r\n" == ended

    async def test_killed_node_sessions_expire(self, tmp_path: Path, pg_dsn: str) -> None:
        """A `pobox serve` node is SIGKILLed holding alice's session: after its lease alice
        gets in again on node a, and the dead node's entries are purged."""
        async with two_nodes(tmp_path, pg_dsn, mail_max_userip_connections=1) as (a, _):
            async with pobox_serve(
                tmp_path / "c", USERS, **settings(pg_dsn, "c", mail_max_userip_connections=1)
            ) as node_c:
                wire = await Wire.connect("127.0.0.1", node_c.port)
                await wire.login()
                listed = [e.node for e in await cluster_of(a).registry.sessions()]
                refused = await (await Wire.connect(a.host, a.port)).attempt()
                node_c.signal(signal.SIGKILL)
                await node_c.proc.wait()
                await wire.close()

            async def alice_gets_in() -> bool:
                wire = await Wire.connect(a.host, a.port)
                reply = await wire.attempt()
                await wire.close()
                return reply.startswith(b"+OK")

            await eventually(alice_gets_in, "the dead node's session stopped counting")
            await eventually(lambda: _purged(pg_dsn), "the dead node's session purged")
        assert ["c"] == listed
        assert refused.startswith(b"-ERR [IN-USE] Maximum number of connections")


async def _no_sessions(cluster: Cluster) -> bool:
    return not await cluster.registry.sessions()


async def _purged(dsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM pobox.cluster_session WHERE node = 'c'")
        row = await cur.fetchone()
    return row is not None and row[0] == 0


def unreachable_dsn() -> str:
    """A DSN of a loopback port nothing listens on (a stopped database)."""
    port = free_port()
    return f"host=127.0.0.1 port={port} dbname=pobox user=postgres"


class TestStoreUnreachable:
    """A node whose state store cannot be reached serves on with its own memory."""

    async def test_serves_and_throttles_per_node(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Logins work, failures are still throttled (on this node), limits still hold, and
        the episode is logged once, not per login."""
        caplog.set_level(logging.INFO, logger="pobox.cluster")
        async with running_server(
            tmp_path,
            USERS,
            shared_state="postgresql",
            postgresql_dsn=unreachable_dsn(),
            shared_state_timeout=0.5,
            shared_state_heartbeat=HEARTBEAT,
            auth_failures_per_ip=2,
            pop3_lock_session=False,
            mail_max_userip_connections=1,
        ) as node:
            first = await Wire.connect(node.host, node.port)
            await first.login()
            second = await Wire.connect(node.host, node.port)
            over_limit = await second.attempt()
            assert b"+OK" == (await first.command(b"QUIT"))[:3]
            for _ in range(2):
                wire = await Wire.connect(node.host, node.port)
                assert (await wire.attempt(password=b"wrong")).startswith(b"-ERR [AUTH]")
                await wire.close()
            throttled = await (await Wire.connect(node.host, node.port)).attempt()
            cluster = cluster_of(node)
            beats = cluster.beats

            async def beaten() -> bool:  # each heartbeat asks the store again, and fails
                return cluster.beats >= beats + 3

            await eventually(beaten, "three more heartbeats")
        assert over_limit.startswith(b"-ERR [IN-USE] Maximum number of connections")
        assert throttled.startswith(b"-ERR [LOGIN-DELAY]")
        begun = [r for r in caplog.records if "shared state unavailable" in r.getMessage()]
        assert 1 == len(begun)

    async def test_slow_store_falls_back_then_recovers(
        self, tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """While the state tables are locked (a store too slow to answer), logins are served
        from each node's memory; once they are free the shared state is used again."""
        caplog.set_level(logging.INFO, logger="pobox.cluster")
        async with two_nodes(
            tmp_path, pg_dsn, shared_state_timeout=0.3, auth_failures_per_ip=1
        ) as (a, b):
            blocker = await psycopg.AsyncConnection.connect(pg_dsn)
            try:
                await blocker.execute(
                    "LOCK pobox.failure_counter, pobox.cluster_node, pobox.cluster_session"
                )
                wire = await Wire.connect(a.host, a.port)
                assert (await wire.attempt(password=b"wrong")).startswith(b"-ERR [AUTH]")
                await wire.close()
                # The failure was counted on node a only: node b lets the address in.
                await (await Wire.connect(b.host, b.port)).login()
            finally:
                await blocker.rollback()
                await blocker.close()

            async def both_recovered() -> bool:
                return sum("available again" in r.getMessage() for r in caplog.records) >= 2

            await eventually(both_recovered, "both nodes using the shared state again")
            wire = await Wire.connect(b.host, b.port)
            assert (await wire.attempt(password=b"wrong")).startswith(b"-ERR [AUTH]")
            await wire.close()
            refused = await (await Wire.connect(a.host, a.port)).attempt()
        assert refused.startswith(b"-ERR [LOGIN-DELAY]")


class TestSchema:
    """``pobox db upgrade`` makes the state tables, also for a node with mail in Maildirs."""

    def test_upgrade_for_shared_state_only(
        self, tmp_path: Path, pg_cluster: Postgres, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """shared_state = postgresql with a Maildir store: db upgrade creates the tables."""
        name = pg_cluster.create_database()
        try:
            config = tmp_path / "pobox.toml"
            config.write_text(
                f'mail_location = "maildir:{tmp_path}/%u"\nshared_state = "postgresql"\n'
                f'postgresql_dsn = "{pg_cluster.dsn(name)}"\n'
            )
            status = main(["db", "upgrade", "-c", str(config)])
            with psycopg.connect(pg_cluster.dsn(name), autocommit=True) as conn:
                tables = conn.execute(
                    "SELECT relname, relpersistence FROM pg_class WHERE relname IN"
                    " ('failure_counter', 'cluster_node', 'cluster_session') ORDER BY relname"
                ).fetchall()
        finally:
            pg_cluster.drop_database(name)
        assert 0 == status
        assert "applied 0200_cluster_state\n" in capsys.readouterr().out
        assert [("cluster_node", "u"), ("cluster_session", "u"), ("failure_counter", "u")] == tables

    async def test_serve_refuses_state_tables_missing(
        self, tmp_path: Path, pg_cluster: Postgres
    ) -> None:
        """A node with shared_state = postgresql on a database without the tables does not
        start, and says what to run."""
        name = pg_cluster.create_database()
        try:
            add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
            config = tmp_path / "pobox.toml"
            config.write_text(
                f'listen = ["127.0.0.1:0"]\nworkers = 1\npasswd_file = "{tmp_path / "passwd"}"\n'
                f'mail_location = "maildir:{tmp_path}/%u"\nshared_state = "postgresql"\n'
                f'postgresql_dsn = "{pg_cluster.dsn(name)}"\n'
            )
            async with serve_config(config, stderr=asyncio.subprocess.PIPE) as proc:
                assert proc.stderr is not None
                async with asyncio.timeout(30):
                    error = await proc.stderr.read()
                    status = await proc.wait()
        finally:
            pg_cluster.drop_database(name)
        assert 0 != status
        assert b"run `pobox db upgrade -c CONFIG`" in error
