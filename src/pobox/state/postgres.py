"""Cluster-wide state in PostgreSQL: failed-login counters and the session registry.

Selected with ``shared_state = "postgresql"`` (or ``"auto"`` with a PostgreSQL store or
userdb).  The tables (``failure_counter``, ``cluster_node``, ``cluster_session``, migration
``0200_cluster_state.sql``, made by ``pobox db upgrade``) are UNLOGGED: state that expires by
itself is not worth WAL traffic, and losing it in a crash only makes the policies lenient.

Design
------
- **One round trip per call.**  Every method is one statement (CTEs where it takes several
  steps); each statement runs on a pooled autocommit connection, under
  ``shared_state_timeout`` on the client and as ``statement_timeout`` on the server.  A
  failure is :class:`~pobox.state.base.StateUnavailable`, which the shell answers with
  per-node state (the fallback wrappers in :mod:`pobox.server._cluster`).
- **The clock is pobox's.**  Times are seconds since the epoch from the ``clock`` given
  (``time.time`` by default), bound as parameters, never ``now()``: the contract suite moves a
  clock by hand over this backend as over the memory one.  Nodes' clocks must agree to well
  within a heartbeat (NTP does).
- **Expiring by itself.**  A counter row carries its window's start; reads ignore expired
  rows, and each :meth:`PostgresFailureCounters.add` deletes a few expired rows it finds
  (``FOR UPDATE SKIP LOCKED``: never waiting for another node).  A session counts only while
  its node's lease (``cluster_node.last_seen``) runs.
- **Bounded.**  Every node now and then, with its heartbeat, runs
  :meth:`PostgresFailureCounters.upkeep` (deletes expired counters, then, beyond
  ``max_entries`` rows, the counters idle longest) and :meth:`PostgresSessionRegistry.purge`
  (the sessions of nodes whose lease ran out, and nodes not seen for a day).  Between two
  upkeeps a flood can add at most what the failed logins add, which the throttle slows.
- **Concurrency.**  Keys are upserted in sorted order, so two nodes counting the same keys
  never deadlock; a registration counts and inserts in one statement, so concurrent logins
  of one user on several nodes can both get in (lenient), never be refused wrongly.

May import: the standard library, psycopg, psycopg_pool, :mod:`pobox.state.base` and
:mod:`pobox.storage.postgres` (connection settings, the schema check).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, LiteralString, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from pobox.state.base import Admission, SessionEntry, StateUnavailable, utc_day
from pobox.storage.postgres import (
    DriverError,
    check,
    connection_params,
    error_text,
    run_pooled,
    set_timeouts,
)

__all__ = [
    "FORGET_NODE_AFTER",
    "MAX_ENTRIES",
    "PostgresDownloadCounters",
    "PostgresFailureCounters",
    "PostgresLoginTimes",
    "PostgresSessionRegistry",
    "PostgresState",
]

_T = TypeVar("_T")
Conn = psycopg.AsyncConnection[tuple[object, ...]]

#: Counter rows kept at most (as the memory backend's keys); a row is ~100 bytes with indexes.
MAX_ENTRIES: Final = 200_000
#: Expired counter rows each add deletes at most (a bounded step each time).
_SWEEP: Final = 4
#: Expired counter rows one upkeep deletes at most (the next one takes the rest).
_UPKEEP_BATCH: Final = 10_000
#: Seconds after which a node not seen is forgotten altogether (its sessions went long ago).
FORGET_NODE_AFTER: Final = 86_400.0

_TEXT: dict[str, LiteralString] = {
    # --- failure counters -----------------------------------------------------------------
    "counts": "SELECT key, count FROM {failure_counter}"
    " WHERE key = ANY(%(keys)s::text[]) AND first_at > %(expired)s",
    # Count one failure per key (a count whose window ran out starts again at 1), and delete
    # a few expired rows of other keys on the way.
    "add": "WITH up AS (INSERT INTO {failure_counter} AS f (key, first_at, last_at, count)"
    " SELECT k, %(now)s, %(now)s, 1 FROM unnest(%(keys)s::text[]) AS k"
    " ON CONFLICT (key) DO UPDATE SET"
    " count = CASE WHEN f.first_at <= %(expired)s THEN 1 ELSE f.count + 1 END,"
    " first_at = CASE WHEN f.first_at <= %(expired)s THEN EXCLUDED.first_at"
    " ELSE f.first_at END,"
    " last_at = EXCLUDED.last_at RETURNING key, count),"
    " swept AS (DELETE FROM {failure_counter} WHERE key IN (SELECT key FROM {failure_counter}"
    " WHERE first_at <= %(expired)s AND key <> ALL(%(keys)s::text[]) ORDER BY first_at"
    " LIMIT %(sweep)s FOR UPDATE SKIP LOCKED))"
    " SELECT key, count FROM up",
    "clear": "DELETE FROM {failure_counter} WHERE key = ANY(%(keys)s::text[])",
    # Expired rows (a batch), then beyond the cap the live rows idle longest: disjoint sets.
    # Counting to the cap walks every live row, so it is done only when the planner's
    # estimate of the rows (-1: never estimated) comes near the cap.
    "trim_counters": "WITH old AS (DELETE FROM {failure_counter} WHERE key IN"
    " (SELECT key FROM {failure_counter} WHERE first_at <= %(expired)s ORDER BY first_at"
    " LIMIT %(batch)s FOR UPDATE SKIP LOCKED) RETURNING 1),"
    " over AS (DELETE FROM {failure_counter} WHERE key IN (SELECT key FROM {failure_counter}"
    " WHERE first_at > %(expired)s"
    " AND (SELECT reltuples FROM pg_catalog.pg_class WHERE oid = {failure_counter_name}::regclass)"
    " NOT BETWEEN 0 AND %(cap)s * 0.8"
    " ORDER BY last_at DESC OFFSET %(cap)s FOR UPDATE SKIP LOCKED) RETURNING 1)"
    " SELECT (SELECT count(*) FROM old), (SELECT count(*) FROM over)",
    # --- the session registry ---------------------------------------------------------------
    # A session is live if its node is this one or one whose lease runs.
    "register": "WITH live AS (SELECT s.rip FROM {cluster_session} AS s"
    " LEFT JOIN {cluster_node} AS n ON n.name = s.node"
    " WHERE s.username = %(user)s AND s.id <> %(id)s"
    " AND (s.node = %(node)s OR n.last_seen > %(dead)s)),"
    " c AS (SELECT count(*) AS per_user,"
    " count(*) FILTER (WHERE rip = %(rip)s) AS per_userip FROM live),"
    # The failed logins of the client's address too (f; none asked: key NULL), which refuse
    # the registration at max_failures: the throttle's check in the same round trip.
    " f AS (SELECT coalesce(max(count), 0) AS failures FROM {failure_counter}"
    " WHERE key = %(fkey)s::text AND first_at > %(expired)s),"
    " ins AS (INSERT INTO {cluster_session}"
    " (id, node, username, rip, since, tls, mechanism)"
    " SELECT %(id)s, %(node)s, %(user)s, %(rip)s, %(since)s, %(tls)s, %(mechanism)s FROM c, f"
    " WHERE (%(max_user)s::integer = 0 OR c.per_user < %(max_user)s::integer)"
    " AND (%(max_userip)s::integer = 0 OR c.per_userip < %(max_userip)s::integer)"
    " AND (%(max_failures)s::integer = 0 OR f.failures < %(max_failures)s::integer)"
    " ON CONFLICT (id) DO UPDATE SET node = EXCLUDED.node, username = EXCLUDED.username,"
    " rip = EXCLUDED.rip, since = EXCLUDED.since, tls = EXCLUDED.tls,"
    " mechanism = EXCLUDED.mechanism, kicked = false RETURNING 1)"
    " SELECT c.per_user, c.per_userip, EXISTS (SELECT FROM ins), f.failures FROM c, f",
    "unregister": "DELETE FROM {cluster_session} WHERE id = %(id)s AND node = %(node)s",
    "sessions": "SELECT s.id, s.username, s.node, s.rip, s.since, s.tls, s.mechanism"
    " FROM {cluster_session} AS s LEFT JOIN {cluster_node} AS n ON n.name = s.node"
    " WHERE (s.node = %(node)s OR n.last_seen > %(dead)s)"
    " AND (%(user)s::text IS NULL OR s.username = %(user)s::text) ORDER BY s.since, s.id",
    "count": "SELECT count(*), count(*) FILTER (WHERE s.rip = %(rip)s)"
    " FROM {cluster_session} AS s LEFT JOIN {cluster_node} AS n ON n.name = s.node"
    " WHERE s.username = %(user)s AND (s.node = %(node)s OR n.last_seen > %(dead)s)",
    "kick": "UPDATE {cluster_session} AS s SET kicked = true"
    " WHERE (%(id)s::text IS NULL OR s.id = %(id)s::text)"
    " AND (%(user)s::text IS NULL OR s.username = %(user)s::text)"
    " AND (s.node = %(node)s OR EXISTS (SELECT FROM {cluster_node} AS n"
    " WHERE n.name = s.node AND n.last_seen > %(dead)s)) RETURNING s.id",
    # Renew the lease, forget this node's sessions it no longer has, and say which of the
    # others were kicked.
    # The second part says which process renewed the lease before (the statement's snapshot
    # predates the upsert): another one than this, after this one's first beat, means that
    # a second live process has this node's name.  The last row is the database server's
    # clock, which the node compares with its own (skew: leases and windows go wrong).
    "heartbeat": "WITH me AS (INSERT INTO {cluster_node} (name, instance, started, last_seen)"
    " VALUES (%(node)s, %(instance)s, %(now)s, %(now)s)"
    " ON CONFLICT (name) DO UPDATE SET last_seen = EXCLUDED.last_seen,"
    " instance = EXCLUDED.instance RETURNING 1),"
    " stale AS (DELETE FROM {cluster_session} WHERE node = %(node)s"
    " AND id NOT IN (SELECT unnest(%(live)s::text[])) RETURNING 1)"
    " SELECT id, false FROM {cluster_session} WHERE node = %(node)s AND kicked"
    " AND id = ANY(%(live)s::text[])"
    " UNION ALL SELECT instance, true FROM {cluster_node}"
    " WHERE name = %(node)s AND instance <> %(instance)s"
    " UNION ALL SELECT extract(epoch FROM statement_timestamp())::text, NULL",
    # --- download counters ------------------------------------------------------------------
    # Add the octets if today's count stays within the limit (0: none), in one statement: the
    # row lock of ON CONFLICT makes concurrent charges of one user on several nodes queue.
    # A count of an earlier day counts as 0. No row back: refused.
    "charge": "INSERT INTO {download_counter} AS d (username, day, octets)"
    " SELECT %(user)s, %(day)s, GREATEST(%(octets)s::bigint, 0)"
    " WHERE %(limit)s::bigint = 0 OR %(octets)s::bigint <= %(limit)s::bigint"
    " ON CONFLICT (username) DO UPDATE SET day = EXCLUDED.day,"
    " octets = GREATEST(CASE WHEN d.day = EXCLUDED.day THEN d.octets ELSE 0 END"
    " + %(octets)s::bigint, 0)"
    " WHERE %(octets)s::bigint <= 0 OR %(limit)s::bigint = 0"
    " OR CASE WHEN d.day = EXCLUDED.day THEN d.octets ELSE 0 END + %(octets)s::bigint"
    " <= %(limit)s::bigint"
    " RETURNING octets",
    "used": "SELECT octets FROM {download_counter} WHERE username = %(user)s AND day = %(day)s",
    # --- login times (LOGIN-DELAY) ------------------------------------------------------------
    # Record the login unless the last one is under delay seconds ago, in one statement (the
    # row lock of ON CONFLICT queues two nodes' logins of one user). A last login in the
    # future (a node's clock ahead) does not lock the user out. No row back: too soon.
    "login_delay": "INSERT INTO {login_time} AS l (username, at) VALUES (%(user)s, %(now)s)"
    " ON CONFLICT (username) DO UPDATE SET at = EXCLUDED.at"
    " WHERE l.at <= %(now)s - %(delay)s OR l.at > %(now)s"
    " RETURNING 1",
    # Sessions of nodes whose lease ran out (or that have no row), then long-gone nodes.
    "purge": "WITH dead AS (DELETE FROM {cluster_session} AS s WHERE s.node <> %(node)s"
    " AND NOT EXISTS (SELECT FROM {cluster_node} AS n WHERE n.name = s.node"
    " AND n.last_seen > %(dead)s) RETURNING 1),"
    " gone AS (DELETE FROM {cluster_node} WHERE name <> %(node)s"
    " AND last_seen <= %(forget)s RETURNING 1)"
    " SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM gone)",
}

_TABLES: Final = (
    "failure_counter",
    "cluster_node",
    "cluster_session",
    "download_counter",
    "login_time",
)


def _compose(schema: str) -> dict[str, bytes]:
    """Compose every statement for ``schema`` into its bytes, once (not at each execution).

    The state's connections use ``client_encoding`` UTF8, the encoding of these bytes.
    """
    tables: dict[str, sql.Composable] = {name: sql.Identifier(schema, name) for name in _TABLES}
    # The qualified name as a text literal, for ::regclass ("schema"."table", quotes doubled).
    quoted = ".".join('"' + part.replace('"', '""') + '"' for part in (schema, "failure_counter"))
    tables["failure_counter_name"] = sql.Literal(quoted)
    out = {}
    for name, text in _TEXT.items():
        used = {t: ident for t, ident in tables.items() if "{" + t + "}" in text}
        out[name] = sql.SQL(text).format(**used).as_bytes(None)
    return out


class PostgresState:
    """The connection pool and statements that the PostgreSQL state backends share.

    Args:
        dsn: libpq connection string (``postgresql_dsn``).
        schema: the schema of pobox's tables (``postgresql_schema``).
        timeout: seconds a call may take in all (``shared_state_timeout``).
        pool_max: connections at most (a call holds one for one statement).
        clock: the wall clock, seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pobox",
        timeout: float = 0.5,
        pool_max: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schema = schema
        self.timeout = timeout
        self.clock = clock
        self.statements = _compose(schema)
        params, _ = connection_params(dsn, timeout, "pobox-state")
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            # The statements are UTF-8 bytes (_compose), whatever the database's encoding.
            kwargs={**params, "client_encoding": "UTF8", "autocommit": True},
            min_size=1,
            max_size=max(1, pool_max),
            open=False,
            configure=self._configure,
            timeout=timeout,
            name="pobox-state",
            reconnect_timeout=0,
        )
        self._opened = False
        self._closed = False

    async def _configure(self, conn: Conn) -> None:
        await set_timeouts(conn, self.timeout)

    async def run(self, what: str, work: Callable[[Conn], Awaitable[_T]]) -> _T:
        """Run ``work`` on a pooled connection within the timeout.

        Raises:
            StateUnavailable: the database failed or did not answer in time.
        """
        if self._closed:
            raise StateUnavailable("shared state: closed")
        if not self._opened:
            self._opened = True
            await self._pool.open(wait=False)
        try:
            return await run_pooled(
                self._pool, work, timeout=self.timeout, what=f"shared state {what}"
            )
        except DriverError as exc:
            text = "timed out" if isinstance(exc, TimeoutError) else error_text(exc)
            msg = f"shared state {what}: {text}"
            raise StateUnavailable(msg) from exc

    async def fetch(
        self, what: str, statement: str, params: dict[str, object]
    ) -> list[tuple[object, ...]]:
        """Run one of the statements with ``params``; return its rows."""
        query = self.statements[statement]

        async def work(conn: Conn) -> list[tuple[object, ...]]:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

        return await self.run(what, work)

    async def check_schema(self) -> None:
        """Check that the schema has this pobox's tables (``pobox db upgrade``).

        Raises:
            pobox.storage.postgres.SchemaError: the schema is missing, older or newer.
            StateUnavailable: the database cannot be reached.
        """

        async def work(conn: Conn) -> None:
            await check(conn, self.schema)

        await self.run("checking the schema", work)

    async def aclose(self) -> None:
        """Close the pool; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            await self._pool.close()


class PostgresFailureCounters:
    """A :class:`~pobox.state.base.FailureCounters` in PostgreSQL, shared by every node.

    Args:
        state: the pool and statements.
        window: seconds a key's count lives after its first failure.
        max_entries: rows kept at most (enforced by :meth:`upkeep`).
    """

    def __init__(
        self, state: PostgresState, window: float, *, max_entries: int = MAX_ENTRIES
    ) -> None:
        self.state = state
        self.window = window
        self.max_entries = max_entries

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order."""
        rows = await self.state.fetch(
            "counts", "counts", {"keys": list(keys), "expired": self.state.clock() - self.window}
        )
        found = {str(key): int(str(count)) for key, count in rows}
        return [found.get(key, 0) for key in keys]

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""
        now = self.state.clock()
        rows = await self.state.fetch(
            "add",
            "add",
            {
                "keys": sorted(set(keys)),  # one order on every node: no deadlock
                "now": now,
                "expired": now - self.window,
                "sweep": _SWEEP,
            },
        )
        found = {str(key): int(str(count)) for key, count in rows}
        return [found[key] for key in keys]

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys``."""
        await self.state.fetch("clear", "clear", {"keys": sorted(set(keys))})

    async def upkeep(self) -> tuple[int, int]:
        """Delete expired rows, and the rows idle longest beyond ``max_entries``.

        Returns:
            how many expired rows, and how many live rows beyond the cap, were deleted.
        """
        now = self.state.clock()
        rows = await self.state.fetch(
            "upkeep",
            "trim_counters",
            {"expired": now - self.window, "cap": self.max_entries, "batch": _UPKEEP_BATCH},
        )
        return int(str(rows[0][0])), int(str(rows[0][1]))


class PostgresDownloadCounters:
    """A :class:`~pobox.state.base.DownloadCounters` in PostgreSQL, shared by every node.

    A charge is one statement that checks and adds (see ``charge`` in the statements), so
    the cap holds across nodes.  One row per user: nothing to sweep.
    """

    def __init__(self, state: PostgresState) -> None:
        self.state = state

    async def charge(self, user: str, octets: int, limit: int) -> bool:
        """Add ``octets`` to ``user``'s count of today if it stays within ``limit``; say if so."""
        params = {
            "user": user,
            "day": utc_day(self.state.clock()),
            "octets": octets,
            "limit": limit,
        }
        # A refused first charge inserts nothing: the SELECT's WHERE filters the row out.
        return bool(await self.state.fetch("download", "charge", params))

    async def used(self, user: str) -> int:
        """Return the octets ``user`` has been charged today."""
        rows = await self.state.fetch(
            "download", "used", {"user": user, "day": utc_day(self.state.clock())}
        )
        return int(str(rows[0][0])) if rows else 0


class PostgresLoginTimes:
    """A :class:`~pobox.state.base.LoginTimes` in PostgreSQL, shared by every node.

    A login is checked and recorded in one statement (see ``login_delay`` in the
    statements), so the delay holds across nodes.  One row per user: nothing to sweep.
    """

    def __init__(self, state: PostgresState) -> None:
        self.state = state

    async def admit(self, user: str, delay: float) -> bool:
        """Record a login of ``user`` now unless their last one is under ``delay`` s ago."""
        params = {"user": user, "now": self.state.clock(), "delay": float(delay)}
        return bool(await self.state.fetch("login", "login_delay", params))


class PostgresSessionRegistry:
    """A :class:`~pobox.state.base.SessionRegistry` in PostgreSQL, shared by every node.

    Args:
        state: the pool and statements.
        node: this node's name (``node_name``).
        lease: seconds a node's sessions count after its last heartbeat.
    """

    def __init__(
        self, state: PostgresState, node: str, *, lease: float, failure_window: float = 0.0
    ) -> None:
        self.state = state
        self._node = node
        self.lease = lease
        #: The failure counters' window (``auth_failure_window``), for :meth:`register_checked`.
        self.failure_window = failure_window
        #: This process's token in ``cluster_node.instance``.
        self.instance = secrets.token_hex(8)
        #: Whether another live process renews this node's lease too (a node_name clash),
        #: as the last heartbeat found.
        self.name_taken = False
        #: The database server's clock minus this node's, in seconds, at the last heartbeat
        #: (``None`` before the first): the nodes take times from their own clocks, so
        #: they must agree (NTP) to well within a heartbeat.
        self.clock_skew: float | None = None
        self._beats = 0

    @property
    def node(self) -> str:
        """The name of the node this registry object registers for."""
        return self._node

    def _dead(self) -> float:
        return self.state.clock() - self.lease

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        """Register ``entry`` if the user's live sessions leave room; say what was found."""
        return await self._register(entry, max_user, max_userip, None, 0)

    async def register_checked(
        self,
        entry: SessionEntry,
        *,
        max_user: int,
        max_userip: int,
        failure_key: str,
        max_failures: int,
    ) -> Admission:
        """Register ``entry`` as :meth:`register` does, unless ``failure_key`` (the client's
        address in the failure counters) has ``max_failures`` failed logins or more.

        The counters and the registry are in the same database, so the throttle's check
        costs no round trip of its own.  The admission says the failures found.
        """
        return await self._register(entry, max_user, max_userip, failure_key, max_failures)

    async def _register(
        self,
        entry: SessionEntry,
        max_user: int,
        max_userip: int,
        failure_key: str | None,
        max_failures: int,
    ) -> Admission:
        now = self.state.clock()
        rows = await self.state.fetch(
            "register",
            "register",
            {
                "fkey": failure_key,
                "expired": now - self.failure_window,
                "max_failures": max_failures,
                "id": entry.id,
                "node": self._node,
                "user": entry.user,
                "rip": entry.rip,
                "since": entry.since,
                "tls": entry.tls,
                "mechanism": entry.mechanism,
                "max_user": max_user,
                "max_userip": max_userip,
                "dead": self._dead(),
            },
        )
        per_user, per_userip, admitted, failures = rows[0]
        return Admission(
            bool(admitted),
            int(str(per_user)),
            int(str(per_userip)),
            None if failure_key is None else int(str(failures)),
        )

    async def unregister(self, session_id: str) -> None:
        """Forget a session of this node that ended."""
        await self.state.fetch("unregister", "unregister", {"id": session_id, "node": self._node})

    async def sessions(self, user: str | None = None) -> list[SessionEntry]:
        """Return the live sessions of every node (of ``user`` only, if given), oldest first."""
        rows = await self.state.fetch(
            "sessions", "sessions", {"node": self._node, "dead": self._dead(), "user": user}
        )
        return [
            SessionEntry(
                id=str(sid),
                user=str(name),
                node=str(node),
                rip=str(rip),
                since=float(str(since)),
                tls=bool(tls),
                mechanism=str(mechanism),
            )
            for sid, name, node, rip, since, tls, mechanism in rows
        ]

    async def count(self, user: str, rip: str) -> tuple[int, int]:
        """Return the live sessions of ``user``, and of ``user`` from ``rip``, on every node."""
        rows = await self.state.fetch(
            "count", "count", {"node": self._node, "dead": self._dead(), "user": user, "rip": rip}
        )
        per_user, per_userip = rows[0]
        return int(str(per_user)), int(str(per_userip))

    async def kick(self, *, user: str | None = None, session_id: str | None = None) -> int:
        """Mark the live sessions of ``user``, or the one ``session_id``, to be ended."""
        if user is None and session_id is None:
            return 0
        rows = await self.state.fetch(
            "kick",
            "kick",
            {"node": self._node, "dead": self._dead(), "user": user, "id": session_id},
        )
        return len(rows)

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        """Renew this node's lease; return the ids of its sessions that were asked to end."""
        now = self.state.clock()
        rows = await self.state.fetch(
            "heartbeat",
            "heartbeat",
            {"node": self._node, "instance": self.instance, "now": now, "live": list(live)},
        )
        self._beats += 1
        server = [float(str(value)) for value, other in rows if other is None]
        self.clock_skew = server[0] - now if server else None
        # Before the first beat the row may be an earlier run's (a restart): not a clash.
        self.name_taken = self._beats > 1 and any(other for _, other in rows)
        return sorted(str(value) for value, other in rows if other is False)

    async def purge(self) -> tuple[int, int]:
        """Delete the sessions of nodes whose lease ran out, and nodes gone for a day.

        Returns:
            how many sessions, and how many nodes, were deleted.
        """
        now = self.state.clock()
        rows = await self.state.fetch(
            "purge",
            "purge",
            {"node": self._node, "dead": now - self.lease, "forget": now - FORGET_NODE_AFTER},
        )
        return int(str(rows[0][0])), int(str(rows[0][1]))
