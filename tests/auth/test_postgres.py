"""Tests for pobox.auth.postgres beyond the contract: columns, cache, NOTIFY, faults, writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from pobox.auth.base import AuthTemporaryError
from pobox.auth.passwdfile import PasswdFileError, UserExists
from pobox.auth.postgres import (
    CustomQueries,
    PostgresAuthenticator,
    UserdbReadOnly,
    _Cache,
    user_from_columns,
)
from pobox.errors import PoboxError
from pobox.storage.postgres import SchemaError
from tests.helpers.ports import free_port
from tests.helpers.postgres import Postgres


def sql(dsn: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on the test database; return its rows (if any)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


@pytest.fixture
async def userdb(pg_dsn: str) -> AsyncIterator[PostgresAuthenticator]:
    """pobox's users table, no cache, not listening."""
    db = PostgresAuthenticator(pg_dsn, cache_ttl=0, timeout=5, listen=False)
    yield db
    await db.aclose()


class TestColumns:
    """user_from_columns maps result columns by name."""

    def test_dovecot_names(self) -> None:
        """userdb_ prefixes go, quota_rule sets both limits, nologin 'Y' refuses."""
        user, password, nopassword, refused = user_from_columns(
            "alice",
            {
                "PASSWORD": "{PLAIN}x",
                "userdb_uid": "1001",
                "userdb_gid": 1002,
                "userdb_home": "/h",
                "userdb_quota_rule": "*:storage=2M:messages=9",
                "nologin": "Y",
                "note": 5,
                "empty": None,
            },
        )
        assert (
            ("alice", 1001, 1002, "/h", 2 * 1024 * 1024, 9, False, {"note": "5"}),
            "{PLAIN}x",
            False,
            True,
        ) == (
            (
                user.name,
                user.uid,
                user.gid,
                user.home,
                user.quota_bytes,
                user.quota_messages,
                user.may_login,
                dict(user.extra),
            ),
            password,
            nopassword,
            refused,
        )

    @pytest.mark.parametrize("value", [None, False, "N", "no", "0", "false", ""])
    def test_flag_off(self, value: object) -> None:
        """NULL, false and Dovecot's off words leave nologin off."""
        assert True is user_from_columns("a", {"nologin": value})[0].may_login

    def test_user_column_renames(self) -> None:
        """A user column gives the canonical name (case-insensitive tables)."""
        assert "alice" == user_from_columns("ALICE", {"user": "alice"})[0].name

    def test_ids_by_name_and_unknown(self) -> None:
        """uid by name (root is 0); an unknown name or a negative number is no uid."""
        found = [
            user_from_columns("a", {"uid": "root"})[0].uid,
            user_from_columns("a", {"uid": "no-such-user-here"})[0].uid,
            user_from_columns("a", {"uid": -5})[0].uid,
        ]
        assert [0, None, None] == found

    def test_nopassword_only_without_password(self) -> None:
        """nopassword counts only when the password is empty, as in Dovecot."""
        assert (True, False) == (
            user_from_columns("a", {"nopassword": "y"})[2],
            user_from_columns("a", {"nopassword": "y", "password": "{PLAIN}x"})[2],
        )


class TestCacheUnit:
    """_Cache keeps rows for a while, and never more than its size."""

    def test_bounded(self) -> None:
        """Past its size the least recently used name goes."""
        cache = _Cache(60, size=2)
        cache.put("a", None)
        cache.put("b", None)
        cache.get("a")
        cache.put("c", None)
        assert ((True, None), (False, None), 2) == (cache.get("a"), cache.get("b"), len(cache))

    def test_expires(self) -> None:
        """A row past its TTL is not returned."""
        cache = _Cache(-1)
        cache.ttl = 1e-9
        cache.put("a", None)
        assert (False, None) == cache.get("a")


class TestCache:
    """Rows are cached for postgresql_user_cache_ttl; NOTIFY makes changes seen at once."""

    async def test_cached_until_ttl(self, pg_dsn: str) -> None:
        """Without NOTIFY a changed password takes effect only after the TTL."""
        sql(pg_dsn, "INSERT INTO pobox.users (username, password) VALUES ('a', '{PLAIN}old')")
        db = PostgresAuthenticator(pg_dsn, cache_ttl=0.5, timeout=5, listen=False)
        try:
            first = await db.authenticate("a", b"old")
            sql(pg_dsn, "UPDATE pobox.users SET password = '{PLAIN}new'")
            cached = await db.authenticate("a", b"old")
            await asyncio.sleep(0.6)
            fresh = await db.authenticate("a", b"new")
        finally:
            await db.aclose()
        assert ("a", "a", "a") == tuple(getattr(u, "name", None) for u in (first, cached, fresh))

    async def test_unknown_users_cached_too(self, pg_dsn: str) -> None:
        """A name found missing is remembered (same cost as a known one) until the TTL."""
        db = PostgresAuthenticator(pg_dsn, cache_ttl=60, timeout=5, listen=False)
        try:
            missing = await db.lookup("b")
            sql(pg_dsn, "INSERT INTO pobox.users (username, password) VALUES ('b', '')")
            still = await db.lookup("b")
        finally:
            await db.aclose()
        assert (None, None) == (missing, still)

    async def test_notify_reaches_another_node(self, pg_dsn: str) -> None:
        """A password changed on node B (pobox user passwd) is seen by node A at once."""
        sql(pg_dsn, "INSERT INTO pobox.users (username, password) VALUES ('a', '{PLAIN}old')")
        node_a = PostgresAuthenticator(pg_dsn, cache_ttl=3600, timeout=5)
        node_b = PostgresAuthenticator(pg_dsn, cache_ttl=3600, timeout=5, listen=False)
        try:
            assert await node_a.authenticate("a", b"old") is not None
            await asyncio.wait_for(node_a.listening.wait(), 10)
            assert await node_b.set_password("a", "{PLAIN}new")
            for _ in range(100):
                if await node_a.authenticate("a", b"new") is not None:
                    break
                await asyncio.sleep(0.05)
            seen = await node_a.authenticate("a", b"new")
        finally:
            await node_a.aclose()
            await node_b.aclose()
        assert "a" == getattr(seen, "name", None)

    async def test_lost_listener_forgets_everything(self, pg_dsn: str) -> None:
        """When the listening connection dies, the cache is emptied (a change may be missed)."""
        sql(pg_dsn, "INSERT INTO pobox.users (username, password) VALUES ('a', '{PLAIN}old')")
        db = PostgresAuthenticator(pg_dsn, cache_ttl=3600, timeout=5)
        try:
            await db.authenticate("a", b"old")
            await asyncio.wait_for(db.listening.wait(), 10)
            # A change the listener cannot see: no trigger fires for TRUNCATE.
            sql(pg_dsn, "TRUNCATE pobox.users")
            sql(
                pg_dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pobox-userdb' AND query LIKE 'LISTEN%%'",
            )
            for _ in range(100):
                if await db.lookup("a") is None:
                    break
                await asyncio.sleep(0.05)
            gone = await db.lookup("a")
        finally:
            await db.aclose()
        assert None is gone


class TestFaults:
    """A database that cannot be reached is a temporary error, and recovery is automatic."""

    async def test_unreachable(self) -> None:
        """Nothing listening: authenticate, lookup and credentials raise AuthTemporaryError."""
        dsn = f"host=127.0.0.1 port={free_port()} dbname=x user=x"
        db = PostgresAuthenticator(dsn, cache_ttl=0, timeout=1, listen=False)
        failures = []
        try:
            for call in (db.authenticate("a", b"x"), db.lookup("a"), db.credentials("a")):
                with pytest.raises(AuthTemporaryError) as info:
                    await call
                failures.append(info.value.resp_code)
        finally:
            await db.aclose()
        assert ["SYS/TEMP"] * 3 == failures

    async def test_database_restart(self, pg_cluster: Postgres, pg_dsn: str) -> None:
        """Server stopped: SYS/TEMP; started again: the same authenticator logs users in."""
        sql(pg_dsn, "INSERT INTO pobox.users (username, password) VALUES ('a', '{PLAIN}pw')")
        db = PostgresAuthenticator(pg_dsn, cache_ttl=0, timeout=2, listen=False)
        try:
            before = await db.authenticate("a", b"pw")
            await asyncio.to_thread(pg_cluster.stop)
            with pytest.raises(AuthTemporaryError):
                await db.authenticate("a", b"pw")
            await asyncio.to_thread(pg_cluster.restart)
            after = None
            for _ in range(50):
                try:
                    after = await db.authenticate("a", b"pw")
                    break
                except AuthTemporaryError:
                    await asyncio.sleep(0.2)
        finally:
            await db.aclose()
        assert ("a", "a") == (getattr(before, "name", None), getattr(after, "name", None))

    async def test_no_table(self, pg_cluster: Postgres) -> None:
        """A database without pobox's schema: SchemaError at start, SYS/TEMP at login."""
        name = pg_cluster.create_database()
        db = PostgresAuthenticator(pg_cluster.dsn(name), cache_ttl=0, timeout=5, listen=False)
        try:
            with pytest.raises(SchemaError, match="pobox db upgrade"):
                await db.check_schema()
            with pytest.raises(AuthTemporaryError, match="pobox db upgrade"):
                await db.authenticate("a", b"x")
        finally:
            await db.aclose()
            pg_cluster.drop_database(name)


class TestCustomQueries:
    """The admin's own tables, read with bound parameters."""

    async def test_local_part_and_domain(self, pg_dsn: str) -> None:
        """%(username)s and %(domain)s are the parts of the login name around @."""
        sql(
            pg_dsn,
            "DROP TABLE IF EXISTS public.vusers;"
            " CREATE TABLE public.vusers (local text, domain text, pw text);"
            " INSERT INTO public.vusers VALUES ('alice', 'example.org', '{PLAIN}pw')",
        )
        query = (
            "SELECT pw AS password, local || '@' || domain AS user FROM public.vusers"
            " WHERE local = %(username)s AND domain = %(domain)s"
        )
        db = PostgresAuthenticator(
            pg_dsn, queries=CustomQueries(query), cache_ttl=0, timeout=5, listen=False
        )
        try:
            user = await db.authenticate("alice@example.org", b"pw")
            other = await db.authenticate("alice@example.com", b"pw")
        finally:
            await db.aclose()
        assert ("alice@example.org", None) == (getattr(user, "name", None), other)

    async def test_user_query_for_delivery(self, pg_dsn: str) -> None:
        """lookup() runs the user query; authenticate() the password query."""
        sql(
            pg_dsn,
            "DROP TABLE IF EXISTS public.vusers; CREATE TABLE public.vusers (u text, pw text);"
            " INSERT INTO public.vusers VALUES ('a', '{PLAIN}pw')",
        )
        queries = CustomQueries(
            "SELECT pw AS password FROM public.vusers WHERE u = %(user)s",
            user="SELECT '/homes/' || u AS home FROM public.vusers WHERE u = %(user)s",
        )
        db = PostgresAuthenticator(pg_dsn, queries=queries, cache_ttl=0, timeout=5, listen=False)
        try:
            found = await db.lookup("a")
            logged = await db.authenticate("a", b"pw")
        finally:
            await db.aclose()
        assert ("/homes/a", None) == (getattr(found, "home", None), getattr(logged, "home", None))

    async def test_read_only(self, pg_dsn: str) -> None:
        """pobox never writes the admin's tables, and cannot list without an iterate query."""
        db = PostgresAuthenticator(
            pg_dsn, queries=CustomQueries("SELECT 1 AS password"), cache_ttl=0, listen=False
        )
        refused = []
        try:
            for call in (
                db.add_user("a", "{PLAIN}x"),
                db.set_password("a", "{PLAIN}x"),
                db.delete_user("a"),
                db.names(),
            ):
                with pytest.raises(UserdbReadOnly):
                    await call
                refused.append(True)
        finally:
            await db.aclose()
        assert [True] * 4 == refused


class TestWrites:
    """add_user, set_password, delete_user and names edit and read pobox's users table."""

    async def test_add_passwd_list_delete(self, userdb: PostgresAuthenticator) -> None:
        """The life of a user: added, listed, re-passworded, removed."""
        await userdb.add_user("zed", "{PLAIN}one", uid=5, quota_bytes=100, nologin=False)
        await userdb.add_user("amy", "{PLAIN}x", nologin=True)
        listed = await userdb.names()
        changed = await userdb.set_password("zed", "{PLAIN}two")
        logged = await userdb.authenticate("zed", b"two")
        removed = await userdb.delete_user("zed")
        assert (["amy", "zed"], True, 5, True, ["amy"]) == (
            listed,
            changed,
            getattr(logged, "uid", None),
            removed,
            await userdb.names(),
        )

    async def test_missing_user(self, userdb: PostgresAuthenticator) -> None:
        """Changing or removing a user who is not there says so."""
        assert (False, False) == (
            await userdb.set_password("nobody", "{PLAIN}x"),
            await userdb.delete_user("nobody"),
        )

    async def test_exists(self, userdb: PostgresAuthenticator) -> None:
        """Adding a user twice fails and keeps the first."""
        await userdb.add_user("a", "{PLAIN}one")
        with pytest.raises(UserExists):
            await userdb.add_user("a", "{PLAIN}two")
        assert "a" == getattr(await userdb.authenticate("a", b"one"), "name", None)

    @pytest.mark.parametrize("name", ["", "#x", "a b", "a\x00b", "a" * 256])
    async def test_bad_names(self, userdb: PostgresAuthenticator, name: str) -> None:
        """Names that could not be found again or stored are refused."""
        with pytest.raises((PasswdFileError, PoboxError)):
            await userdb.add_user(name, "{PLAIN}x")

    async def test_bad_field(self, userdb: PostgresAuthenticator) -> None:
        """A field the table refuses (a negative quota) is an error, not a crash."""
        with pytest.raises(PoboxError, match="cannot add"):
            await userdb.add_user("a", "{PLAIN}x", quota_messages=-1)
