"""Fixtures for tests that run a real pobox server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pobox.testing import RunningServer, running_server

USERS = {"alice": "secret", "bob": "hunter2"}


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A pobox server with users alice/secret and bob/hunter2 and empty Maildirs."""
    async with running_server(tmp_path, USERS) as server:
        yield server


@pytest.fixture(params=["maildir", "postgresql", "postgresql-users"])
async def any_srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The same server on each store in turn: Maildirs, the throwaway PostgreSQL, and both
    mail and users (userdb = "postgresql") in PostgreSQL.
    """
    settings: dict[str, object] = {}
    if request.param.startswith("postgresql"):
        dsn = request.getfixturevalue("pg_dsn")
        settings = {"mail_location": "postgresql", "postgresql_dsn": dsn, "postgresql_timeout": 10}
    if request.param == "postgresql-users":
        settings["userdb"] = "postgresql"
        with psycopg.connect(str(settings["postgresql_dsn"]), autocommit=True) as conn:
            for name, password in USERS.items():
                conn.execute(
                    "INSERT INTO pobox.users (username, password) VALUES (%s, %s)",
                    (name, "{PLAIN}" + password),
                )
    async with running_server(tmp_path, USERS, **settings) as server:
        if request.param == "postgresql-users":
            Path(server.config.passwd_file).unlink()  # users come from the database alone
        yield server
