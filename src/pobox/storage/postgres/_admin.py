"""What ``pobox db ...`` does: create and migrate the schema, report it, sweep unused bodies.

Each function opens its own connection (autocommit, under the timeout) from the same DSN the
store uses and returns the lines to print.

May import: the standard library, psycopg and :mod:`pobox.storage.postgres`.
"""

from __future__ import annotations

import math

import psycopg
from psycopg.conninfo import make_conninfo

from pobox.storage.base import StorageError
from pobox.storage.postgres._connect import parse_dsn
from pobox.storage.postgres._schema import latest_version, status, upgrade
from pobox.storage.postgres._store import PostgresStore

__all__ = ["DatabaseError", "db_gc", "db_status", "db_upgrade"]

#: What a ``pobox db`` command reports as a database error (unreachable, refused, failed).
DatabaseError = (psycopg.Error, StorageError)


async def _connect(dsn: str, timeout: float) -> psycopg.AsyncConnection[tuple[object, ...]]:
    given = parse_dsn(dsn)  # a malformed DSN: ConfigError, not libpq's quote of it
    extra = {"application_name": "pobox db"} if "application_name" not in given else {}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = str(max(1, math.ceil(timeout)))
    conn = await psycopg.AsyncConnection.connect(make_conninfo(dsn, **extra), autocommit=True)
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, false)", (f"{int(timeout * 1000)}ms",)
    )
    return conn


async def db_upgrade(dsn: str, schema: str, *, timeout: float = 10.0) -> list[str]:
    """Apply the pending migrations; return what was done, one line each.

    Raises:
        pobox.storage.postgres.SchemaError: the database is newer than this pobox.
        psycopg.Error: the database cannot be reached, or a migration failed.
    """
    async with await _connect(dsn, timeout) as conn:
        done = await upgrade(conn, schema)
        found = await status(conn, schema)
    lines = [f"applied {m.version:04d}_{m.name}" for m in done]
    verb = "is now" if done else "was already"
    lines.append(f"schema {schema!r} {verb} at version {found.version}")
    return lines


async def db_status(dsn: str, schema: str, *, timeout: float = 10.0) -> tuple[bool, list[str]]:
    """Report the schema: applied, pending, unknown and altered migrations.

    Returns:
        ``(current, lines)``: whether the schema is exactly what this pobox needs, and the
        report.
    """
    async with await _connect(dsn, timeout) as conn:
        found = await status(conn, schema)
    lines = [f"schema {schema!r}: version {found.version}, this pobox needs {latest_version()}"]
    lines += [f"  applied {v:04d}_{name} at {at.isoformat()}" for v, name, at in found.applied]
    lines += [f"  pending {m.version:04d}_{m.name}" for m in found.pending]
    lines += [f"  unknown {v:04d}: newer than this pobox" for v in found.unknown]
    lines += [f"  altered {v:04d}: the file changed after it was applied" for v in found.altered]
    if found.pending:
        lines.append("run `pobox db upgrade -c CONFIG`")
    current = not found.pending and not found.unknown
    return current, lines


async def db_gc(store: PostgresStore) -> list[str]:
    """Drop message bodies that no message uses (left by a node that died mid-UPDATE).

    With ``pop3_delete_retention``, first purge the deleted mail every maildrop kept longer
    than that (maildrops whose users never log in again are purged by nothing else).
    """
    lines = []
    try:
        if store.retention:
            purged = await store.purge_all_deleted()
            lines.append(f"purged {purged} deleted messages kept past the retention")
        dropped = await store.collect_garbage()
    finally:
        await store.aclose()
    return [*lines, f"dropped {dropped} unused message bodies"]
