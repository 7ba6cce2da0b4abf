"""The PostgreSQL store: maildrops, delivery and cross-node locks in a PostgreSQL database.

Selected with ``mail_location = "postgresql"``; see :mod:`._store` for the design and
README.md ("PostgreSQL") for setup, the locks, and scaling out. The schema is made and
migrated by ``pobox db upgrade`` (:mod:`._schema`).

May import: the standard library, psycopg, psycopg_pool and :mod:`pobox.storage`.
"""

from __future__ import annotations

from pobox.storage.postgres._connect import (
    KEEPALIVES,
    DriverError,
    connection_params,
    error_text,
    is_broken,
    parse_dsn,
    run_pooled,
    set_timeouts,
)
from pobox.storage.postgres._locks import LockConnection, lock_key
from pobox.storage.postgres._schema import (
    Migration,
    SchemaError,
    SchemaStatus,
    check,
    latest_version,
    migrations,
    status,
    upgrade,
)
from pobox.storage.postgres._store import PostgresMaildrop, PostgresStore, uidl_for

__all__ = [
    "KEEPALIVES",
    "DriverError",
    "LockConnection",
    "Migration",
    "PostgresMaildrop",
    "PostgresStore",
    "SchemaError",
    "SchemaStatus",
    "check",
    "connection_params",
    "error_text",
    "is_broken",
    "latest_version",
    "lock_key",
    "migrations",
    "parse_dsn",
    "run_pooled",
    "set_timeouts",
    "status",
    "uidl_for",
    "upgrade",
]
