"""What every PostgreSQL connection of pobox gets: libpq settings, timeouts, the retry rule.

Shared by the store (:mod:`._store`) and the user database (:mod:`pobox.auth.postgres`), which
connect to the same database with the same ``postgresql_*`` settings.

May import: the standard library, psycopg and psycopg_pool.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

__all__ = [
    "KEEPALIVES",
    "SERVER_KEEPALIVES",
    "DriverError",
    "connection_params",
    "error_text",
    "is_broken",
    "run_pooled",
    "set_timeouts",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Conn = psycopg.AsyncConnection[tuple[object, ...]]
#: What a pooled run raises when the database fails: map it to the caller's own error.
DriverError = (psycopg.Error, PoolTimeout, TimeoutError)

#: TCP keepalives of long-lived connections (locks, LISTEN), so a dead server host is noticed
#: in ~40 s even when no packet says so (``keepalives_idle`` + ``keepalives_interval`` times
#: ``keepalives_count``).
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "6",
}
#: TCP keepalives the *server* uses on pobox's connections (session settings, any user may
#: set them; ignored over a Unix socket).  A node cut off from PostgreSQL sends nothing, so
#: its backends wait on an idle socket; with the system default (2 h idle) their advisory
#: locks would outlive the partition by hours.  With these the server probes after 5 s of
#: silence and ends the backend after 3 unanswered probes 2 s apart: the locks of a node
#: that vanished are free about 11 s after its last packet.  ``tcp_user_timeout`` (the
#: statement timeout) ends a backend whose own data stays unacknowledged that long.
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
#: The environment variable that sets each default, which then wins over ours.
_ENV_FOR = {"application_name": "PGAPPNAME", "connect_timeout": "PGCONNECT_TIMEOUT"}


def connection_params(
    dsn: str, timeout: float, application_name: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Return the libpq settings to add to ``dsn``: for every connection, and keepalives.

    ``application_name`` and ``connect_timeout`` (``timeout`` rounded up) are added unless
    the DSN or the environment (``PGAPPNAME``, ``PGCONNECT_TIMEOUT``) sets them; keepalives
    unless the DSN sets them.
    """
    given = conninfo_to_dict(dsn) if dsn else {}
    defaults = {
        "application_name": application_name,
        "connect_timeout": str(max(1, math.ceil(timeout))),
    }
    params = {
        key: value
        for key, value in defaults.items()
        if key not in given and not os.environ.get(_ENV_FOR.get(key, ""), "")
    }
    return params, {key: value for key, value in KEEPALIVES.items() if key not in given}


async def set_timeouts(conn: psycopg.AsyncConnection[tuple[object, ...]], timeout: float) -> None:
    """Put every statement of ``conn`` under ``timeout``: statement, lock wait, idle in xact.

    Also make the server notice soon when this client vanishes (:data:`SERVER_KEEPALIVES`,
    ``tcp_user_timeout`` of ``timeout``), so a partitioned node's locks are freed.
    """
    millis = f"{int(timeout * 1000)}ms"
    keep = SERVER_KEEPALIVES
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, false),"
        " set_config('lock_timeout', %s, false),"
        " set_config('idle_in_transaction_session_timeout', %s, false),"
        " set_config('tcp_keepalives_idle', %s, false),"
        " set_config('tcp_keepalives_interval', %s, false),"
        " set_config('tcp_keepalives_count', %s, false),"
        " set_config('tcp_user_timeout', %s, false)",
        (
            millis,
            millis,
            millis,
            keep["tcp_keepalives_idle"],
            keep["tcp_keepalives_interval"],
            keep["tcp_keepalives_count"],
            millis,
        ),
    )


def is_broken(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a connection that broke (not a statement that failed)."""
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable
    )


def error_text(exc: BaseException) -> str:
    """Return the first line of a driver error's message (its class name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def run_pooled(
    pool: AsyncConnectionPool[Conn],
    work: Callable[[Conn], Awaitable[_T]],
    *,
    timeout: float,
    what: str,
    retry: bool = True,
) -> _T:
    """Run ``work`` on a connection of ``pool``, all of it within ``timeout`` seconds.

    A connection that turns out broken (the server restarted since it was pooled) is dropped
    by the pool and, if ``retry``, the work is done once more on a fresh one.

    Raises:
        psycopg.Error, PoolTimeout, TimeoutError: (:data:`DriverError`) it failed.
    """
    for attempt in (1, 2):
        try:
            async with asyncio.timeout(timeout):
                async with pool.connection() as conn:
                    return await work(conn)
        except DriverError as exc:
            if retry and attempt == 1 and is_broken(exc):
                logger.info("%s: %s; trying again on a new connection", what, exc)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover
