"""The PostgreSQL maildrop store: messages, bodies stored once, locks that cannot go stale.

:class:`PostgresStore` satisfies :class:`pobox.storage.base.MaildropStore` and passes the
same contract suite as the memory and Maildir stores.

* **Delivery** (:meth:`PostgresStore.deliver`) is one transaction: the body is stored once
  per content (SHA-256 of the stored form: one LMTP transaction to 500 users stores it once),
  then the maildrop's counters take the message in under the maildrop row's lock, the quota is
  checked on the new totals, and the message row (the recipient's own header lines, the sizes,
  the UIDL) is inserted. It returns only after COMMIT. If the connection breaks during COMMIT
  the outcome is found by looking (is the message row there, once the backend that ran the
  transaction is gone?) instead of guessed, so a delivery is neither lost nor, when the MTA
  tries again, stored twice.
* **A session** opens with one scan of the message table's primary key (sizes and UIDLs were
  fixed at delivery); RETR streams the body a few chunks at a time, each page a short query,
  so neither a 50 MB message nor a slow client holds memory or a connection.
* **UPDATE** deletes in one transaction, run on the connection that holds the maildrop lock
  after checking that the lock is still held (see :mod:`._locks`); a session that ends
  otherwise deletes nothing.
* **Deleted mail kept** (``pop3_delete_retention``, :class:`~pobox.storage.base.
  DeletedMailRetention`): the UPDATE moves the rows into ``deleted_message`` instead, in the
  same statement and transaction, behind the same lock check; POP3 never lists them and the
  maildrop's counters (the quota) no longer count them, but their bodies stay (a kept row uses
  its body as a message row does). ``pobox restore`` moves them back under new UIDs with their
  UIDL and sizes; what is older than the retention is purged at the maildrop's next UPDATE or
  by ``pobox restore --purge``, and its bodies are collected as those of deleted messages.
* **Bodies** no message uses any more are dropped right after the UPDATE that freed them, safely
  against deliveries reusing them at the same moment (a delivery pins an existing body with a
  ``FOR KEY SHARE`` row lock; the collector locks bodies ``FOR UPDATE SKIP LOCKED`` and only
  then, in a new snapshot, checks that no message uses them).
* **Faults**: every statement runs under ``statement_timeout`` on the server and the same
  timeout on the client; a pooled connection found broken (the server restarted) is replaced
  and a read tried once more; everything else becomes :class:`StorageTemporaryError`
  (``-ERR [SYS/TEMP]``, LMTP ``451 4.3.0``).

May import: the standard library, psycopg, psycopg_pool and :mod:`pobox.storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pobox.storage._wire import wire_size
from pobox.storage.base import (
    INBOX,
    DeletedMessage,
    DeleteResult,
    ImportedMessage,
    IncomingMessage,
    MaildropLocked,
    MailUser,
    MessageGone,
    MessageInfo,
    Quota,
    QuotaExceeded,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
    Usage,
    check_folder,
    is_unique_id,
    restore_folder,
)
from pobox.storage.postgres import _schema
from pobox.storage.postgres._connect import (
    DriverError,
    connection_params,
    error_text,
    is_broken,
    run_pooled,
    set_timeouts,
)
from pobox.storage.postgres._locks import Conn, LockConnection, LockLost, lock_key, split_key
from pobox.storage.postgres._sql import Statements

__all__ = ["PostgresMaildrop", "PostgresStore"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Octets per stored body chunk: RETR holds about this much (times :data:`PAGE_CHUNKS`) of a
#: message in memory; a typical message is one chunk.
CHUNK_SIZE = 256 * 1024
#: Chunks fetched per query while streaming a body.
PAGE_CHUNKS = 2
#: Read-ahead: when a locked session reads a small message, the small messages after it are
#: fetched in the same round trip, up to this many octets and messages, each at most one
#: chunk; POP3 clients read a maildrop in order, and nobody else can delete meanwhile.
READ_AHEAD_OCTETS = 256 * 1024
READ_AHEAD_MESSAGES = 64
#: Messages of the listings a node keeps between sessions (a login whose maildrop did not
#: change since the last one reads two numbers instead of the listing).
SNAPSHOT_CACHE_MESSAGES = 200_000
#: Seconds to keep asking whether a COMMIT whose answer was lost went through.
COMMIT_RESOLVE_TIME = 30.0
#: Bodies no message uses are collected by :meth:`PostgresStore.collect_garbage` once older
#: than this (younger ones may belong to a delivery still in progress on another node).
ORPHAN_AGE = "1 hour"


class Body(Protocol):
    """A message body to store: a :class:`~pobox.storage.spool.Spool` or raw bytes."""

    @property
    def size(self) -> int:
        """Octets of the stored form."""

    @property
    def digest(self) -> str:
        """SHA-256 of the stored form, in hexadecimal."""

    def read_at(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` octets from ``offset``."""

    def chunks(self, size: int = ...) -> Iterator[bytes]:
        """Yield the stored form in chunks of up to ``size`` octets."""


class _BytesBody:
    """Raw bytes as a :class:`Body`, stored exactly as given (no line-ending change)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.digest = hashlib.sha256(data).hexdigest()

    def read_at(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        for start in range(0, len(self._data), size):
            yield self._data[start : start + size]


class _CommitUnknown(Exception):
    """The connection broke while COMMIT was under way: it may or may not have happened."""


def _int(value: object) -> int:
    """Return a column value that must be an integer."""
    if not isinstance(value, int):
        msg = f"expected an integer from the database, got {type(value).__name__}"
        raise TypeError(msg)
    return value


def _bytes(value: object) -> bytes:
    """Return a column value that must be ``bytea``."""
    if not isinstance(value, bytes | memoryview | bytearray):
        msg = f"expected bytea from the database, got {type(value).__name__}"
        raise TypeError(msg)
    return bytes(value)


def uidl_for(uid: int, uidvalidity: int) -> str:
    """Return the UIDL of a message made here: Dovecot's default ``%08Xu%08Xv``."""
    return f"{uid:08X}{uidvalidity:08X}"


def _message_wire_size(header: bytes, body: Body, body_wire: int) -> int:
    """Wire size of ``header`` + ``body``, counting a CR/LF pair across the seam once."""
    seam = header.endswith(b"\r") and body.size > 0 and body.read_at(0, 1) == b"\n"
    return wire_size(header) + body_wire - (1 if seam else 0)


def _map_error(exc: BaseException, what: str) -> StorageError:
    """Translate a driver error into the storage error family."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return StoragePermanentError(
            f"{what}: the database has no pobox schema ({exc}); run `pobox db upgrade -c CONFIG`"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return StoragePermanentError(f"{what}: {exc}")
    if isinstance(exc, PoolTimeout):
        return StorageTemporaryError(f"{what}: no database connection: {exc}")
    if isinstance(exc, TimeoutError):
        return StorageTemporaryError(f"{what}: the database did not answer in time")
    return StorageTemporaryError(f"{what}: {error_text(exc)}")


_retryable = is_broken


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A maildrop's listing, as a session uses it; immutable, so sessions may share it.

    Attributes:
        counters: the maildrop's ``(next_uid, messages, created)`` when it was read: any
            delivery raises the first, any deletion lowers the second, a maildrop deleted
            and made again has another third, so equal counters later mean an equal listing.
        messages: the listing in UID order.
        rows: key → (UID, body digest).
        index: key → position in ``messages``.
    """

    counters: tuple[int, int, int]
    messages: tuple[MessageInfo, ...]
    rows: dict[str, tuple[int, bytes]]
    index: dict[str, int]

    @classmethod
    def from_rows(
        cls, counters: tuple[int, int, int], rows: Sequence[tuple[object, ...]]
    ) -> Snapshot:
        """Build a snapshot from the rows of the ``snapshot`` statement."""
        messages: list[MessageInfo] = []
        by_key: dict[str, tuple[int, bytes]] = {}
        index: dict[str, int] = {}
        for uid, size, uidl, digest, *folder in rows:
            key = str(uid)
            index[key] = len(messages)
            where = str(folder[0]) if folder else INBOX
            messages.append(MessageInfo(key=key, size=_int(size), uidl=str(uidl), folder=where))
            by_key[key] = (_int(uid), _bytes(digest))
        return cls(counters, tuple(messages), by_key, index)


#: An empty maildrop's snapshot (also one that does not exist yet).
_EMPTY = Snapshot((0, 0, 0), (), {}, {})


class PostgresStore:
    """Maildrops in PostgreSQL; satisfies :class:`pobox.storage.base.MaildropStore`."""

    def __init__(
        self,
        dsn: str = "",
        *,
        schema: str = "pobox",
        pool_min: int = 1,
        pool_max: int = 10,
        lock_connections: int = 2,
        timeout: float = 10.0,
        lock_check_interval: float = 10.0,
        retention: int = 0,
    ) -> None:
        """Create a store; it connects at first use.

        Args:
            dsn: a libpq conninfo string or URI; what it leaves out comes from the libpq
                environment variables (``PGHOST``, ``PGUSER``, ...) and defaults.
            schema: the schema of pobox's tables.
            pool_min, pool_max: connections of the pool that serves reads and deliveries.
            lock_connections: connections that carry the maildrop locks and the UPDATEs.
            timeout: seconds any statement (and any wait for a connection) may take.
            lock_check_interval: seconds between probes of a lock connection holding locks.
            retention: keep messages deleted over POP3 this many seconds, for ``pobox
                restore`` (``pop3_delete_retention``); 0: delete them for good.
        """
        self._dsn = dsn
        self._schema = schema
        self._sql = Statements.for_schema(schema)
        self._timeout = timeout
        self._retention = max(0, retention)
        params, self._lock_params = connection_params(dsn, timeout, "pobox")
        # The statements are UTF-8 bytes (:mod:`._sql`), whatever the database's encoding.
        self._params: dict[str, str] = {**params, "client_encoding": "UTF8"}
        self._pool = AsyncConnectionPool(
            dsn,
            kwargs={**self._params, "autocommit": True},
            min_size=pool_min,
            max_size=max(pool_min, pool_max),
            open=False,
            configure=self._configure,
            timeout=timeout,
            name="pobox",
            reconnect_timeout=0,
        )
        self._locks = [
            LockConnection(
                self._connect_lock,
                timeout=timeout,
                check_interval=lock_check_interval,
                name=f"lock-{number}",
            )
            for number in range(max(1, lock_connections))
        ]
        self._held: dict[int, PostgresMaildrop] = {}
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._cached_messages = 0
        self._opened = False
        self._closed = False

    # ------------------------------------------------------------------ connections

    @property
    def schema(self) -> str:
        """The schema of pobox's tables."""
        return self._schema

    @property
    def retention(self) -> int:
        """Seconds deleted mail is kept (``pop3_delete_retention``); 0: not kept."""
        return self._retention

    async def _configure(self, conn: Conn) -> None:
        """Put every statement of a new connection under the timeouts."""
        await set_timeouts(conn, self._timeout)

    async def _connect_lock(self) -> Conn:
        """Open a lock connection: autocommit, keepalives, the same timeouts."""
        conninfo = make_conninfo(self._dsn, **self._params, **self._lock_params)
        conn: Conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        try:
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _ensure_open(self) -> None:
        if self._closed:
            msg = "the store is closed"
            raise StorageTemporaryError(msg)
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)

    async def _run(
        self, what: str, work: Callable[[Conn], Awaitable[_T]], *, retry: bool = True
    ) -> _T:
        """Run ``work`` on a pooled connection under the timeout; map errors.

        A connection that turns out broken (the server restarted since it was pooled) is
        dropped and, if ``retry``, the work is done once more on a fresh one.
        """
        await self._ensure_open()
        try:
            return await run_pooled(self._pool, work, timeout=self._timeout, what=what, retry=retry)
        except DriverError as exc:
            raise _map_error(exc, what) from exc

    #: How the health check (:mod:`pobox.server._health`) names this store.
    health_name = "mail store (PostgreSQL)"

    async def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection (the health check).

        Raises:
            StorageTemporaryError: the database failed or did not answer in time.
        """

        async def work(conn: Conn) -> None:
            await conn.execute("SELECT 1")

        await self._run("health check", work)

    async def check_schema(self) -> int:
        """Return the schema version, checking it is the one this pobox expects.

        Raises:
            pobox.storage.postgres.SchemaError: the schema is missing, older or newer.
            StorageTemporaryError: the database cannot be reached.
        """

        async def work(conn: Conn) -> int:
            return await _schema.check(conn, self._schema)

        return await self._run("checking the schema", work)

    # ------------------------------------------------------------------ sessions

    @staticmethod
    def _mailbox(user: MailUser) -> str:
        name = user.name
        if not name or "\x00" in name:
            msg = f"{name!r} cannot name a maildrop"
            raise StoragePermanentError(msg)
        return name

    async def open(self, user: MailUser, *, lock: bool = True) -> PostgresMaildrop:
        """Open ``user``'s maildrop, locking it across every node if ``lock``.

        Raises:
            MaildropLocked: a session on this or another node holds the lock.
            StorageTemporaryError: the database cannot be reached or did not answer in time.
        """
        mailbox = self._mailbox(user)
        await self._ensure_open()
        maildrop = PostgresMaildrop(self, mailbox)
        if lock:
            await self._lock(maildrop)
        try:
            snapshot = await self._run("opening the maildrop", lambda c: self._snapshot(c, mailbox))
        except BaseException:
            await maildrop.close()
            raise
        maildrop.snapshot = snapshot
        return maildrop

    async def open_folders(
        self, user: MailUser, folders: Sequence[str], *, lock: bool = True
    ) -> PostgresMaildrop:
        """Open ``user``'s maildrop with the messages of ``folders``, in UID (arrival) order.

        A message moved between folders keeps its row, so its UID and UIDL. The listing is
        read afresh (not from the cache of INBOX listings).

        Raises:
            FolderNameError: a folder name is not acceptable.
            MaildropLocked, StorageTemporaryError: as :meth:`open`.
        """
        names = list(dict.fromkeys(check_folder(name) for name in folders))
        mailbox = self._mailbox(user)
        await self._ensure_open()
        maildrop = PostgresMaildrop(self, mailbox)
        if lock:
            await self._lock(maildrop)

        async def work(conn: Conn) -> Snapshot:
            return await self._snapshot(conn, mailbox, names)

        try:
            maildrop.snapshot = await self._run("opening the maildrop", work)
        except BaseException:
            await maildrop.close()
            raise
        return maildrop

    async def folder_names(self, user: MailUser) -> tuple[str, ...]:
        """Return the folders of ``user``'s maildrop that hold messages (``pobox export``)."""
        mailbox = self._mailbox(user)

        async def work(conn: Conn) -> tuple[str, ...]:
            cur = await conn.execute(self._sql.folder_names, {"mailbox": mailbox})
            return tuple(str(row[0]) for row in await cur.fetchall())

        return await self._run("listing folders", work)

    async def move_to_folder(self, user: MailUser, keys: Sequence[str], folder: str) -> int:
        """Move messages (keys of a snapshot) into ``folder``; return how many moved.

        What an IMAP server's MOVE would do, for tools and tests: the messages keep their
        UID and UIDL.

        Raises:
            FolderNameError: the folder name is not acceptable.
            StorageTemporaryError: the database failed (nothing moved).
        """
        folder = check_folder(folder)
        mailbox = self._mailbox(user)
        uids = [int(key) for key in keys if key.isdigit()]

        async def work(conn: Conn) -> int:
            async with conn.transaction():
                values = {"mailbox": mailbox, "uids": uids, "folder": folder}
                cur = await conn.execute(self._sql.move, values)
                if cur.rowcount:
                    await conn.execute(self._sql.touch, values)
                return cur.rowcount

        return await self._run("moving messages", work)

    async def _snapshot(
        self, conn: Conn, mailbox: str, folders: Sequence[str] | None = None
    ) -> Snapshot:
        """Return the listing of ``mailbox``: the cached one if its counters did not move.

        ``folders``: the listing of those folders merged (``None``: the INBOX's). A move
        between folders raises the counters too (``touch``).
        """
        cur = await conn.execute(self._sql.counters, {"mailbox": mailbox}, binary=True)
        row = await cur.fetchone()
        if row is None:
            return _EMPTY
        counters = (_int(row[0]), _int(row[1]), _int(row[2]))
        # Mailbox names have no NUL, so the key of a folder listing is no mailbox's key.
        key = mailbox if folders is None else "\0".join((mailbox, *folders))
        cached = self._snapshots.get(key)
        if cached is not None and cached.counters == counters:
            self._snapshots.move_to_end(key)
            return cached
        if folders is None:
            cur = await conn.execute(self._sql.snapshot, {"mailbox": mailbox}, binary=True)
        else:
            cur = await conn.execute(
                self._sql.snapshot_folders,
                {"mailbox": mailbox, "folders": list(folders)},
                binary=True,
            )
        snapshot = Snapshot.from_rows(counters, await cur.fetchall())
        self._remember(key, snapshot)
        return snapshot

    def _remember(self, mailbox: str, snapshot: Snapshot) -> None:
        """Keep ``snapshot``, forgetting the least recently used ones beyond the bound."""
        old = self._snapshots.pop(mailbox, None)
        if old is not None:
            self._cached_messages -= len(old.messages)
        if len(snapshot.messages) > SNAPSHOT_CACHE_MESSAGES // 2:
            return
        self._snapshots[mailbox] = snapshot
        self._cached_messages += len(snapshot.messages)
        while self._cached_messages > SNAPSHOT_CACHE_MESSAGES:
            _, dropped = self._snapshots.popitem(last=False)
            self._cached_messages -= len(dropped.messages)

    async def _lock(self, maildrop: PostgresMaildrop) -> None:
        key = maildrop.key
        if key in self._held:  # advisory locks are re-entrant per backend: refuse here
            msg = f"maildrop of {maildrop.mailbox!r} is locked by another session on this node"
            raise MaildropLocked(msg)
        self._held[key] = maildrop
        connection = self._locks[key % len(self._locks)]
        try:
            if not await connection.try_lock(key):
                msg = f"maildrop of {maildrop.mailbox!r} is locked by another session"
                raise MaildropLocked(msg)
            connection.add(key, maildrop)
        except (LockLost, psycopg.Error, TimeoutError) as exc:
            del self._held[key]
            raise _map_error(exc, "locking the maildrop") from exc
        except BaseException:  # refused, or the login given up (cancelled)
            del self._held[key]
            raise
        maildrop.lock_connection = connection

    async def release(self, maildrop: PostgresMaildrop) -> None:
        """Release ``maildrop``'s lock if it still holds it (:meth:`PostgresMaildrop.close`)."""
        connection, maildrop.lock_connection = maildrop.lock_connection, None
        key = maildrop.key
        try:
            if connection is not None and connection.holds(key):
                connection.discard(key)
                with contextlib.suppress(LockLost, psycopg.Error, TimeoutError):
                    await connection.unlock(key)
        finally:
            if self._held.get(key) is maildrop:
                del self._held[key]

    def lock_connections(self) -> list[LockConnection]:
        """The lock connections (for tests and the admin tools)."""
        return list(self._locks)

    async def read_page(
        self, digest: bytes, seq: int, *, header_of: tuple[str, int] | None = None
    ) -> tuple[bytes | None, int | None, list[tuple[int, bytes]]]:
        """Fetch chunks ``seq``... of a body, and the message's header lines if asked.

        Returns:
            ``(header, chunks, page)``: the header (``None`` if the message is gone or was
            not asked for), the body's number of chunks (``None`` if the body is gone), and
            ``(seq, data)`` of up to :data:`PAGE_CHUNKS` chunks.
        """

        if header_of is None:
            statement = self._sql.chunks
            values: dict[str, object] = {"digest": digest, "seq": seq, "limit": PAGE_CHUNKS}
        else:
            statement = self._sql.first_page
            values = {"digest": digest, "limit": PAGE_CHUNKS}
            values.update(mailbox=header_of[0], uid=header_of[1])

        async def work(conn: Conn) -> tuple[bytes | None, int | None, list[tuple[int, bytes]]]:
            cur = await conn.execute(statement, values, binary=True)
            rows = await cur.fetchall()
            if not rows:
                return None, None, []
            header = None if rows[0][0] is None else _bytes(rows[0][0])
            chunks = _int(rows[0][1])
            page = [(_int(s), _bytes(d)) for _, _, s, d in rows if s is not None]
            return header, chunks, page

        return await self._run("reading a message", work)

    async def read_small(self, mailbox: str, wanted: list[tuple[int, bytes]]) -> dict[int, bytes]:
        """Return whole messages ``(uid, digest)`` of ``mailbox`` whose body is one chunk.

        Messages that are gone or larger are left out.
        """

        values = {
            "mailbox": mailbox,
            "uids": [uid for uid, _ in wanted],
            "digests": list({digest for _, digest in wanted}),
        }

        async def work(conn: Conn) -> dict[int, bytes]:
            cur = await conn.execute(self._sql.read_ahead, values, binary=True)
            header: dict[int, bytes] = {}
            body: dict[bytes, bytes] = {}
            for kind, uid, key, data in await cur.fetchall():
                if kind == 0:
                    header[_int(uid)] = _bytes(key)
                else:
                    body[_bytes(key)] = b"" if data is None else _bytes(data)
            return {
                uid: header[uid] + body[digest]
                for uid, digest in wanted
                if uid in header and digest in body
            }

        return await self._run("reading messages", work)

    async def update(self, maildrop: PostgresMaildrop, uids: list[int]) -> list[bytes]:
        """Delete ``uids`` from ``maildrop`` in one transaction; return the freed digests.

        A locked maildrop's UPDATE runs on its lock connection and checks the lock first. If
        the connection breaks during COMMIT, the outcome is found by looking (:meth:`_settle`):
        when none of the messages is there any more, the deletion is reported as done, not as
        failed with the messages gone.

        Raises:
            StorageTemporaryError: the lock is gone, or the database failed; nothing deleted.
        """
        connection = maildrop.lock_connection
        fence = split_key(maildrop.key) if connection is not None else None
        retention = self._retention
        now = int(time.time())
        #: Whether the COMMIT is under way, what it frees, the backend that runs it.
        state: dict[str, object] = {"committing": False, "freed": []}

        async def work(conn: Conn) -> list[bytes]:
            state["committing"] = False
            state["pid"] = conn.info.backend_pid
            async with conn.transaction():
                if fence is not None:
                    cur = await conn.execute(
                        self._sql.fence, {"classid": fence[0], "objid": fence[1]}
                    )
                    row = await cur.fetchone()
                    if row is None or not row[0]:
                        msg = "the maildrop lock is no longer held: nothing deleted"
                        raise StorageTemporaryError(msg)
                values = {"mailbox": maildrop.mailbox, "uids": uids}
                if retention:
                    cur = await conn.execute(self._sql.keep, {**values, "now": now})
                else:
                    cur = await conn.execute(self._sql.delete, values)
                rows = await cur.fetchall()
                freed = [] if retention else [_bytes(digest) for _, _, digest in rows]
                if rows:
                    await conn.execute(
                        self._sql.uncount,
                        {
                            "mailbox": maildrop.mailbox,
                            "messages": len(rows),
                            "octets": sum(_int(size) for _, size, _ in rows),
                        },
                    )
                if retention:
                    # After the maildrop row's lock, as a restore takes them: no deadlock.
                    cur = await conn.execute(
                        self._sql.purge_kept,
                        {"mailbox": maildrop.mailbox, "before": now - retention},
                    )
                    freed = [_bytes(row[0]) for row in await cur.fetchall()]
                state["freed"] = freed
                state["committing"] = True  # the block's end is the COMMIT
            return freed

        try:
            return await self._update_on(connection, maildrop, work)
        except StorageTemporaryError as failure:
            if not state["committing"]:
                raise
            values = {"mailbox": maildrop.mailbox, "uids": uids, "pid": state["pid"]}
            await self._settle("deleting messages", self._sql.deleted, values, failure)
            freed_list = state["freed"]
            assert isinstance(freed_list, list)
            return freed_list

    async def _update_on(
        self,
        connection: LockConnection | None,
        maildrop: PostgresMaildrop,
        work: Callable[[Conn], Awaitable[list[bytes]]],
    ) -> list[bytes]:
        """Run an UPDATE's ``work`` on the maildrop's lock connection, or a pooled one."""
        if connection is None:
            return await self._run("deleting messages", work, retry=False)
        if maildrop.lost:
            msg = "the maildrop lock was lost: nothing deleted"
            raise StorageTemporaryError(msg)
        try:
            async with connection.using() as conn:
                return await work(conn)
        except StorageError:
            raise
        except (LockLost, psycopg.Error, TimeoutError) as exc:
            raise _map_error(exc, "deleting messages") from exc

    async def note_retrieved(self, mailbox: str, pairs: list[tuple[int, float]]) -> None:
        """Set the first retrieval of messages ``(uid, when)`` of ``mailbox`` that have none.

        Raises:
            StorageTemporaryError: the database failed or did not answer in time.
        """
        params = {
            "mailbox": mailbox,
            "uids": [uid for uid, _ in pairs],
            "times": [float(when) for _, when in pairs],
        }

        async def work(conn: Conn) -> None:
            await conn.execute(self._sql.note_retrieved, params)

        await self._run("recording retrievals", work)

    async def retrieved_before(self, mailbox: str, uids: list[int], when: float) -> set[int]:
        """Return those of ``uids`` of ``mailbox`` first retrieved at or before ``when``.

        Raises:
            StorageTemporaryError: the database failed or did not answer in time.
        """
        params = {"mailbox": mailbox, "uids": uids, "when": float(when)}

        async def work(conn: Conn) -> set[int]:
            cur = await conn.execute(self._sql.retrieved_before, params)
            return {_int(row[0]) for row in await cur.fetchall()}

        return await self._run("reading retrievals", work)

    # ------------------------------------------------------------------ delivery

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Store ``message`` in ``user``'s maildrop within ``quota``; return its key.

        Returns after COMMIT. The body is stored once per content, whoever it is for.

        Raises:
            QuotaExceeded: the message does not fit (nothing stored).
            StorageTemporaryError: the database failed (nothing stored).
        """
        body = message.body
        wire = _message_wire_size(message.header, body, body.wire_size)
        return await self._store(user, message.header, body, wire, quota=quota)

    async def deliver_to_folder(
        self,
        user: MailUser,
        message: IncomingMessage,
        folder: str,
        *,
        quota: Quota | None = None,
    ) -> str:
        """Store ``message`` in ``folder`` of ``user``'s maildrop (:meth:`deliver`).

        The quota counts every folder's messages.

        Raises:
            FolderNameError: the folder name is not acceptable.
            QuotaExceeded, StorageTemporaryError: as :meth:`deliver`.
        """
        folder = check_folder(folder)
        body = message.body
        wire = _message_wire_size(message.header, body, body.wire_size)
        return await self._store(user, message.header, body, wire, quota=quota, folder=folder)

    async def append(
        self,
        user: MailUser,
        data: bytes,
        *,
        uidl: str | None = None,
        size_on_wire: int | None = None,
    ) -> str:
        """Store ``data`` exactly as given (line endings untouched); return its key.

        For tests and imports: no quota, no trace headers. ``uidl`` and ``size_on_wire``
        keep what another server reported for the message (the UIDL must be unique in the
        maildrop and made of RFC 1939 §7 characters); by default they are made as for a
        delivery.
        """
        wire = wire_size(data) if size_on_wire is None else size_on_wire
        return await self._store(user, b"", _BytesBody(data), wire, uidl=uidl)

    async def _store(
        self,
        user: MailUser,
        header: bytes,
        body: Body,
        wire: int,
        *,
        quota: Quota | None = None,
        uidl: str | None = None,
        folder: str = INBOX,
    ) -> str:
        mailbox = self._mailbox(user)
        digest = bytes.fromhex(body.digest)
        values = {
            "mailbox": mailbox,
            "uidvalidity": int(time.time()),
            "size": len(header) + body.size,
            "wire_size": wire,
            "digest": digest,
            "header": header,
            "folder": folder,
        }

        #: What the transaction got to: its backend, the UID, whether COMMIT was sent.
        state: dict[str, object] = {"committing": False}

        async def work(conn: Conn) -> int:
            state["committing"] = False
            state["pid"] = conn.info.backend_pid
            try:
                await conn.execute("BEGIN")
                await self._put_body(conn, digest, body)
                cur = await conn.execute(self._sql.count, values)
                row = await cur.fetchone()
                assert row is not None
                uid, uidvalidity, messages, octets = row
                assert isinstance(uid, int)
                assert isinstance(uidvalidity, int)
                state["uid"] = uid
                _check_quota(quota, _int(messages), _int(octets), len(header) + body.size)
                await conn.execute(
                    self._sql.insert_message,
                    {**values, "uid": uid, "uidl": uidl or uidl_for(uid, uidvalidity)},
                )
            except BaseException:
                if not conn.closed and not conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK")
                raise
            state["committing"] = True
            try:
                await conn.execute("COMMIT")
            except psycopg.OperationalError as exc:
                if conn.closed or conn.broken:  # no retry: it may have committed
                    raise _CommitUnknown from exc
                raise
            return uid

        try:
            uid = await self._run("delivering", work)
        except (_CommitUnknown, StorageTemporaryError) as exc:
            if not state["committing"]:
                raise
            failure = (
                exc
                if isinstance(exc, StorageError)
                else _map_error(exc.__cause__ or exc, "delivering")
            )
            uid = _int(state["uid"])
            found = {**values, "uid": uid, "pid": state["pid"]}
            await self._settle("delivering", self._sql.delivered, found, failure)
        return str(uid)

    async def import_messages(self, user: MailUser, messages: Sequence[ImportedMessage]) -> int:
        """Store ``messages`` in ``user``'s maildrop in one transaction, keeping UIDL and size.

        For ``pobox import``: a message whose UIDL the maildrop already has is skipped, so an
        import run again after an interruption stores nothing twice. The stored bytes are the
        message as given; the wire size is the one given (what the old server reported). No
        quota, no trace headers. Returns after COMMIT.

        Returns:
            How many messages were stored (the others were there already).

        Raises:
            StoragePermanentError: a UIDL is not an RFC 1939 unique-id.
            StorageTemporaryError: the database failed (nothing of this batch stored).
        """
        mailbox = self._mailbox(user)
        for message in messages:
            if not is_unique_id(message.uidl):
                msg = f"import: {message.uidl!r} is not an RFC 1939 unique-id"
                raise StoragePermanentError(msg)
        bodies = [_BytesBody(message.data) for message in messages]

        async def work(conn: Conn) -> int:
            try:
                await conn.execute("BEGIN")
                cur = await conn.execute(
                    self._sql.lock_mailbox,
                    {"mailbox": mailbox, "uidvalidity": int(time.time())},
                )
                row = await cur.fetchone()
                assert row is not None
                first = _int(row[0])
                cur = await conn.execute(
                    self._sql.known_uidls,
                    {"mailbox": mailbox, "uidls": [message.uidl for message in messages]},
                )
                seen = {str(row[0]) for row in await cur.fetchall()}
                rows = []
                for message, body in zip(messages, bodies, strict=True):
                    if message.uidl not in seen:
                        seen.add(message.uidl)
                        rows.append((message, body))
                if not rows:
                    await conn.execute("ROLLBACK")
                    return 0
                await self._put_bodies(conn, {body.digest: body for _, body in rows})
                async with conn.cursor().copy(self._sql.copy_messages) as copy:
                    copy.set_types(["text", "int8", "text", "int8", "int8", "bytea", "bytea"])
                    for uid, (message, body) in enumerate(rows, first):
                        await copy.write_row(
                            (
                                mailbox,
                                uid,
                                message.uidl,
                                message.size,
                                body.size,
                                bytes.fromhex(body.digest),
                                b"",
                            )
                        )
                await conn.execute(
                    self._sql.take_in,
                    {
                        "mailbox": mailbox,
                        "next_uid": first + len(rows),
                        "messages": len(rows),
                        "octets": sum(body.size for _, body in rows),
                    },
                )
                await conn.execute("COMMIT")
            except BaseException:
                if not conn.closed and not conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK")
                raise
            return len(rows)

        return await self._run("importing", work, retry=False)

    async def _settle(
        self, what: str, statement: bytes, values: dict[str, object], failure: StorageError
    ) -> None:
        """Find out, by looking, whether a transaction whose COMMIT went unanswered committed.

        ``statement`` answers two questions: is what the transaction wrote (or removed) so
        in the tables, and is the backend that ran it still alive (``values["pid"]``)? While
        it is, the COMMIT may still be going on: ask again. Once it is gone, what is in the
        tables is the outcome. (Not ``pg_xact_status``: after a crash, a transaction id
        whose commit never reached the disk can be given to a later transaction, which
        commits; the id would then answer "committed" for what did not.) If what was
        delivered is already retrieved and deleted by then, it counts as not delivered: the
        MTA's retry brings a second copy, and nothing is lost.

        Raises:
            StorageError: ``failure``, as it did not commit; or a temporary error if nobody
                can tell within :data:`COMMIT_RESOLVE_TIME`.
        """
        deadline = time.monotonic() + COMMIT_RESOLVE_TIME

        async def work(conn: Conn) -> tuple[bool, bool]:
            cur = await conn.execute(statement, values)
            row = await cur.fetchone()
            assert row is not None
            return bool(row[0]), bool(row[1])

        while time.monotonic() < deadline:
            try:
                done, running = await self._run("resolving a commit", work)
            except StorageTemporaryError:
                await asyncio.sleep(0.5)
                continue
            if running:
                await asyncio.sleep(0.1)
                continue
            if not done:
                raise failure
            logger.warning("%s: COMMIT went unanswered but did commit", what)
            return
        msg = f"{what}: the outcome of a COMMIT is unknown: {failure}"
        raise StorageTemporaryError(msg)

    async def _put_body(self, conn: Conn, digest: bytes, body: Body) -> None:
        """Make the body with ``digest`` exist, and stay, until this transaction ends."""
        while True:
            cur = await conn.execute(
                self._sql.insert_body,
                {"digest": digest, "size": body.size, "chunks": -(-body.size // CHUNK_SIZE)},
            )
            if await cur.fetchone() is not None:  # new: store its chunks
                async with conn.cursor().copy(self._sql.copy_chunks) as copy:
                    copy.set_types(["bytea", "int4", "bytea"])
                    for seq, chunk in enumerate(body.chunks(CHUNK_SIZE)):
                        await copy.write_row((digest, seq, chunk))
                return
            cur = await conn.execute(self._sql.pin_body, {"digest": digest})
            if await cur.fetchone() is not None:  # there, and pinned until COMMIT
                return
            # Collected between the two statements: store it again.

    async def _put_bodies(self, conn: Conn, bodies: dict[str, _BytesBody]) -> None:
        """Make every body of ``bodies`` (by hex digest) exist and stay until COMMIT.

        As :meth:`_put_body` does for one body, with one statement per step for all of them.
        """
        todo = dict(bodies)
        while todo:
            digests = [bytes.fromhex(digest) for digest in todo]
            cur = await conn.execute(
                self._sql.insert_bodies,
                {
                    "digests": digests,
                    "sizes": [body.size for body in todo.values()],
                    "chunks": [-(-body.size // CHUNK_SIZE) for body in todo.values()],
                },
            )
            new = {_bytes(row[0]).hex() for row in await cur.fetchall()}
            if new:
                async with conn.cursor().copy(self._sql.copy_chunks) as copy:
                    copy.set_types(["bytea", "int4", "bytea"])
                    for digest in new:
                        raw = bytes.fromhex(digest)
                        for seq, chunk in enumerate(todo[digest].chunks(CHUNK_SIZE)):
                            await copy.write_row((raw, seq, chunk))
            rest = [bytes.fromhex(digest) for digest in todo if digest not in new]
            pinned: set[str] = set()
            if rest:
                cur = await conn.execute(self._sql.pin_bodies, {"digests": rest})
                pinned = {_bytes(row[0]).hex() for row in await cur.fetchall()}
            # Collected between the two statements: store those again.
            todo = {d: b for d, b in todo.items() if d not in new and d not in pinned}

    async def usage(self, user: MailUser) -> Usage:
        """Return what ``user``'s maildrop holds (kept by every delivery and UPDATE)."""
        mailbox = self._mailbox(user)

        async def work(conn: Conn) -> tuple[object, ...] | None:
            cur = await conn.execute(self._sql.usage, {"mailbox": mailbox})
            return await cur.fetchone()

        row = await self._run("reading the usage", work)
        return Usage(octets=0, messages=0) if row is None else Usage(_int(row[0]), _int(row[1]))

    # ------------------------------------------------------------------ deleted mail kept

    async def deleted_messages(self, user: MailUser) -> tuple[DeletedMessage, ...]:
        """Return the messages kept for ``user`` (``pop3_delete_retention``), oldest first."""
        mailbox = self._mailbox(user)

        async def work(conn: Conn) -> list[tuple[object, ...]]:
            cur = await conn.execute(self._sql.kept, {"mailbox": mailbox})
            return await cur.fetchall()

        rows = await self._run("listing deleted mail", work)
        return tuple(
            DeletedMessage(str(uidl), _int(size), _int(at), str(folder))
            for uidl, size, at, folder in rows
        )

    async def restore_deleted(
        self,
        user: MailUser,
        *,
        since: int | None = None,
        uidls: Sequence[str] = (),
        folders: Sequence[str] | None = None,
    ) -> tuple[DeletedMessage, ...]:
        """Move kept messages back into the maildrop with their UIDL and size; return them.

        One transaction: the rows leave ``deleted_message`` and come back into ``message``
        under new UIDs (after every message there, in deletion order), counted again in the
        maildrop's totals (no quota check: it is the administrator's call). A kept message
        whose UIDL the maildrop has again stays kept; of several kept with one UIDL, the last
        deleted comes back. Each goes into the folder it was deleted from, or the INBOX if
        ``folders`` does not list it (:func:`~pobox.storage.base.restore_folder`).

        Raises:
            StorageTemporaryError: the database failed (nothing restored).
        """
        mailbox = self._mailbox(user)
        wanted = list(dict.fromkeys(uidls))

        async def work(conn: Conn) -> list[DeletedMessage]:
            async with conn.transaction():
                # The maildrop row first, as deliveries and UPDATEs lock it (no deadlock).
                cur = await conn.execute(
                    self._sql.lock_mailbox, {"mailbox": mailbox, "uidvalidity": int(time.time())}
                )
                row = await cur.fetchone()
                assert row is not None
                first = _int(row[0])
                cur = await conn.execute(
                    self._sql.restorable, {"mailbox": mailbox, "since": since, "uidls": wanted}
                )
                by_uidl: dict[str, tuple[object, ...]] = {}
                for found in await cur.fetchall():
                    by_uidl[str(found[2])] = found  # the last deleted of a UIDL wins
                chosen = sorted(by_uidl.values(), key=lambda r: (_int(r[8]), _int(r[0])))
                if not chosen:
                    return []
                targets = [restore_folder(str(r[9]), folders) for r in chosen]
                await conn.execute(
                    self._sql.unkeep, {"mailbox": mailbox, "ids": [r[0] for r in chosen]}
                )
                await conn.execute(
                    self._sql.restore_rows,
                    {
                        "mailbox": mailbox,
                        "uids": list(range(first, first + len(chosen))),
                        "uidls": [r[2] for r in chosen],
                        "wire_sizes": [r[3] for r in chosen],
                        "sizes": [r[4] for r in chosen],
                        "digests": [r[5] for r in chosen],
                        "headers": [r[6] for r in chosen],
                        "delivered": [r[7] for r in chosen],
                        "folders": targets,
                    },
                )
                await conn.execute(
                    self._sql.take_in,
                    {
                        "mailbox": mailbox,
                        "next_uid": first + len(chosen),
                        "messages": len(chosen),
                        "octets": sum(_int(r[4]) for r in chosen),
                    },
                )
            return [
                DeletedMessage(str(r[2]), _int(r[3]), _int(r[8]), folder)
                for r, folder in zip(chosen, targets, strict=True)
            ]

        return tuple(await self._run("restoring deleted mail", work, retry=False))

    async def purge_deleted(self, user: MailUser, *, now: int | None = None) -> int:
        """Remove for good what was kept longer than the retention; return how many.

        Their bodies are collected right after, unless another message uses them.
        """
        mailbox = self._mailbox(user)
        stamp = int(time.time()) if now is None else now
        before = stamp - self._retention

        async def work(conn: Conn) -> list[bytes]:
            cur = await conn.execute(self._sql.purge_kept, {"mailbox": mailbox, "before": before})
            return [_bytes(row[0]) for row in await cur.fetchall()]

        digests = await self._run("purging deleted mail", work, retry=False)
        await self.collect(list(dict.fromkeys(digests)))
        return len(digests)

    async def purge_all_deleted(self, *, now: int | None = None, batch: int = 1000) -> int:
        """Purge what every maildrop kept longer than the retention; return how many.

        For ``pobox db gc``: a maildrop whose user never logs in again has no UPDATE to
        purge it. Nothing with no retention set. A batch per transaction, bodies collected
        after each.
        """
        if not self._retention:
            return 0
        stamp = int(time.time()) if now is None else now
        values = {"before": stamp - self._retention, "limit": batch}
        total = 0
        while True:

            async def work(conn: Conn) -> list[bytes]:
                cur = await conn.execute(self._sql.purge_all_kept, values)
                return [_bytes(row[0]) for row in await cur.fetchall()]

            digests = await self._run("purging deleted mail", work, retry=False)
            await self.collect(list(dict.fromkeys(digests)))
            total += len(digests)
            if len(digests) < batch:
                return total

    # ------------------------------------------------------------------ garbage

    async def collect(self, digests: list[bytes]) -> None:
        """Drop the bodies of ``digests`` that no message uses any more; log a failure.

        Run right after the UPDATE that freed them. Its COMMIT need not wait for the disk
        (``synchronous_commit = off``): a collection lost in a crash leaves bodies that
        :meth:`collect_garbage` finds later, never a message without its body.
        """
        if not digests:
            return
        try:
            await self._collect(digests)
        except StorageError as exc:
            logger.warning("collecting %d unused bodies failed: %s", len(digests), exc)

    async def _collect(self, digests: list[bytes]) -> int:
        """Drop the unused bodies among ``digests``; return how many."""

        async def work(conn: Conn) -> int:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit TO off")
                cur = await conn.execute(self._sql.lock_bodies, {"digests": digests})
                locked = [_bytes(row[0]) for row in await cur.fetchall()]
                if not locked:
                    return 0
                cur = await conn.execute(self._sql.unused_bodies, {"digests": locked})
                unused = [_bytes(row[0]) for row in await cur.fetchall()]
                if unused:
                    await conn.execute(self._sql.drop_chunks, {"digests": unused})
                    await conn.execute(self._sql.drop_bodies, {"digests": unused})
                return len(unused)

        return await self._run("collecting unused bodies", work, retry=False)

    async def collect_garbage(self, *, age: str = ORPHAN_AGE, batch: int = 1000) -> int:
        """Drop every body older than ``age`` that no message uses; return how many.

        Bodies are dropped right after the UPDATE that frees them; this sweep catches those
        left by an UPDATE whose node died before that (``pobox db gc``).
        """
        total = 0
        while True:

            async def work(conn: Conn) -> list[bytes]:
                cur = await conn.execute(self._sql.orphans, {"age": age, "limit": batch})
                return [_bytes(row[0]) for row in await cur.fetchall()]

            candidates = await self._run("finding unused bodies", work)
            if not candidates:
                return total
            dropped = await self._collect(candidates)
            total += dropped
            if dropped < len(candidates) or len(candidates) < batch:
                return total

    async def aclose(self) -> None:
        """Close the pool and the lock connections (releasing their locks)."""
        if self._closed:
            return
        self._closed = True
        for connection in self._locks:
            await connection.aclose()
        self._held.clear()
        if self._opened:
            await self._pool.close()


def _check_quota(quota: Quota | None, messages: int, octets: int, size: int) -> None:
    """Raise :class:`QuotaExceeded` if the new totals break ``quota``."""
    if quota is None or quota.unlimited:
        return
    if quota.max_messages and messages > quota.max_messages:
        msg = f"quota exceeded: {messages - 1} messages of at most {quota.max_messages}"
        raise QuotaExceeded(msg)
    if quota.max_bytes and octets > quota.max_bytes:
        msg = f"quota exceeded: {octets - size} + {size} octets over {quota.max_bytes}"
        raise QuotaExceeded(msg)


class PostgresMaildrop:
    """One open PostgreSQL maildrop; satisfies :class:`pobox.storage.base.Maildrop`."""

    def __init__(self, store: PostgresStore, mailbox: str) -> None:
        self._store = store
        self.mailbox = mailbox
        self.key = lock_key(mailbox)
        #: The lock connection carrying this session's lock (``None``: not locked).
        self.lock_connection: LockConnection | None = None
        self.lost = False
        #: The listing taken at open.
        self.snapshot = _EMPTY
        #: Small messages read ahead.
        self._ahead: dict[str, bytes] = {}
        self._callbacks: list[Callable[[], object]] = []
        self._closed = False

    @property
    def messages(self) -> Sequence[MessageInfo]:
        """The snapshot taken at open, in delivery (UID) order."""
        return self.snapshot.messages

    def _row(self, key: str) -> tuple[int, bytes]:
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)
        row = self.snapshot.rows.get(key)
        if row is None:
            msg = f"message {key!r} is not in the maildrop"
            raise MessageGone(msg)
        return row

    async def read_message(self, key: str) -> AsyncIterator[bytes]:
        """Yield the header lines, then the body a page of chunks at a time.

        Raises:
            MessageGone: the message (or its body) is no longer there.
            StorageTemporaryError: the database failed.
        """
        uid, digest = self._row(key)
        ahead = self._ahead.pop(key, None)
        if ahead is None and self._reads_ahead(key):
            await self._read_ahead(key)
            ahead = self._ahead.pop(key, None)
        if ahead is not None:
            yield ahead
            return
        header, chunks, page = await self._store.read_page(digest, 0, header_of=(self.mailbox, uid))
        if header is None or chunks is None:
            msg = f"message {key!r} is no longer in the maildrop"
            raise MessageGone(msg)
        if header:
            yield header
        seq = 0
        while True:
            for number, data in page:
                if number != seq:
                    msg = f"message {key!r} lost chunk {seq} while being read"
                    raise MessageGone(msg)
                seq += 1
                yield data
            if seq >= chunks:
                return
            _, again, page = await self._store.read_page(digest, seq)
            if again is None or not page:
                msg = f"message {key!r} was removed while being read"
                raise MessageGone(msg)

    def _reads_ahead(self, key: str) -> bool:
        """Tell whether reading ``key`` should fetch it and the small messages after it."""
        return (
            self.lock_connection is not None
            and not self.lost
            and self.snapshot.messages[self.snapshot.index[key]].size <= CHUNK_SIZE
        )

    async def _read_ahead(self, key: str) -> None:
        """Fetch ``key`` and the small messages after it, within the read-ahead budget."""
        self._ahead.clear()
        wanted: list[tuple[int, bytes]] = []
        octets = 0
        snapshot = self.snapshot
        for info in snapshot.messages[snapshot.index[key] :]:
            if info.size > CHUNK_SIZE or len(wanted) >= READ_AHEAD_MESSAGES:
                break
            if wanted and octets + info.size > READ_AHEAD_OCTETS:
                break
            octets += info.size
            wanted.append(snapshot.rows[info.key])
        found = await self._store.read_small(self.mailbox, wanted)
        self._ahead = {str(uid): data for uid, data in found.items()}

    def read_now(self, key: str) -> bytes | None:
        """Return the message if it was read ahead, else ``None`` (use :meth:`read_message`).

        Raises:
            MessageGone: ``key`` is not in the snapshot.
        """
        self._row(key)
        return self._ahead.pop(key, None)

    async def delete(self, keys: Sequence[str]) -> DeleteResult:
        """Remove the messages of ``keys`` in one transaction (RFC 1939 §6, UPDATE).

        Keys outside the snapshot fail; messages already gone count as removed.

        Raises:
            StorageTemporaryError: the lock was lost or the database failed; nothing removed.
        """
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)
        rows = self.snapshot.rows
        removed = [key for key in keys if key in rows]
        failed = tuple(key for key in keys if key not in rows)
        if removed:
            digests = await self._store.update(self, [rows[key][0] for key in removed])
            await self._store.collect(digests)
        return DeleteResult(removed=tuple(removed), failed=failed)

    async def note_retrieved(self, times: Mapping[str, float]) -> None:
        """Record first retrievals (``message.retrieved``); a time set already stays.

        Raises:
            StorageTemporaryError: the database failed or did not answer in time.
        """
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)
        rows = self.snapshot.rows
        pairs = [(rows[key][0], when) for key, when in times.items() if key in rows]
        if not pairs:
            return
        await self._store.note_retrieved(self.mailbox, pairs)

    async def retrieved_before(self, when: float) -> tuple[str, ...]:
        """Return the snapshot's keys first retrieved at or before ``when``, in order.

        Raises:
            StorageTemporaryError: the database failed or did not answer in time.
        """
        if self._closed:
            msg = "the maildrop is closed"
            raise RuntimeError(msg)
        rows = self.snapshot.rows
        if not rows:
            return ()
        found = await self._store.retrieved_before(
            self.mailbox, [row[0] for row in rows.values()], when
        )
        return tuple(info.key for info in self.messages if rows[info.key][0] in found)

    def on_lock_lost(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (once, on the event loop) if the maildrop lock is lost."""
        if self.lost:
            asyncio.get_running_loop().call_soon(callback)
        else:
            self._callbacks.append(callback)

    def lock_lost(self) -> None:
        """The lock connection ended: the lock is gone (called by :class:`LockConnection`)."""
        if self.lost:
            return
        self.lost = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("lock-lost callback failed")

    async def close(self) -> None:
        """Release the lock if this session still holds it; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._callbacks = []
        self._ahead.clear()
        await self._store.release(self)
