"""The PostgreSQL store beyond the contract: bodies stored once, streaming, locks across nodes.

Every test runs on the throwaway cluster's test database, emptied for it (``pg_dsn``). Two
:class:`PostgresStore` instances on one database stand for two pobox nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator

import psycopg
import pytest

from pobox.storage.base import (
    IncomingMessage,
    MaildropLocked,
    MessageGone,
    Quota,
    QuotaExceeded,
    StorageTemporaryError,
    Usage,
)
from pobox.storage.postgres import PostgresStore, lock_key
from pobox.storage.spool import Spool
from tests.helpers.maildir import User, incoming
from tests.helpers.postgres import Postgres


@pytest.fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """A store ("node A") on the emptied test database."""
    made = PostgresStore(pg_dsn, pool_min=1, pool_max=8, lock_connections=2, timeout=10)
    yield made
    await made.aclose()


@pytest.fixture
async def other(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """A second store on the same database ("node B")."""
    made = PostgresStore(pg_dsn, pool_min=1, pool_max=8, lock_connections=2, timeout=10)
    yield made
    await made.aclose()


def query(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run ``sql`` on a connection of its own; return the rows (none for a command)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


async def read(store: PostgresStore, name: str) -> list[bytes]:
    """Return every message of ``name``'s maildrop, without locking it."""
    maildrop = await store.open(User(name), lock=False)
    try:
        return [
            b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            for info in maildrop.messages
        ]
    finally:
        await maildrop.close()


async def empty(store: PostgresStore, name: str) -> None:
    """Delete every message of ``name``'s maildrop in one UPDATE."""
    maildrop = await store.open(User(name))
    await maildrop.delete([info.key for info in maildrop.messages])
    await maildrop.close()


class TestBodies:
    """A body is stored once for all its recipients and dropped when none is left."""

    async def test_one_transaction_to_500_users_stores_the_body_once(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """500 concurrent deliveries of one spool: one body row, 500 messages with own headers."""
        body = Spool.from_bytes(b"Subject: all\r\n\r\n" + b"x" * 300_000 + b"\r\n")
        names = [f"user{n}" for n in range(500)]
        await asyncio.gather(
            *(
                store.deliver(User(name), IncomingMessage(f"To: {name}\n".encode(), body))
                for name in names
            )
        )
        counts = query(
            pg_dsn,
            "SELECT (SELECT count(*) FROM pobox.body), (SELECT count(*) FROM pobox.body_chunk),"
            " (SELECT count(*) FROM pobox.message)",
        )
        assert [(1, 2, 500)] == counts
        assert [b"To: user77\n" + body.getvalue()] == await read(store, "user77")

    async def test_body_dropped_with_its_last_message(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """A body stays while one message uses it and goes with the last one."""
        body = Spool.from_bytes(b"shared\n")
        for name in ("alice", "bob"):
            await store.deliver(User(name), IncomingMessage(b"", body))
        await empty(store, "alice")
        left = query(pg_dsn, "SELECT count(*) FROM pobox.body")
        await empty(store, "bob")
        gone = query(pg_dsn, "SELECT count(*) FROM pobox.body")
        assert ([(1,)], [(0,)]) == (left, gone)

    async def test_reuse_racing_collection_never_loses_a_body(
        self, store: PostgresStore, other: PostgresStore
    ) -> None:
        """Deliveries of a body while UPDATEs elsewhere free it: every message stays readable."""
        body = Spool.from_bytes(b"Subject: same\n\nthe same body\n")
        for _ in range(30):
            await store.deliver(User("alice"), IncomingMessage(b"", body))
            await asyncio.gather(
                empty(store, "alice"),
                other.deliver(User("bob"), IncomingMessage(b"", body)),
            )
        expected = [body.getvalue()] * 30
        assert expected == await read(store, "bob")

    async def test_body_pinned_by_a_delivery_in_progress_is_not_collected(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """While a delivery's transaction has found the body (not yet committed its message),
        the collector leaves that body alone, though no committed message uses it."""
        body = Spool.from_bytes(b"Subject: same\n\nthe same body\n")
        await store.deliver(User("alice"), IncomingMessage(b"", body))
        query(pg_dsn, "DELETE FROM pobox.message")  # the body is unused now...
        digest = bytes.fromhex(body.digest)
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("BEGIN")
            await store._put_body(conn, digest, body)
            dropped = await store._collect([digest])
            await conn.execute("ROLLBACK")
        again = await store._collect([digest])
        assert (0, 1) == (dropped, again)

    async def test_collect_garbage_sweeps_orphans(self, store: PostgresStore, pg_dsn: str) -> None:
        """A body no message uses (a node died before collecting it) is swept by age."""
        await store.deliver(User("alice"), incoming(b"orphan to be\n"))
        query(pg_dsn, "DELETE FROM pobox.message")  # as if the collection never ran
        young = await store.collect_garbage(age="1 hour")
        old = await store.collect_garbage(age="0 seconds")
        left = query(pg_dsn, "SELECT count(*) FROM pobox.body_chunk")
        assert (0, 1, [(0,)]) == (young, old, left)


class TestSessions:
    """What a POP3 session reads: sizes and UIDLs fixed at delivery, bodies streamed."""

    async def test_sizes_and_uidls_come_from_the_rows(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """LIST sizes and UIDLs are read as stored at delivery, never recomputed."""
        await store.deliver(User("alice"), incoming(b"hello\n"))
        query(pg_dsn, "UPDATE pobox.message SET wire_size = 12345, uidl = 'kept-from-elsewhere'")
        maildrop = await store.open(User("alice"))
        got = [(info.size, info.uidl) for info in maildrop.messages]
        await maildrop.close()
        assert [(12345, "kept-from-elsewhere")] == got

    async def test_uidl_is_dovecots_default_format(self, store: PostgresStore, pg_dsn: str) -> None:
        """UIDLs are %08X of the UID then %08X of the maildrop's UIDVALIDITY (Dovecot's)."""
        await store.deliver(User("alice"), incoming(b"one\n"))
        await store.deliver(User("alice"), incoming(b"two\n"))
        [(validity,)] = query(pg_dsn, "SELECT uidvalidity FROM pobox.mailbox")
        maildrop = await store.open(User("alice"))
        uidls = [info.uidl for info in maildrop.messages]
        await maildrop.close()
        assert [f"00000001{validity:08X}", f"00000002{validity:08X}"] == uidls

    async def test_listing_is_one_index_scan(self, store: PostgresStore, pg_dsn: str) -> None:
        """The snapshot query of a 2,000-message maildrop scans the primary key only, no sort."""
        await store.deliver(User("alice"), incoming(b"x\n"))
        query(
            pg_dsn,
            "INSERT INTO pobox.message (mailbox, uid, uidl, wire_size, size, digest, header)"
            " SELECT 'user' || (n % 50), n, 'u' || n, 3, 2, m.digest, ''"
            " FROM generate_series(2, 100000) AS n, (SELECT digest FROM pobox.message) AS m",
        )
        query(pg_dsn, "VACUUM ANALYZE pobox.message")  # what autovacuum does to such a table
        plan = query(
            pg_dsn,
            "EXPLAIN (COSTS OFF) SELECT uid, wire_size, uidl, digest FROM pobox.message"
            " WHERE mailbox = 'user7' ORDER BY uid",
        )
        expected = [
            ("Index Only Scan using message_pkey on message",),
            ("  Index Cond: (mailbox = 'user7'::text)",),
        ]
        assert expected == plan

    async def test_large_message_streams_in_bounded_memory(self, store: PostgresStore) -> None:
        """A 20 MB message is read back intact, a chunk at a time, never whole in memory."""
        data = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
        body = Spool.from_bytes(data)
        await store.deliver(User("alice"), IncomingMessage(b"X: y\n", body))
        body.close()
        del body
        maildrop = await store.open(User("alice"))
        digest = hashlib.sha256()
        largest = 0
        tracemalloc.start()
        async for chunk in maildrop.read_message(maildrop.messages[0].key):
            digest.update(chunk)
            largest = max(largest, len(chunk))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        await maildrop.close()
        expected = hashlib.sha256(b"X: y\n" + data).hexdigest()
        assert (expected, True, True) == (
            digest.hexdigest(),
            largest <= 256 * 1024,
            peak < 4 * 1024 * 1024,
        )

    async def test_cached_listing_follows_another_nodes_deletions(
        self, store: PostgresStore, other: PostgresStore
    ) -> None:
        """A listing node A read before is not reused after node B deleted a message."""
        for n in range(3):
            await store.deliver(User("alice"), incoming(b"m%d\n" % n))
        assert 3 == len(await read(store, "alice"))
        maildrop = await other.open(User("alice"))
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert [b"m1\n", b"m2\n"] == await read(store, "alice")

    async def test_cached_listing_of_a_maildrop_made_anew(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """A maildrop deleted and made again, with the same counts, is listed anew."""
        await store.deliver(User("alice"), incoming(b"old\n"))
        assert [b"old\n"] == await read(store, "alice")
        query(pg_dsn, "DELETE FROM pobox.message; DELETE FROM pobox.mailbox")
        await asyncio.sleep(0.01)
        await store.deliver(User("alice"), incoming(b"new\n"))
        assert [b"new\n"] == await read(store, "alice")

    async def test_small_messages_are_read_ahead(self, store: PostgresStore) -> None:
        """Reading message 1 of a locked session fetches the small ones after it too: they
        are then at hand without waiting (read_now); a large one is left to stream."""
        for n in range(4):
            await store.deliver(User("alice"), incoming(b"small %d\n" % n))
        await store.deliver(User("alice"), incoming(b"z" * 300_000))
        maildrop = await store.open(User("alice"))
        keys = [info.key for info in maildrop.messages]
        first = b"".join([chunk async for chunk in maildrop.read_message(keys[0])])
        at_hand = [maildrop.read_now(key) for key in keys[1:]]
        await maildrop.close()
        assert [b"small 0\n", b"small 1\n", b"small 2\n", b"small 3\n", None] == [
            first,
            *at_hand,
        ]

    async def test_read_ahead_of_shared_and_empty_bodies(self, store: PostgresStore) -> None:
        """Two messages with one body (their own header lines each) and a message with an
        empty body are read ahead whole, each with its own header."""
        body = Spool.from_bytes(b"the same body\n")
        await store.deliver(User("alice"), IncomingMessage(b"To: one\n", body))
        await store.deliver(User("alice"), IncomingMessage(b"To: two\n", body))
        await store.deliver(User("alice"), incoming(b"", b"To: three\n"))
        maildrop = await store.open(User("alice"))
        keys = [info.key for info in maildrop.messages]
        first = b"".join([chunk async for chunk in maildrop.read_message(keys[0])])
        at_hand = [maildrop.read_now(key) for key in keys[1:]]
        await maildrop.close()
        assert [b"To: one\nthe same body\n", b"To: two\nthe same body\n", b"To: three\n"] == [
            first,
            *at_hand,
        ]

    async def test_body_vanishing_mid_read_is_gone(self, store: PostgresStore, pg_dsn: str) -> None:
        """A body removed between two pages raises MessageGone, never a short message."""
        await store.deliver(User("alice"), incoming(b"y" * 2_000_000))
        maildrop = await store.open(User("alice"), lock=False)
        chunks = maildrop.read_message(maildrop.messages[0].key)
        await anext(chunks)
        query(pg_dsn, "DELETE FROM pobox.body_chunk WHERE seq >= 2")
        with pytest.raises(MessageGone):
            async for _ in chunks:
                pass
        await maildrop.close()


class TestDelivery:
    """Delivery is one transaction with the quota; acknowledged only after COMMIT."""

    async def test_quota_holds_against_concurrent_deliveries_from_two_nodes(
        self, store: PostgresStore, other: PostgresStore
    ) -> None:
        """40 deliveries at once from two nodes, quota 7 messages: exactly 7 are stored."""
        quota = Quota(max_messages=7)

        async def one(node: PostgresStore, n: int) -> bool:
            try:
                await node.deliver(User("alice"), incoming(f"{n:02d}\n".encode()), quota=quota)
            except QuotaExceeded:
                return False
            return True

        stored = await asyncio.gather(*(one((store, other)[n % 2], n) for n in range(40)))
        assert (7, Usage(octets=21, messages=7)) == (
            sum(stored),
            await store.usage(User("alice")),
        )

    async def test_refused_delivery_leaves_no_body(self, store: PostgresStore, pg_dsn: str) -> None:
        """A message over quota is rolled back whole: no body, no counters changed."""
        with pytest.raises(QuotaExceeded):
            await store.deliver(User("alice"), incoming(b"12345\n"), quota=Quota(max_bytes=3))
        assert [(0, 0)] == query(
            pg_dsn, "SELECT (SELECT count(*) FROM pobox.body), (SELECT count(*) FROM pobox.mailbox)"
        )

    async def test_schema_and_names_are_quoted_identifiers(self, pg_cluster: Postgres) -> None:
        """A schema name with a quote, a space and a non-ASCII letter works: identifiers are
        composed, not pasted, and the statements' UTF-8 is read as UTF-8 even where the DSN
        asks for another client encoding."""
        name = pg_cluster.create_database()
        dsn = pg_cluster.dsn(name)
        schema = 'wé"ird schema'
        try:
            from tests.helpers.postgres import migrate  # noqa: PLC0415

            migrate(dsn, schema=schema)
            odd = PostgresStore(dsn + " client_encoding=LATIN1", schema=schema, pool_min=1)
            try:
                await odd.deliver(User("o'brien; DROP TABLE x"), incoming(b"fine\n"))
                assert [b"fine\n"] == await read(odd, "o'brien; DROP TABLE x")
            finally:
                await odd.aclose()
        finally:
            pg_cluster.drop_database(name)


class TestLocksAcrossNodes:
    """The maildrop lock is an advisory lock: one holder in the whole cluster, never stale."""

    async def test_second_node_gets_in_use(
        self, store: PostgresStore, other: PostgresStore
    ) -> None:
        """A maildrop locked by node A is refused by node B until A closes it."""
        held = await store.open(User("alice"))
        with pytest.raises(MaildropLocked):
            await other.open(User("alice"))
        await held.close()
        again = await other.open(User("alice"))
        await again.close()

    async def test_many_sessions_share_few_connections(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """300 locked sessions on one node use its 2 lock connections, not 300 backends."""
        sessions = [await store.open(User(f"user{n}")) for n in range(300)]
        [(backends,)] = query(
            pg_dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pobox'",
        )
        [(locks,)] = query(pg_dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        for session in sessions:
            await session.close()
        assert (True, 300) == (backends <= 2 + 8, locks)

    async def test_concurrent_logins_share_one_statement(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """50 logins at once on one lock connection: their locks are taken in one statement,
        and so are their releases."""
        connection = store.lock_connections()[0]
        batches: list[int] = []
        run_batch = connection._run_batch

        async def counted(batch: list[tuple[int, bool, object]]) -> dict[int, bool]:
            batches.append(len(batch))
            return await run_batch(batch)  # type: ignore[arg-type]

        connection._run_batch = counted  # type: ignore[assignment, method-assign]
        keys = [lock_key(f"user{n}") for n in range(50)]
        taken = await asyncio.gather(*(connection.try_lock(key) for key in keys))
        [(held,)] = query(pg_dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        await asyncio.gather(*(connection.unlock(key) for key in keys))
        [(left,)] = query(pg_dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert ([True] * 50, 50, 0, [50, 50]) == (taken, held, left, batches)

    async def test_lock_taken_for_a_cancelled_login_is_released(
        self, store: PostgresStore, other: PostgresStore
    ) -> None:
        """A login given up while its lock request waits does not leave the lock held."""
        connection = store.lock_connections()[lock_key("alice") % 2]
        async with connection.using():  # the connection is busy: the request waits
            login = asyncio.ensure_future(store.open(User("alice")))
            while connection._batcher is None:
                await asyncio.sleep(0)
            batcher = connection._batcher
            login.cancel()
            with pytest.raises(asyncio.CancelledError):
                await login
        await batcher  # sends the request, then releases what it took
        again = await other.open(User("alice"))
        await again.close()
        here = await store.open(User("alice"))  # nor is the maildrop kept busy on this node
        await here.close()
        assert 0 == connection.holders

    async def test_terminated_lock_connection_ends_sessions_and_frees_locks(
        self, store: PostgresStore, other: PostgresStore, pg_dsn: str
    ) -> None:
        """pg_terminate_backend on A's lock connection: A is told, B can lock at once."""
        maildrop = await store.open(User("alice"))
        told = asyncio.Event()
        maildrop.on_lock_lost(told.set)
        pid = maildrop.lock_connection.backend_pid  # type: ignore[union-attr]
        query(pg_dsn, "SELECT pg_terminate_backend(%s)", pid)
        await asyncio.wait_for(told.wait(), 5)
        taken = await other.open(User("alice"))
        await taken.close()
        await maildrop.close()

    async def test_update_after_lost_connection_deletes_nothing(
        self, store: PostgresStore, pg_dsn: str
    ) -> None:
        """An UPDATE whose lock connection died refuses, even before the loss was noticed."""
        await store.deliver(User("alice"), incoming(b"keep me\n"))
        maildrop = await store.open(User("alice"))
        connection = maildrop.lock_connection
        assert connection is not None
        connection._unwatch()
        query(pg_dsn, "SELECT pg_terminate_backend(%s)", connection.backend_pid)
        await asyncio.sleep(0.2)
        with pytest.raises(StorageTemporaryError):
            await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert [b"keep me\n"] == await read(store, "alice")

    async def test_fencing_check_refuses_an_update_without_the_lock(
        self, store: PostgresStore
    ) -> None:
        """The UPDATE checks pg_locks in its transaction: a lock gone from a live connection
        (released behind the session's back) is not enough to delete."""
        await store.deliver(User("alice"), incoming(b"keep me\n"))
        maildrop = await store.open(User("alice"))
        assert maildrop.lock_connection is not None
        async with maildrop.lock_connection.using() as conn:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key("alice"),))
        with pytest.raises(StorageTemporaryError):
            await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert [b"keep me\n"] == await read(store, "alice")


class TestFaults:
    """The database down or restarting: temporary errors, nothing lost, recovery by itself."""

    async def test_down_then_back(self, pg_cluster: Postgres, pg_dsn: str) -> None:
        """With the server stopped, open and deliver fail temporarily; after it returns, both
        work again on the same store without a restart."""
        node = PostgresStore(pg_dsn, pool_min=2, timeout=2, lock_connections=1)
        try:
            await node.deliver(User("alice"), incoming(b"before\n"))
            pg_cluster.stop()
            with pytest.raises(StorageTemporaryError):
                await node.open(User("alice"))
            with pytest.raises(StorageTemporaryError):
                await node.deliver(User("alice"), incoming(b"lost?\n"))
            pg_cluster.restart()
            await node.deliver(User("alice"), incoming(b"after\n"))
            assert [b"before\n", b"after\n"] == await read(node, "alice")
        finally:
            await node.aclose()


class CommitCutter:
    """A TCP relay to the test cluster that, once armed, cuts the connection at a COMMIT.

    ``lose = "reply"`` forwards the COMMIT, waits for the server's answer (so it committed)
    and drops it; ``lose = "request"`` drops the COMMIT itself (the server sees its client go
    in the middle of the transaction and rolls it back). Either way the client sees its
    connection break during COMMIT and cannot know which happened.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.lose: str | None = None
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CommitCutter:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def dsn(self, dbname: str) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"host=127.0.0.1 port={port} dbname={dbname} user=postgres sslmode=disable"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        answered = asyncio.Event()  # the server answered the COMMIT sent on
        cutting = False

        async def down() -> None:
            while data := await up_reader.read(65536):
                if cutting:
                    answered.set()
                    return
                writer.write(data)
                await writer.drain()

        pump = asyncio.create_task(down())
        try:
            while data := await reader.read(65536):
                if self.lose is not None and b"COMMIT\x00" in data:
                    lose, self.lose = self.lose, None
                    self.cut += 1
                    cutting = True
                    if lose == "reply":
                        up_writer.write(data)
                        await up_writer.drain()
                        await asyncio.wait_for(answered.wait(), 30)
                    return
                up_writer.write(data)
                await up_writer.drain()
        finally:
            pump.cancel()
            for end in (writer, up_writer):
                end.close()
            self._tasks.discard(task)


@pytest.fixture
async def cutter(pg_cluster: Postgres, pg_dsn: str) -> AsyncIterator[CommitCutter]:
    async with CommitCutter(pg_cluster.port) as made:
        yield made


class TestCommitUnanswered:
    """A COMMIT whose answer is lost is resolved by looking at the tables, both ways."""

    async def cut_store(self, cutter: CommitCutter) -> PostgresStore:
        node = PostgresStore(cutter.dsn("pobox"), pool_min=1, pool_max=2, timeout=5)
        await node.deliver(User("alice"), incoming(b"first\n"))  # connections made, warm
        return node

    async def test_delivery_committed_is_acknowledged_once(
        self, cutter: CommitCutter, store: PostgresStore
    ) -> None:
        node = await self.cut_store(cutter)
        try:
            cutter.lose = "reply"
            await node.deliver(User("alice"), incoming(b"second\n"))
            assert 1 == cutter.cut
            assert [b"first\n", b"second\n"] == await read(store, "alice")
        finally:
            await node.aclose()

    async def test_delivery_not_committed_is_refused(
        self, cutter: CommitCutter, store: PostgresStore
    ) -> None:
        node = await self.cut_store(cutter)
        try:
            cutter.lose = "request"
            with pytest.raises(StorageTemporaryError):
                await node.deliver(User("alice"), incoming(b"second\n"))
            assert 1 == cutter.cut
            assert [b"first\n"] == await read(store, "alice")
            await node.deliver(User("alice"), incoming(b"third\n"))  # the next one goes in
            assert [b"first\n", b"third\n"] == await read(store, "alice")
        finally:
            await node.aclose()

    @pytest.mark.parametrize("lose", ["reply", "request"])
    async def test_update(self, cutter: CommitCutter, store: PostgresStore, lose: str) -> None:
        """A deletion that committed is reported done; one that did not fails, mail kept."""
        node = await self.cut_store(cutter)
        try:
            await node.deliver(User("alice"), incoming(b"second\n"))
            maildrop = await node.open(User("alice"))
            cutter.lose = lose
            try:
                if lose == "reply":
                    await maildrop.delete([maildrop.messages[0].key])
                else:
                    with pytest.raises(StorageTemporaryError):
                        await maildrop.delete([maildrop.messages[0].key])
            finally:
                await maildrop.close()
            assert 1 == cutter.cut
            left = [b"second\n"] if lose == "reply" else [b"first\n", b"second\n"]
            assert left == await read(store, "alice")
        finally:
            await node.aclose()
