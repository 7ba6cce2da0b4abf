"""The database schema: numbered migrations, applied once each, and the version check.

Migrations are the files ``migrations/NNNN_name.sql`` of this package, applied in number
order, each in a transaction of its own together with the row of ``schema_migrations`` that
records it (number, name, SHA-256 of the file, when), so a migration is either fully applied
and recorded or not at all. :func:`upgrade` applies those not yet recorded; it is idempotent
and safe to run on every deploy, from any number of nodes at once: a PostgreSQL advisory lock
(:data:`MIGRATION_LOCK`) lets one run at a time, and the others then find nothing to do.

``{schema}`` in a migration file stands for the configured schema, composed as a quoted
identifier with :mod:`psycopg.sql`, never by string formatting.

:func:`check` is what ``pobox serve`` runs at start: a schema older or newer than this pobox
knows is an error whose message says what to run.

May import: the standard library, psycopg and :mod:`pobox.errors`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from pobox.errors import PoboxError

__all__ = [
    "MIGRATION_LOCK",
    "Migration",
    "SchemaError",
    "SchemaStatus",
    "check",
    "migrations",
    "status",
    "upgrade",
]

#: The two-key advisory lock (``pg_advisory_lock(int, int)``) that serialises migrations.
#: The two-key space is separate from the one-key space the maildrop locks use.
MIGRATION_LOCK = (0x706F_6278, 1)  # "pobx", 1

#: Time one migration may take, and time to wait for a table lock it needs (sessions and
#: deliveries keep running meanwhile: a short lock wait fails instead of stalling them).
MIGRATION_TIMEOUT = "15min"
MIGRATION_LOCK_TIMEOUT = "10s"

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaError(PoboxError):
    """The database schema is missing, older or newer than this pobox, or was altered."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        """The SHA-256 of the file, in hexadecimal."""
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """What :func:`status` found.

    Attributes:
        applied: ``(version, name, applied at)`` of every recorded migration, in order.
        pending: the migrations not applied yet.
        unknown: versions recorded in the database that this pobox does not have.
        altered: versions whose file changed since they were applied.
    """

    applied: tuple[tuple[int, str, datetime], ...]
    pending: tuple[Migration, ...]
    unknown: tuple[int, ...]
    altered: tuple[int, ...]

    @property
    def version(self) -> int:
        """The highest version applied (0: none)."""
        return max((version for version, _, _ in self.applied), default=0)


def migrations() -> tuple[Migration, ...]:
    """Return the migrations this pobox has, in version order."""
    found: list[Migration] = []
    folder = importlib.resources.files(__package__).joinpath("migrations")
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    return tuple(found)


def latest_version() -> int:
    """Return the version of the newest migration this pobox has."""
    return max((migration.version for migration in migrations()), default=0)


def _table(schema: str) -> sql.Composed:
    return sql.SQL("{}").format(sql.Identifier(schema, "schema_migrations"))


async def _applied(
    conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str
) -> dict[int, tuple[str, str, datetime]] | None:
    """Return version → (name, checksum, applied at), or ``None`` if nothing was ever applied."""
    cur = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(schema, "schema_migrations").as_string(conn),),
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute(
        sql.SQL("SELECT version, name, checksum, applied FROM {} ORDER BY version").format(
            _table(schema)
        )
    )
    out: dict[int, tuple[str, str, datetime]] = {}
    for version, name, checksum, applied in await cur.fetchall():
        assert isinstance(version, int)
        assert isinstance(applied, datetime)
        out[version] = (str(name), str(checksum), applied)
    return out


async def status(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str) -> SchemaStatus:
    """Return which migrations the database in ``conn`` has, lacks, or has that we do not."""
    have = await _applied(conn, schema) or {}
    known = {migration.version: migration for migration in migrations()}
    return SchemaStatus(
        applied=tuple((version, name, at) for version, (name, _, at) in sorted(have.items())),
        pending=tuple(m for v, m in sorted(known.items()) if v not in have),
        unknown=tuple(v for v in sorted(have) if v not in known),
        altered=tuple(
            v
            for v, (_, sum_, _) in sorted(have.items())
            if v in known and known[v].checksum != sum_
        ),
    )


async def check(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str) -> int:
    """Return the schema version if it is exactly the one this pobox expects.

    Raises:
        SchemaError: naming what to run (``pobox db upgrade``) or what is wrong.
    """
    found = await status(conn, schema)
    if found.unknown:
        msg = (
            f"the database schema {schema!r} is at version {found.version}, newer than this pobox "
            f"knows ({latest_version()}): upgrade pobox on this node"
        )
        raise SchemaError(msg)
    if found.pending:
        where = "has no pobox tables" if not found.applied else f"is at version {found.version}"
        msg = (
            f"the database schema {schema!r} {where}, this pobox needs version "
            f"{latest_version()}: run `pobox db upgrade -c CONFIG`"
        )
        raise SchemaError(msg)
    return found.version


async def upgrade(
    conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str
) -> list[Migration]:
    """Apply every pending migration, each in one transaction; return those applied.

    ``conn`` must be in autocommit mode. Concurrent runs wait for each other on
    :data:`MIGRATION_LOCK`.

    Raises:
        SchemaError: the database has migrations this pobox does not know.
        psycopg.Error: a migration failed (it was rolled back; those before it stay).
    """
    # Another node may be migrating: wait for it as long as a migration may take.
    await conn.execute("SELECT set_config('statement_timeout', %s, false)", (MIGRATION_TIMEOUT,))
    await conn.execute("SELECT pg_advisory_lock(%s, %s)", MIGRATION_LOCK)
    try:
        async with conn.transaction():
            await _set_timeouts(conn)
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " version integer PRIMARY KEY,"
                    " name text NOT NULL,"
                    " checksum text NOT NULL,"
                    " applied timestamptz NOT NULL DEFAULT now())"
                ).format(_table(schema))
            )
        found = await status(conn, schema)
        if found.unknown:
            msg = (
                f"the database schema {schema!r} has migrations {list(found.unknown)} that this "
                "pobox does not know: upgrade pobox before running db upgrade"
            )
            raise SchemaError(msg)
        done: list[Migration] = []
        for migration in found.pending:
            async with conn.transaction():
                await _set_timeouts(conn)
                await conn.execute(sql.SQL(migration.text).format(schema=sql.Identifier(schema)))
                await conn.execute(
                    sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(
                        _table(schema)
                    ),
                    (migration.version, migration.name, migration.checksum),
                )
            done.append(migration)
        return done
    finally:
        if not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", MIGRATION_LOCK)


async def _set_timeouts(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Bound the current transaction's statements and lock waits."""
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
        (MIGRATION_TIMEOUT, MIGRATION_LOCK_TIMEOUT),
    )
