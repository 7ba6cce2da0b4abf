"""The PostgreSQL user database: ``userdb = "postgresql"``.

Users live in pobox's ``users`` table (migration ``0100_users.sql``, made by ``pobox db
upgrade``), or in the admin's own tables, read with their own queries
(``postgresql_password_query``, ``postgresql_user_query``, ``postgresql_iterate_query``, like
Dovecot's ``password_query``/``user_query``/``iterate_query``):

- **Parameters are always bound.** A custom query names ``%(user)s`` (the login name, Dovecot's
  ``%u``), ``%(username)s`` (the part before ``@``, ``%n``) and ``%(domain)s`` (``%d``); psycopg
  sends them as bind parameters, never pasted into the text, so a login name cannot change a
  query. :mod:`pobox.config` refuses any other ``%`` (Dovecot's ``'%u'`` included) at start-up.
- **Columns are mapped by name** (:func:`user_from_columns`): ``password`` (``{SCHEME}data``,
  the same schemes as the passwd-file, :mod:`pobox.auth.schemes`), ``uid``, ``gid``, ``home``,
  ``mail``, ``quota_rule``/``quota_bytes``/``quota_messages``, ``nologin``/``noauthenticate``,
  ``nopassword``, ``user`` (the canonical name); a ``userdb_`` prefix is dropped (Dovecot's
  prefetch naming); other columns become :attr:`User.extra`.
- **Same-cost failures**, as :class:`~pobox.auth.passwdfile.PasswdFileAuthenticator`: unknown
  users, users without a password and refused users all have the client's password checked
  against a stored hash (their own, or a *dummy*: a real password of the commonest scheme
  among a sample of the table's), one path, in the event loop for single digests and in
  :class:`~pobox.auth.base.HashWorkers` for everything iterated.
- **A short cache**: a row read (or the fact that there is none) is kept for
  ``postgresql_user_cache_ttl`` seconds, at most :data:`CACHE_SIZE` names. Changes to pobox's
  table reach every node at once: a trigger sends ``NOTIFY pobox_users, '<username>'`` and
  every node listens (a node whose listening connection drops forgets everything it cached,
  and reconnects). Custom tables have no trigger: nodes see their changes within the TTL.
- **Faults**: every statement runs under ``statement_timeout`` on the server and the same
  timeout on the client; a broken pooled connection is replaced and the read tried once more;
  anything else is :class:`~pobox.auth.base.AuthTemporaryError` (``-ERR [SYS/TEMP]``, LMTP
  ``451 4.3.0``).

May import: the standard library, psycopg, psycopg_pool, :mod:`pobox.auth.base`,
:mod:`pobox.auth._check`,
:mod:`pobox.auth.schemes`, :mod:`pobox.auth.passwdfile` (username rules), :mod:`pobox.errors`,
:mod:`pobox.records` and :mod:`pobox.storage.postgres` (connection settings, the schema
check).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import pwd
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pobox.auth._check import check_password, commonest, with_scheme
from pobox.auth.base import AuthTemporaryError, HashWorkers, User
from pobox.auth.passwdfile import UserExists, resolve_id, validate_username
from pobox.auth.schemes import (
    DUMMY_HASH,
    SUPPORTED_SCHEMES,
    UnknownScheme,
)
from pobox.errors import PoboxError
from pobox.records import quota_from_fields
from pobox.storage.postgres import (
    DriverError,
    connection_params,
    error_text,
    run_pooled,
    set_timeouts,
)

__all__ = [
    "CACHE_SIZE",
    "NOTIFY_CHANNEL",
    "CustomQueries",
    "PostgresAuthenticator",
    "UserdbReadOnly",
    "user_from_columns",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Conn = psycopg.AsyncConnection[tuple[object, ...]]

#: Names a node remembers at most (found or not): a flood of made-up names cannot grow it.
CACHE_SIZE = 10_000
#: The channel the users table's trigger notifies (0100_users.sql).
NOTIFY_CHANNEL = "pobox_users"
#: Stored passwords sampled to pick the dummy hash, and how often the sample is taken again.
DUMMY_SAMPLE = 100
DUMMY_REFRESH = 600.0
#: Seconds between attempts to listen again after the listening connection failed.
LISTEN_RETRY = 2.0
#: The longest username the users table takes (its CHECK), in octets.
MAX_USERNAME = 255
#: Flag values that mean "off" (as in a passwd-file); NULL and false are off too.
_FALSE = frozenset({"", "n", "no", "false", "0"})


class UserdbReadOnly(PoboxError):
    """The user database is the admin's own tables: pobox reads them, never writes."""


@dataclass(frozen=True, slots=True)
class CustomQueries:
    """The admin's own queries (``postgresql_*_query``); empty ones fall back as documented."""

    password: str
    user: str = ""
    iterate: str = ""


@dataclass(frozen=True, slots=True)
class _Row:
    """What the database says about one user."""

    user: User
    password: str
    any_password: bool  # nopassword with an empty password
    refused: bool  # nologin or noauthenticate


def _flag(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in _FALSE


def _id(value: object, by_name: Callable[[str], int]) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    return resolve_id(str(value).strip(), by_name)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def user_from_columns(name: str, columns: Mapping[str, object]) -> tuple[User, str, bool, bool]:
    """Build a user from a result row, its columns mapped by name.

    ``userdb_`` prefixes are dropped and names compared in lower case. ``uid``/``gid`` are
    numbers or names (:mod:`pwd`/:mod:`grp`); quotas as in a passwd-file
    (:func:`pobox.records.quota_from_fields`); ``nologin``, ``noauthenticate`` and
    ``nopassword`` are flags (NULL, false, ``n``, ``no``, ``false``, ``0`` mean off); a
    non-empty ``user`` column renames the user (Dovecot's canonical name). Other non-NULL
    columns go to :attr:`User.extra` as text.

    Returns:
        ``(user, stored password, nopassword, refused)``.
    """
    fields: dict[str, object] = {}
    for key, value in columns.items():
        fields.setdefault(key.lower().removeprefix("userdb_"), value)
    canonical = _text(fields.pop("user", None)) or name
    password = _text(fields.pop("password", None)) or ""
    uid = _id(fields.pop("uid", None), lambda n: pwd.getpwnam(n).pw_uid)
    gid = _id(fields.pop("gid", None), lambda n: grp.getgrnam(n).gr_gid)
    home = _text(fields.pop("home", None)) or None
    mail = _text(fields.pop("mail", None)) or None
    refused = _flag(fields.pop("nologin", None)) | _flag(fields.pop("noauthenticate", None))
    nopassword = _flag(fields.pop("nopassword", None))
    extra = {key: str(value) for key, value in fields.items() if value is not None}
    quota_bytes, quota_messages, problems = quota_from_fields(extra)
    for problem in problems:
        logger.warning("userdb postgresql: user %s: bad quota field ignored: %s", name, problem)
    for key in ("quota_rule", "quota_bytes", "quota_messages"):
        extra.pop(key, None)
    user = User(
        name=canonical,
        uid=uid,
        gid=gid,
        home=home,
        mail=mail,
        quota_bytes=quota_bytes,
        quota_messages=quota_messages,
        may_login=not refused,
        extra=MappingProxyType(extra),
    )
    return user, password, nopassword and not password, refused


def _parameters(username: str) -> dict[str, str]:
    """The named parameters of a query: ``user``, ``username`` (local part), ``domain``."""
    local, _, domain = username.partition("@")
    return {"user": username, "username": local, "domain": domain}


def _queryable(username: str) -> bool:
    """Tell whether ``username`` can be sent to PostgreSQL at all (text: UTF-8, no NUL)."""
    try:
        encoded = username.encode()
    except UnicodeEncodeError:
        return False
    return 0 < len(encoded) <= MAX_USERNAME and b"\x00" not in encoded


def _map_error(exc: BaseException, what: str) -> AuthTemporaryError:
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return AuthTemporaryError(
            f"userdb {what}: no users table ({exc}); run `pobox db upgrade -c CONFIG`"
        )
    if isinstance(exc, PoolTimeout):
        return AuthTemporaryError(f"userdb {what}: no database connection: {exc}")
    if isinstance(exc, TimeoutError):
        return AuthTemporaryError(f"userdb {what}: the database did not answer in time")
    return AuthTemporaryError(f"userdb {what}: {error_text(exc)}")


class _Cache:
    """Rows by name for ``ttl`` seconds, least recently used dropped past :data:`CACHE_SIZE`."""

    def __init__(self, ttl: float, size: int = CACHE_SIZE) -> None:
        self.ttl = ttl
        self._size = size
        self._rows: OrderedDict[str, tuple[float, _Row | None]] = OrderedDict()

    def get(self, name: str) -> tuple[bool, _Row | None]:
        """Return ``(found, row)``; ``row`` is ``None`` for a name known to be unknown."""
        hit = self._rows.get(name)
        if hit is None:
            return False, None
        if hit[0] <= time.monotonic():
            del self._rows[name]
            return False, None
        self._rows.move_to_end(name)
        return True, hit[1]

    def put(self, name: str, row: _Row | None) -> None:
        if self.ttl <= 0:
            return
        self._rows[name] = (time.monotonic() + self.ttl, row)
        self._rows.move_to_end(name)
        while len(self._rows) > self._size:
            self._rows.popitem(last=False)

    def forget(self, name: str | None = None) -> None:
        """Forget ``name``, or everything."""
        if name is None:
            self._rows.clear()
        else:
            self._rows.pop(name, None)

    def __len__(self) -> int:
        return len(self._rows)


class PostgresAuthenticator:
    """An :class:`~pobox.auth.base.Authenticator` backed by PostgreSQL.

    It also edits pobox's own users table (:meth:`add_user`, :meth:`set_password`,
    :meth:`delete_user`) and lists users (:meth:`names`), for ``pobox user``.

    Args:
        dsn: libpq conninfo or URI (``postgresql_dsn``); libpq's environment fills the rest.
        schema: the schema of pobox's tables (``postgresql_schema``).
        queries: the admin's own queries; ``None`` for pobox's users table.
        default_scheme: the scheme of passwords without ``{SCHEME}`` (``default_pass_scheme``).
        cache_ttl: seconds a row is kept (``postgresql_user_cache_ttl``); 0: no cache.
        pool_min, pool_max: connections of the userdb's own pool.
        timeout: seconds any statement or wait for a connection may take.
        workers: where costly hashes are checked (shared with the SASL shell).
        listen: follow ``NOTIFY pobox_users`` to drop changed users from the cache at once
            (pobox's table only; a server does, a one-shot command need not).

    Raises:
        UnknownScheme: ``default_scheme`` is not a supported scheme.
    """

    def __init__(
        self,
        dsn: str = "",
        *,
        schema: str = "pobox",
        queries: CustomQueries | None = None,
        default_scheme: str = "CRYPT",
        cache_ttl: float = 30.0,
        pool_min: int = 1,
        pool_max: int = 10,
        timeout: float = 10.0,
        workers: HashWorkers | None = None,
        listen: bool = True,
    ) -> None:
        if default_scheme.upper().split(".")[0] not in SUPPORTED_SCHEMES:
            raise UnknownScheme(default_scheme)
        self.default_scheme = default_scheme
        self.workers = workers or HashWorkers()
        self.schema = schema
        self.queries = queries
        self._dsn = dsn
        self._timeout = timeout
        self._cache = _Cache(cache_ttl)
        table = sql.Identifier(schema, "users")
        columns = sql.SQL(
            "password, uid, gid, home, mail, quota_bytes, quota_messages, nologin, nopop3,"
            " pop3_daily_download_bytes, pop3_expire_days, pop3_login_delay"
        )
        self._lookup_sql: sql.Composed | bytes
        self._user_sql: sql.Composed | bytes
        self._iterate_sql: sql.Composed | bytes | None
        if queries is None:
            self._lookup_sql = sql.SQL("SELECT {} FROM {} WHERE username = %(user)s").format(
                columns, table
            )
            self._user_sql = self._lookup_sql
            self._iterate_sql = sql.SQL(
                'SELECT username FROM {} ORDER BY username COLLATE "C"'
            ).format(table)
        else:
            self._lookup_sql = queries.password.encode()
            self._user_sql = (queries.user or queries.password).encode()
            self._iterate_sql = queries.iterate.encode() if queries.iterate else None
        self._table = table
        self._params, self._listen_params = connection_params(dsn, timeout, "pobox-userdb")
        self._pool = AsyncConnectionPool(
            dsn,
            kwargs={**self._params, "autocommit": True},
            min_size=pool_min,
            max_size=max(pool_min, pool_max),
            open=False,
            configure=self._configure,
            timeout=timeout,
            name="pobox-userdb",
            reconnect_timeout=0,
        )
        self._listen = listen and queries is None and cache_ttl > 0
        self._listener: asyncio.Task[None] | None = None
        #: Whether the listening connection is up (for tests and the log).
        self.listening = asyncio.Event()
        self._dummy = DUMMY_HASH
        self._dummy_at = -math.inf
        self._opened = False
        self._closed = False

    # ------------------------------------------------------------------ connections

    async def _configure(self, conn: Conn) -> None:
        """Put every statement of a new connection under the timeout."""
        await set_timeouts(conn, self._timeout)

    async def _ensure_open(self) -> None:
        if self._closed:
            msg = "userdb: closed"
            raise AuthTemporaryError(msg)
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)
            if self._listen:
                self._listener = asyncio.create_task(self._follow_changes())

    async def _run(
        self, what: str, work: Callable[[Conn], Awaitable[_T]], *, retry: bool = True
    ) -> _T:
        """Run ``work`` on a pooled connection under the timeout; map errors.

        Raises:
            AuthTemporaryError: the database failed or did not answer in time.
        """
        await self._ensure_open()
        try:
            return await run_pooled(
                self._pool, work, timeout=self._timeout, what=f"userdb {what}", retry=retry
            )
        except DriverError as exc:
            raise _map_error(exc, what) from exc

    async def _follow_changes(self) -> None:
        """Listen for changed users and forget them; forget everything when not listening."""
        conninfo = make_conninfo(self._dsn, **self._params, **self._listen_params)
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with conn:
                    await self._configure(conn)
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    self._cache.forget()  # what changed while nobody listened
                    self.listening.set()
                    async for note in conn.notifies():
                        self._cache.forget(note.payload)
            except (psycopg.Error, OSError) as exc:
                logger.info("userdb: not following user changes (%s); retrying", exc)
            finally:
                self.listening.clear()
                self._cache.forget()
            await asyncio.sleep(LISTEN_RETRY)

    #: How the health check (:mod:`pobox.server._health`) names this store.
    health_name = "userdb (PostgreSQL)"

    async def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection (the health check).

        Raises:
            AuthTemporaryError: the database failed or did not answer in time.
        """

        async def work(conn: Conn) -> None:
            await conn.execute("SELECT 1")

        await self._run("health check", work)

    async def check_schema(self) -> None:
        """Check that pobox's users table is there (nothing to check for custom queries).

        Raises:
            pobox.storage.postgres.SchemaError: the schema is missing, older or newer.
            AuthTemporaryError: the database cannot be reached.
        """
        if self.queries is not None:
            return
        from pobox.storage.postgres import check  # noqa: PLC0415 - only for pobox's table

        async def work(conn: Conn) -> None:
            await check(conn, self.schema)

        await self._run("checking the schema", work)

    async def aclose(self) -> None:
        """Close the pool and stop listening; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._opened:
            await self._pool.close()

    # ------------------------------------------------------------------ reading

    async def _fetch(self, username: str, query: sql.Composed | bytes) -> _Row | None:
        async def work(conn: Conn) -> dict[str, object] | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(query, _parameters(username))
                return await cur.fetchone()

        found = await self._run("lookup", work)
        if found is None:
            return None
        user, password, any_password, refused = user_from_columns(username, found)
        return _Row(user, password, any_password, refused)

    async def _row(self, username: str) -> _Row | None:
        """Return the row of ``username`` (the password query), from the cache if fresh."""
        if not _queryable(username):
            return None
        found, row = self._cache.get(username)
        if found:
            return row
        row = await self._fetch(username, self._lookup_sql)
        self._cache.put(username, row)
        return row

    async def _dummy_hash(self) -> str:
        """Return a stored password of the commonest scheme in a sample of the users.

        A real one, so the check of an unknown user's password costs what a real one does
        (the same rounds and memory). Taken again every :data:`DUMMY_REFRESH` seconds; while
        the database cannot give a sample, the last one (or the built-in ARGON2ID) is used.
        """
        now = time.monotonic()
        if now - self._dummy_at < DUMMY_REFRESH:
            return self._dummy
        self._dummy_at = now
        try:
            passwords = await self._sample()
        except AuthTemporaryError as exc:
            logger.info("userdb: cannot sample passwords for the dummy hash: %s", exc)
            return self._dummy
        if any(passwords):
            self._dummy = commonest(passwords, self.default_scheme)
        return self._dummy

    async def _sample(self) -> list[str]:
        """Return up to :data:`DUMMY_SAMPLE` stored passwords."""
        if self.queries is None:
            query = sql.SQL(
                "SELECT password FROM {} WHERE password <> '' ORDER BY username LIMIT %(n)s"
            ).format(self._table)

            async def work(conn: Conn) -> list[str]:
                cur = await conn.execute(query, {"n": DUMMY_SAMPLE})
                return [str(row[0]) for row in await cur.fetchall()]

            return await self._run("sampling passwords", work)
        names = (await self.names())[: DUMMY_SAMPLE // 5] if self._iterate_sql else []
        out = []
        for name in names:
            row = await self._row(name)
            if row is not None and row.password:
                out.append(row.password)
        return out

    async def authenticate(self, username: str, password: bytes) -> User | None:
        """Return the user if ``password`` is right, else ``None`` (also for unknown users).

        One path for everyone (see the module documentation): the client's password is
        checked against the user's stored hash or the dummy, then refused users, users
        without a password and unknown users get ``None``.

        Raises:
            AuthTemporaryError: the database is down or did not answer in time.
        """
        row = await self._row(username)
        if row is not None and row.any_password:
            return None if row.refused else row.user
        real = row is not None and bool(row.password)
        dummy = await self._dummy_hash()  # for everyone: known and unknown take one path
        stored = row.password if row is not None and real else dummy
        matched = await check_password(
            self.workers, stored, password, default_scheme=self.default_scheme, username=username
        )
        if row is None or not real or row.refused:
            return None
        return row.user if matched else None

    async def lookup(self, username: str) -> User | None:
        """Return the user record without checking a password (for delivery).

        Users with ``nologin`` are found too. With custom queries this is the user query.

        Raises:
            AuthTemporaryError: the database is down or did not answer in time.
        """
        if self._user_sql is self._lookup_sql:
            row = await self._row(username)
        elif not _queryable(username):
            row = None
        else:
            row = await self._fetch(username, self._user_sql)
        return None if row is None else row.user

    async def credentials(self, username: str) -> str | None:
        """Return the stored password as ``{SCHEME}data`` of a user who may log in, else ``None``.

        Raises:
            AuthTemporaryError: the database is down or did not answer in time.
        """
        row = await self._row(username)
        if row is None or row.refused or row.any_password or not row.password:
            return None
        return with_scheme(row.password, self.default_scheme)

    async def names(self) -> list[str]:
        """Return every username, sorted by code point (one per line for ``pobox user list``).

        Raises:
            UserdbReadOnly: custom queries without ``postgresql_iterate_query``.
            AuthTemporaryError: the database failed.
        """
        query = self._iterate_sql
        if query is None:
            msg = "listing users needs postgresql_iterate_query (custom queries are in use)"
            raise UserdbReadOnly(msg)

        async def work(conn: Conn) -> list[str]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(query, _parameters(""))
                names = []
                for row in await cur.fetchall():
                    lowered = {key.lower(): value for key, value in row.items()}
                    value = lowered.get("username", lowered.get("user"))
                    if value is None and len(row) == 1:
                        value = next(iter(row.values()))
                    if value is not None:
                        names.append(str(value))
                return names

        return sorted(set(await self._run("listing users", work)))

    # ------------------------------------------------------------------ writing

    def _writable(self) -> sql.Identifier:
        if self.queries is not None:
            msg = (
                "the users are in your own tables (postgresql_password_query): change them "
                "there; pobox user add/passwd/del edit pobox's users table only"
            )
            raise UserdbReadOnly(msg)
        return self._table

    @staticmethod
    def _check_stored(name: str, stored: str) -> None:
        validate_username(name)
        if not _queryable(name):
            msg = f"invalid username {name!r}: more than {MAX_USERNAME} octets or not UTF-8"
            raise PoboxError(msg)
        if "\x00" in stored:
            msg = "the password cannot be stored in PostgreSQL: it contains NUL"
            raise PoboxError(msg)

    async def add_user(
        self,
        name: str,
        stored: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
        home: str | None = None,
        mail: str | None = None,
        quota_bytes: int | None = None,
        quota_messages: int | None = None,
        nologin: bool = False,
    ) -> None:
        """Add a user with the stored password ``stored`` (``{SCHEME}data``).

        Raises:
            UserExists: the user is already there (nothing changed).
            UserdbReadOnly: custom queries are in use.
            PoboxError: the name or a field cannot be stored.
            AuthTemporaryError: the database failed.
        """
        table = self._writable()
        self._check_stored(name, stored)
        for value in (home, mail):
            if value is not None and "\x00" in value:
                msg = "home and mail cannot contain NUL"
                raise PoboxError(msg)
        query = sql.SQL(
            "INSERT INTO {} (username, password, uid, gid, home, mail, quota_bytes,"
            " quota_messages, nologin) VALUES (%(user)s, %(password)s, %(uid)s, %(gid)s,"
            " %(home)s, %(mail)s, %(quota_bytes)s, %(quota_messages)s, %(nologin)s)"
            " ON CONFLICT (username) DO NOTHING RETURNING 1"
        ).format(table)
        values = {
            "user": name,
            "password": stored,
            "uid": uid,
            "gid": gid,
            "home": home,
            "mail": mail,
            "quota_bytes": quota_bytes,
            "quota_messages": quota_messages,
            "nologin": nologin,
        }

        async def work(conn: Conn) -> bool:
            cur = await conn.execute(query, values)
            return await cur.fetchone() is not None

        try:
            added = await self._run("adding a user", work, retry=False)
        except AuthTemporaryError as exc:
            if isinstance(exc.__cause__, psycopg.errors.CheckViolation | psycopg.DataError):
                raise PoboxError(f"cannot add user {name!r}: {exc.__cause__}") from exc
            raise
        self._cache.forget(name)
        if not added:
            msg = f"user {name!r} already exists"
            raise UserExists(msg)

    async def set_password(self, name: str, stored: str) -> bool:
        """Set ``name``'s stored password; return whether the user exists.

        Raises:
            UserdbReadOnly: custom queries are in use.
            AuthTemporaryError: the database failed.
        """
        table = self._writable()
        self._check_stored(name, stored)
        query = sql.SQL(
            "UPDATE {} SET password = %(password)s, changed = now()"
            " WHERE username = %(user)s RETURNING 1"
        ).format(table)

        async def work(conn: Conn) -> bool:
            cur = await conn.execute(query, {"user": name, "password": stored})
            return await cur.fetchone() is not None

        found = await self._run("changing a password", work, retry=False)
        self._cache.forget(name)
        return found

    async def delete_user(self, name: str) -> bool:
        """Remove ``name`` from the users table (not their mail); return whether it was there.

        Raises:
            UserdbReadOnly: custom queries are in use.
            AuthTemporaryError: the database failed.
        """
        table = self._writable()
        if not _queryable(name):
            return False
        query = sql.SQL("DELETE FROM {} WHERE username = %(user)s RETURNING 1").format(table)

        async def work(conn: Conn) -> bool:
            cur = await conn.execute(query, {"user": name})
            return await cur.fetchone() is not None

        found = await self._run("removing a user", work, retry=False)
        self._cache.forget(name)
        return found
