"""What every PostgreSQL connection of pobox gets: libpq settings, timeouts, the retry rule.

Shared by the store (:mod:`._store`) and the user database (:mod:`pobox.auth.postgres`), which
connect to the same database with the same ``postgresql_*`` settings.

May import: the standard library, psycopg, psycopg_pool and :mod:`pobox.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pobox.errors import ConfigError

__all__ = [
    "HANG_UP_GRACE",
    "KEEPALIVES",
    "SERVER_KEEPALIVES",
    "DriverError",
    "HangUp",
    "connection_params",
    "error_text",
    "is_broken",
    "parse_dsn",
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


def parse_dsn(dsn: str) -> dict[str, str]:
    """Return the settings ``dsn`` (a libpq connection string or URI) gives.

    Raises:
        ConfigError: it is malformed.  libpq's own message quotes the text around the fault
            (``missing "=" after "secret"``), which may be the password, so it is not passed
            on, not even as the error's cause.
    """
    if not dsn:
        return {}
    try:
        return {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError:
        msg = (
            "postgresql_dsn: not a valid libpq connection string or URI (check the quoting "
            "of values with spaces and the %-encoding of URIs; not shown: it may hold a password)"
        )
        raise ConfigError(msg) from None


def connection_params(
    dsn: str, timeout: float, application_name: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Return the libpq settings to add to ``dsn``: for every connection, and keepalives.

    ``application_name`` and ``connect_timeout`` (``timeout`` rounded up) are added unless
    the DSN or the environment (``PGAPPNAME``, ``PGCONNECT_TIMEOUT``) sets them; keepalives
    unless the DSN sets them.
    """
    given = parse_dsn(dsn)
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


#: Seconds past the timeout after which a use is cancelled if hanging up did not end it.
HANG_UP_GRACE = 1.0


def hang_up(conn: Conn) -> None:
    """Shut ``conn``'s socket down, both ways, without closing its descriptor.

    A query that is *cancelled* (``asyncio.timeout``) is not given up by psycopg at once: it
    first asks the server to cancel it, over a new connection, and waits for that up to 5 s,
    then up to 5 s more for the query to end - 10 s lost when the server cannot be reached
    (a network partition).  After a shutdown the wait ends at once with an
    ``OperationalError``, and the connection is broken (the pool drops it).  The descriptor
    stays psycopg's, so no other socket can take its number while psycopg still watches it.
    """
    with contextlib.suppress(OSError, ValueError, psycopg.Error):
        fd = os.dup(conn.fileno())
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)


class HangUp:
    """Hang ``conn`` up (:func:`hang_up`) ``delay`` seconds from now, unless cancelled first."""

    def __init__(self, conn: Conn, delay: float) -> None:
        self.fired = False
        self._conn = conn
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self.fired = True
        hang_up(self._conn)

    def cancel(self) -> None:
        """Do not hang up (the use ended in time)."""
        self._handle.cancel()


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
    by the pool and, if ``retry``, the work is done once more on a fresh one.  A connection
    that does not answer in time is hung up (:func:`hang_up`), so the failure comes at the
    timeout, not 10 s later.

    Raises:
        psycopg.Error, PoolTimeout, TimeoutError: (:data:`DriverError`) it failed.
    """
    loop = asyncio.get_running_loop()
    for attempt in (1, 2):
        deadline = loop.time() + timeout
        hang: HangUp | None = None
        try:
            async with asyncio.timeout_at(deadline + HANG_UP_GRACE):
                async with pool.connection() as conn:
                    hang = HangUp(conn, max(0.0, deadline - loop.time()))
                    try:
                        return await work(conn)
                    finally:
                        hang.cancel()
        except DriverError as exc:
            if hang is not None and hang.fired:
                msg = f"no answer within {timeout:g} s"
                raise TimeoutError(msg) from exc
            if retry and attempt == 1 and is_broken(exc):
                logger.info("%s: %s; trying again on a new connection", what, exc)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover
