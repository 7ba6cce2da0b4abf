"""PostgreSQL specifics of ``pop3_delete_retention``: the rows, the bodies, the fence, the schema.

The contract (``test_contract.py``, ``TestDeletedMailRetention``, backend
``postgresql-retention``) covers what every store that keeps deleted mail promises; these
tests look at the tables: kept rows move to ``deleted_message`` in the UPDATE's transaction,
the maildrop's counters (the quota) stop counting them, a body shared by a kept and a live
message outlives either, the next UPDATE purges what expired, and an UPDATE without the lock
keeps nothing. Every test runs on the throwaway cluster's test database, emptied for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pobox.cli import main
from pobox.config import build_config
from pobox.storage.base import ImportedMessage, StorageTemporaryError, Usage
from pobox.storage.postgres import PostgresStore, lock_key, migrations, upgrade
from pobox.transfer import export_maildir
from tests.helpers.maildir import User, incoming
from tests.helpers.postgres import Postgres

WEEK = 7 * 86400
ALICE = User("alice")
BOB = User("bob")


@pytest.fixture
async def keeping(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """A store keeping deleted mail for a week."""
    made = _store(pg_dsn, retention=WEEK)
    yield made
    await made.aclose()


@pytest.fixture
async def plain(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """A store on the same database that deletes for good (no retention)."""
    made = _store(pg_dsn)
    yield made
    await made.aclose()


def query(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """Run ``sql`` on a connection of its own; return the rows (none for a command)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description else []


async def delete_all(store: PostgresStore, user: User) -> tuple[str, ...]:
    """Delete every message of ``user``'s maildrop in one UPDATE; return the keys removed."""
    maildrop = await store.open(user)
    result = await maildrop.delete([info.key for info in maildrop.messages])
    await maildrop.close()
    assert () == result.failed
    return result.removed


async def contents(store: PostgresStore, user: User) -> list[bytes]:
    """Return every message of ``user``'s maildrop, read as a session reads it."""
    maildrop = await store.open(user, lock=False)
    try:
        return [
            b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            for info in maildrop.messages
        ]
    finally:
        await maildrop.close()


def bodies(dsn: str) -> int:
    """Return how many bodies the database holds."""
    [(count,)] = query(dsn, "SELECT count(*) FROM pobox.body")
    assert isinstance(count, int)
    return count


def age_kept(dsn: str, seconds: int) -> None:
    """Make every kept message look deleted ``seconds`` earlier than it was."""
    query(dsn, "UPDATE pobox.deleted_message SET deleted = deleted - %s * interval '1 s'", seconds)


class TestRows:
    """Kept messages are rows of ``deleted_message``, outside the listing and the counters."""

    async def test_update_moves_the_row_and_uncounts_it(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """After UPDATE the message row is in deleted_message, UIDL and sizes unchanged, and
        the maildrop's counters (what the quota checks) no longer count it."""
        await keeping.deliver(ALICE, incoming(b"Subject: x\n\nbody\n"))
        maildrop = await keeping.open(ALICE)
        (info,) = maildrop.messages
        await maildrop.close()
        before = query(pg_dsn, "SELECT uidl, wire_size, size, digest, header FROM pobox.message")
        await delete_all(keeping, ALICE)
        kept = query(
            pg_dsn, "SELECT uidl, wire_size, size, digest, header FROM pobox.deleted_message"
        )
        assert before == kept
        assert (info.uidl, info.size) == (kept[0][0], kept[0][1])
        assert [] == query(pg_dsn, "SELECT uid FROM pobox.message")
        assert Usage(octets=0, messages=0) == await keeping.usage(ALICE)

    async def test_store_without_retention_keeps_nothing(
        self, plain: PostgresStore, pg_dsn: str
    ) -> None:
        """With no retention the UPDATE deletes for good and the body goes with it."""
        await plain.deliver(ALICE, incoming(b"gone\n"))
        await delete_all(plain, ALICE)
        assert [(0,)] == query(pg_dsn, "SELECT count(*) FROM pobox.deleted_message")
        assert 0 == bodies(pg_dsn)

    async def test_restore_follows_on_a_node_with_a_cached_listing(
        self, keeping: PostgresStore, plain: PostgresStore
    ) -> None:
        """A node caches a listing of one message; elsewhere that one is deleted and another
        restored: the counts match the cached ones again, yet the node lists the restored
        message (it has a new UID, so the counters moved)."""
        await keeping.deliver(ALICE, incoming(b"one\n"))
        await keeping.deliver(ALICE, incoming(b"two\n"))
        maildrop = await keeping.open(ALICE)
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert [b"two\n"] == await contents(plain, ALICE)  # cached on the plain node
        await delete_all(keeping, ALICE)
        first = (await keeping.deleted_messages(ALICE))[0]
        (restored,) = await keeping.restore_deleted(ALICE, uidls=[first.uidl])
        maildrop = await plain.open(ALICE, lock=False)
        listed = [info.uidl for info in maildrop.messages]
        await maildrop.close()
        assert ([first.uidl], [b"one\n"]) == (listed, await contents(plain, ALICE))
        assert first == restored

    async def test_restore_never_gives_a_uidl_twice(self, keeping: PostgresStore) -> None:
        """A kept message whose UIDL the maildrop has again (stored with that UIDL meanwhile)
        stays kept; the message there keeps its UIDL and is the only one listed with it."""
        await keeping.append(ALICE, b"first\n", uidl="same-uidl")
        await delete_all(keeping, ALICE)
        await keeping.append(ALICE, b"second\n", uidl="same-uidl")
        restored = await keeping.restore_deleted(ALICE)
        maildrop = await keeping.open(ALICE, lock=False)
        listed = [info.uidl for info in maildrop.messages]
        await maildrop.close()
        kept = await keeping.deleted_messages(ALICE)
        assert ((), ["same-uidl"], [b"second\n"]) == (
            restored,
            listed,
            await contents(keeping, ALICE),
        )
        assert ["same-uidl"] == [k.uidl for k in kept]

    async def test_of_two_kept_with_one_uidl_the_last_deleted_comes_back(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """Two kept messages with one UIDL: the restore brings back one, the later deleted."""
        await keeping.append(ALICE, b"older\n", uidl="twice")
        await delete_all(keeping, ALICE)
        age_kept(pg_dsn, 60)
        await keeping.append(ALICE, b"newer\n", uidl="twice")
        await delete_all(keeping, ALICE)
        (restored,) = await keeping.restore_deleted(ALICE)
        assert ("twice", [b"newer\n"]) == (restored.uidl, await contents(keeping, ALICE))
        assert 1 == len(await keeping.deleted_messages(ALICE))

    async def test_update_without_the_lock_keeps_nothing(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """The lock released behind the session's back: the UPDATE refuses, the message stays
        where it was and nothing is kept."""
        await keeping.deliver(ALICE, incoming(b"stay\n"))
        maildrop = await keeping.open(ALICE)
        assert maildrop.lock_connection is not None
        async with maildrop.lock_connection.using() as conn:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key("alice"),))
        with pytest.raises(StorageTemporaryError):
            await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert [b"stay\n"] == await contents(keeping, ALICE)
        assert [(0,)] == query(pg_dsn, "SELECT count(*) FROM pobox.deleted_message")


class TestPurge:
    """What expired goes at the next UPDATE and by ``purge_deleted``, bodies counted right."""

    async def test_next_update_purges_what_expired(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """An UPDATE after the retention purges the expired message (and its body); the one
        it deletes is kept."""
        await keeping.deliver(ALICE, incoming(b"old\n"))
        await delete_all(keeping, ALICE)
        age_kept(pg_dsn, WEEK)
        await keeping.deliver(ALICE, incoming(b"new\n"))
        await delete_all(keeping, ALICE)
        kept = await keeping.deleted_messages(ALICE)
        left = bodies(pg_dsn)
        await keeping.restore_deleted(ALICE)
        assert ([5], 1) == ([k.size for k in kept], left)
        assert [b"new\n"] == await contents(keeping, ALICE)

    async def test_body_shared_with_a_kept_message_survives_a_final_delete(
        self, keeping: PostgresStore, plain: PostgresStore, pg_dsn: str
    ) -> None:
        """One body for alice and bob: alice's copy kept, bob's deleted for good; the body
        stays for alice's restore, and goes only when alice's copy is purged."""
        data = b"Subject: shared\n\nthe same body for both\n"
        await keeping.deliver(ALICE, incoming(data))
        await keeping.deliver(BOB, incoming(data))
        assert 1 == bodies(pg_dsn)
        await delete_all(keeping, ALICE)  # kept
        await delete_all(plain, BOB)  # gone for good: the collector runs
        assert 1 == bodies(pg_dsn)
        assert 1 == await keeping.purge_deleted(ALICE, now=_now() + WEEK)
        assert 0 == bodies(pg_dsn)

    async def test_body_shared_with_a_live_message_survives_the_purge(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """One body for alice and bob: alice's copy kept then purged; bob still reads it."""
        data = b"Subject: shared\n\nstill bob's\n"
        await keeping.deliver(ALICE, incoming(data))
        await keeping.deliver(BOB, incoming(data))
        await delete_all(keeping, ALICE)
        assert 1 == await keeping.purge_deleted(ALICE, now=_now() + WEEK)
        assert 1 == bodies(pg_dsn)
        assert [data] == await contents(keeping, BOB)

    async def test_collect_garbage_spares_kept_bodies(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """The sweep of old orphans (``pobox db gc``) leaves the body of a kept message."""
        await keeping.deliver(ALICE, incoming(b"kept body\n"))
        await delete_all(keeping, ALICE)
        query(pg_dsn, "UPDATE pobox.body SET created = created - interval '2 days'")
        assert 0 == await keeping.collect_garbage()
        (restored,) = await keeping.restore_deleted(ALICE)
        assert (11, [b"kept body\n"]) == (restored.size, await contents(keeping, ALICE))

    async def test_db_gc_purges_every_maildrop(
        self,
        keeping: PostgresStore,
        pg_dsn: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``pobox db gc`` purges what any maildrop kept past the retention (users who never
        log in again), with the bodies; what is younger stays."""
        for user in (ALICE, User("carol")):
            await keeping.deliver(user, incoming(f"old for {user.name}\n".encode()))
            await delete_all(keeping, user)
        age_kept(pg_dsn, WEEK)
        await keeping.deliver(BOB, incoming(b"recent\n"))
        await delete_all(keeping, BOB)
        config = tmp_path / "pobox.toml"
        config.write_text(
            f'mail_location = "postgresql"\npostgresql_dsn = "{pg_dsn}"\n'
            'pop3_delete_retention = "7d"\n'
        )
        capsys.readouterr()
        status = await asyncio.to_thread(main, ["db", "gc", "-c", str(config)])
        out = capsys.readouterr().out.splitlines()
        left = [k.size for k in await keeping.deleted_messages(BOB)]
        assert (0, "purged 2 deleted messages kept past the retention") == (status, out[0])
        assert ((), [8], 1) == (await keeping.deleted_messages(ALICE), left, bodies(pg_dsn))

    async def test_store_wide_purge_goes_in_batches(
        self, keeping: PostgresStore, pg_dsn: str
    ) -> None:
        """Batches of one purge all three expired messages, and every body goes."""
        for number in range(3):
            await keeping.deliver(ALICE, incoming(f"m{number}\n".encode()))
        await delete_all(keeping, ALICE)
        purged = await keeping.purge_all_deleted(now=_now() + WEEK, batch=1)
        assert (3, 0) == (purged, bodies(pg_dsn))


class TestTransfer:
    """``pobox export`` and ``pobox import`` do not treat kept mail as live."""

    async def test_export_leaves_kept_mail_out(
        self, keeping: PostgresStore, tmp_path: Path
    ) -> None:
        """A kept message is not written to the exported Maildir."""
        await keeping.deliver(ALICE, incoming(b"deleted\n"))
        await delete_all(keeping, ALICE)
        await keeping.deliver(ALICE, incoming(b"live\n"))
        report = await export_maildir(keeping, ALICE, tmp_path / "out")
        files = [p.read_bytes() for p in (tmp_path / "out" / "cur").iterdir()]
        assert (1, [b"live\n"]) == (report.copied, files)

    async def test_import_again_does_not_bring_kept_mail_back(self, keeping: PostgresStore) -> None:
        """An import run again after the user deleted an imported message skips its UIDL."""
        messages = [ImportedMessage("old-1", 4, b"one\n"), ImportedMessage("old-2", 4, b"two\n")]
        assert 2 == await keeping.import_messages(ALICE, messages)
        maildrop = await keeping.open(ALICE)
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert 0 == await keeping.import_messages(ALICE, messages)
        assert [b"two\n"] == await contents(keeping, ALICE)
        (restored,) = await keeping.restore_deleted(ALICE)
        assert ("old-1", [b"two\n", b"one\n"]) == (restored.uidl, await contents(keeping, ALICE))


class TestMigration:
    """``pobox db upgrade`` adds ``deleted_message`` to a database made before it."""

    async def test_upgrade_of_an_existing_database_adds_the_table(
        self, pg_cluster: Postgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A database at the version before 221, with mail in it: ``pobox db upgrade``
        applies 221 and 241 (its folder column) alone, the mail stays, and deletion then
        keeps mail."""
        name = pg_cluster.create_database()
        dsn = pg_cluster.dsn(name)
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await upgrade(conn, "pobox")
                await conn.execute("DROP TABLE pobox.deleted_message")
                await conn.execute(
                    "DELETE FROM pobox.schema_migrations WHERE version IN (221, 241)"
                )
            old = _store(dsn)
            try:
                await old.deliver(ALICE, incoming(b"before the upgrade\n"))
            finally:
                await old.aclose()
            config = tmp_path / "pobox.toml"
            config.write_text(f'mail_location = "postgresql"\npostgresql_dsn = "{dsn}"\n')
            capsys.readouterr()
            status = await asyncio.to_thread(main, ["db", "upgrade", "-c", str(config)])
            out = capsys.readouterr().out
            expected = [
                f"applied {m.version:04d}_{m.name}" for m in migrations() if m.version in (221, 241)
            ]
            store = _store(dsn, retention=WEEK)
            try:
                await delete_all(store, ALICE)
                kept = await store.deleted_messages(ALICE)
                await store.restore_deleted(ALICE)
                after = await contents(store, ALICE)
            finally:
                await store.aclose()
        finally:
            pg_cluster.drop_database(name)
        assert (0, expected) == (status, [line for line in out.splitlines() if "applied" in line])
        assert "applied 0221_deleted_message" in expected
        assert (1, [b"before the upgrade\n"]) == (len(kept), after)


def test_config_accepts_the_key_with_postgresql() -> None:
    """``pop3_delete_retention`` is a key of the PostgreSQL store too."""
    config = build_config({"mail_location": "postgresql", "pop3_delete_retention": "7d"})
    assert "7d" == config.pop3_delete_retention


def _store(dsn: str, *, retention: int = 0) -> PostgresStore:
    """A small store on ``dsn``."""
    return PostgresStore(
        dsn, pool_min=1, pool_max=4, lock_connections=1, timeout=10, retention=retention
    )


def _now() -> int:
    """Pobox's clock, in Unix seconds."""
    return int(time.time())
