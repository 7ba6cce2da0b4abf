"""Maildrop locks across nodes: PostgreSQL session-level advisory locks, few connections.

RFC 1939 §8's exclusive lock must hold across every node that serves the same maildrops, and
must never outlive the node that holds it. A session-level advisory lock
(``pg_try_advisory_lock``) does both: PostgreSQL grants it to one backend at a time, and
releases it when that backend's connection ends, however it ends (a node killed, its host
gone once TCP keepalives give up, ``pg_terminate_backend``).

Locks are not one connection per POP3 session: a node keeps a few *lock connections*
(``postgresql_lock_connections``) and multiplexes every lock on them, each maildrop on the
connection its key hashes to. Advisory locks are re-entrant within a backend, so the node also
keeps a table of the keys it holds and refuses a second local session itself.

Taking and releasing locks is batched: what sessions ask of a lock connection while it is busy
waits, and goes at once in the next statement (:data:`BATCH`, one row per request, in the
order asked), so logins and logouts that come together share a round trip.

Losing a lock connection loses its locks. :class:`LockConnection` notices at once when the
server closes the connection (the socket turns readable while idle) and within
``postgresql_lock_check_interval`` seconds otherwise (a probe query, under the timeout);
it then tells every maildrop whose lock it carried (:meth:`Holder.lock_lost`), and the shell
ends those sessions without UPDATE. The UPDATE itself runs *on the lock connection*, in a
transaction that first checks ``pg_locks`` for the lock (the fencing check): a connection that
is gone cannot commit, and a lock that is gone cannot be used.

May import: the standard library, psycopg, :mod:`._connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import psycopg

from pobox.storage.postgres._connect import HANG_UP_GRACE, HangUp

__all__ = ["BATCH", "Holder", "LockConnection", "LockLost", "lock_key", "split_key"]

logger = logging.getLogger(__name__)

#: A connection whose rows are tuples.
Conn = psycopg.AsyncConnection[tuple[object, ...]]

#: Take (``pg_try_advisory_lock``: granted or not) or release (``pg_advisory_unlock``) several
#: maildrop locks in one statement, in the order given; each row says which request it answers.
BATCH = (
    "SELECT t.n, CASE WHEN t.take THEN pg_catalog.pg_try_advisory_lock(t.key)"
    " ELSE pg_catalog.pg_advisory_unlock(t.key) END"
    " FROM unnest(%(keys)b::bigint[], %(take)b::boolean[]) WITH ORDINALITY AS t(key, take, n)"
    " ORDER BY t.n"
)

#: A request to a lock connection: the key, take (``True``) or release, who waits for it.
_Request = tuple[int, bool, asyncio.Future[bool] | None]


class LockLost(Exception):
    """The lock connection is gone, and with it the locks it held."""


class Holder(Protocol):
    """What holds a lock: told when it is lost."""

    def lock_lost(self) -> None:
        """The lock is gone (its connection ended): stop using it."""


def lock_key(mailbox: str) -> int:
    """Return the advisory lock key of ``mailbox``: 64 bits of a SHA-256, signed.

    The same on every node. Two mailboxes share a key with probability 2**-64 per pair; the
    worst a collision can do is refuse a login with ``[IN-USE]`` while the other is open.
    """
    digest = hashlib.sha256(b"pobox maildrop lock\0" + mailbox.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def split_key(key: int) -> tuple[int, int]:
    """Return ``(classid, objid)``: how ``pg_locks`` shows the one-key advisory lock ``key``."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def _fail(requests: list[_Request], exc: BaseException) -> None:
    """Make every caller still waiting among ``requests`` raise ``exc``."""
    for _, _, future in requests:
        if future is not None and not future.done():
            future.set_exception(exc)


class LockConnection:
    """One connection carrying many maildrop locks, and the UPDATEs of their sessions."""

    def __init__(
        self,
        opener: Callable[[], Awaitable[Conn]],
        *,
        timeout: float,
        check_interval: float,
        name: str,
    ) -> None:
        """Create a lock connection that connects on first use.

        Args:
            opener: opens a new autocommit connection.
            timeout: seconds any one use may take, connecting included.
            check_interval: seconds between probes while locks are held (0: none).
            name: for the log.
        """
        self._opener = opener
        self._timeout = timeout
        self._check_interval = check_interval
        self._name = name
        self._conn: Conn | None = None
        self._mutex = asyncio.Lock()
        self._holders: dict[int, Holder] = {}
        self._watched_fd: int | None = None
        self._probe_task: asyncio.Task[bool] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._requests: list[_Request] = []
        self._batcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def holders(self) -> int:
        """How many locks this connection carries."""
        return len(self._holders)

    @property
    def backend_pid(self) -> int | None:
        """The PID of the server process of the connection, if connected."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[Conn]:
        """Hold the connection (connecting if needed) for one use, under the timeout.

        A failure of the connection while in use loses every lock it carried.

        Raises:
            LockLost: the connection broke during the use (or could not be made).
            TimeoutError: the use took longer than the timeout.
        """
        async with self._mutex:
            self._unwatch()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._timeout
            hang: HangUp | None = None
            try:
                async with asyncio.timeout_at(deadline + HANG_UP_GRACE):
                    conn = await self._connection()
                    # At the timeout the socket is shut down: psycopg fails at once instead
                    # of first asking an unreachable server to cancel the query (10 s).
                    hang = HangUp(conn, max(0.0, deadline - loop.time()))
                    yield conn
            except (psycopg.OperationalError, TimeoutError) as exc:
                conn_gone = self._conn is None or self._conn.broken or self._conn.closed
                timed_out = isinstance(exc, TimeoutError) or (hang is not None and hang.fired)
                if conn_gone or timed_out:
                    reason = (
                        f"no answer within {self._timeout:g} s"
                        if timed_out
                        else f"{type(exc).__name__}: {exc}"
                    )
                    self._lose(reason)
                    raise LockLost(reason) from exc
                raise
            finally:
                if hang is not None:
                    hang.cancel()
                self._watch()

    async def _connection(self) -> Conn:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._holders:  # a connection that went away took its locks along
            self._lose("connection closed")
        conn = await self._opener()
        self._conn = conn
        return conn

    async def try_lock(self, key: int) -> bool:
        """Take the advisory lock ``key`` if no backend holds it; tell whether it was granted.

        Sent with the other requests waiting for this connection (:data:`BATCH`). A caller
        cancelled while its lock was being taken does not leave it held: it is released.

        Raises:
            LockLost: the connection broke (or could not be made).
            TimeoutError: no answer within the timeout.
            psycopg.Error: the statement failed.
        """
        return await self._ask(key, take=True)

    async def unlock(self, key: int) -> None:
        """Release the advisory lock ``key`` (batched as :meth:`try_lock` is).

        Raises:
            LockLost, TimeoutError, psycopg.Error: as :meth:`try_lock`.
        """
        await self._ask(key, take=False)

    async def _ask(self, key: int, *, take: bool) -> bool:
        if self._closed:
            msg = "the lock connection is closed"
            raise LockLost(msg)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._requests.append((key, take, future))
        if self._batcher is None:
            self._batcher = loop.create_task(self._send_requests())
        return await future

    async def _send_requests(self) -> None:
        """Send what is asked, a batch per statement, until nothing is left."""
        batch: list[_Request] = []
        try:
            while self._requests:
                batch, self._requests = self._requests, []
                try:
                    answers = await self._run_batch(batch)
                except Exception as exc:  # every waiter hears of it
                    _fail(batch, exc)
                    batch = []
                    continue
                for number, (key, take, future) in enumerate(batch, 1):
                    granted = answers.get(number, False)
                    if future is None:
                        continue
                    if future.done():  # the caller gave up: do not keep what it took
                        if take and granted:
                            self._requests.append((key, False, None))
                        continue
                    future.set_result(granted)
                batch = []
        finally:
            self._batcher = None
            if self._closed:  # cancelled by aclose: nobody may wait for ever
                waiting, self._requests = batch + self._requests, []
                _fail(waiting, LockLost("the lock connection is closed"))

    async def _run_batch(self, batch: list[_Request]) -> dict[int, bool]:
        async with self.using() as conn:
            cur = await conn.execute(
                BATCH,
                {"keys": [key for key, _, _ in batch], "take": [take for _, take, _ in batch]},
            )
            rows = await cur.fetchall()
        return {number: bool(answer) for number, answer in rows if isinstance(number, int)}

    def add(self, key: int, holder: Holder) -> None:
        """Record that ``holder`` holds ``key`` on this connection."""
        self._holders[key] = holder
        if self._watched_fd is None and not self._mutex.locked():
            self._watch()  # idle, and now with a lock to lose: notice the server closing it
        if self._check_interval and self._heartbeat is None and not self._closed:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def discard(self, key: int) -> None:
        """Forget ``key`` (released, or lost)."""
        self._holders.pop(key, None)

    def holds(self, key: int) -> bool:
        """Tell whether this connection carries ``key``."""
        return key in self._holders

    # ------------------------------------------------------------------ loss detection

    def _watch(self) -> None:
        """Watch the idle connection's socket: data while idle means the server spoke first.

        PostgreSQL sends nothing unasked to an idle connection except when it ends it
        (``pg_terminate_backend``, shutdown) or for rare notices; either way a probe finds out.
        """
        conn = self._conn
        if conn is None or conn.closed or conn.broken or not self._holders:
            return
        try:
            fd = conn.fileno()
            asyncio.get_running_loop().add_reader(fd, self._readable)
        except (OSError, ValueError, psycopg.OperationalError):
            return
        self._watched_fd = fd

    def _unwatch(self) -> None:
        fd, self._watched_fd = self._watched_fd, None
        if fd is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(fd)

    def _readable(self) -> None:
        self._unwatch()
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self.probe())

    async def probe(self) -> bool:
        """Check the connection with a query; on failure its locks are lost. Return if alive."""
        if not self._holders:
            return True
        try:
            async with self.using() as conn:
                await conn.execute("SELECT 1")
        except LockLost:
            return False
        except psycopg.Error as exc:
            self._lose(f"probe failed: {exc}")
            return False
        return True

    async def _beat(self) -> None:
        """Probe every ``check_interval`` s while locks are held (a dead peer sends no FIN)."""
        try:
            while self._holders and not self._closed:
                await asyncio.sleep(self._check_interval)
                if not self._mutex.locked():
                    await self.probe()
        finally:
            self._heartbeat = None

    def _lose(self, reason: str) -> None:
        """The connection is gone: close it and tell every holder its lock is lost."""
        self._unwatch()
        conn, self._conn = self._conn, None
        holders, self._holders = self._holders, {}
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()
        if holders:
            logger.error(
                "lock connection %s lost (%s): %d maildrop lock(s) gone, their sessions end "
                "without UPDATE",
                self._name,
                reason,
                len(holders),
            )
        for holder in holders.values():
            try:
                holder.lock_lost()
            except Exception:
                logger.exception("lock-lost callback failed")

    async def aclose(self) -> None:
        """Close the connection (releasing whatever it holds) and stop watching it."""
        self._closed = True
        for task in (self._heartbeat, self._probe_task, self._batcher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._unwatch()
        conn, self._conn = self._conn, None
        self._holders.clear()
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.close()
