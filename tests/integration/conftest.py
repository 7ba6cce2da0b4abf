"""Fixtures for tests that run a real pobox server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server

USERS = {"alice": "secret", "bob": "hunter2"}


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A pobox server with users alice/secret and bob/hunter2 and empty Maildirs."""
    async with running_server(tmp_path, USERS) as server:
        yield server


@pytest.fixture(params=["maildir", "postgresql"])
async def any_srv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The same server on each store in turn: Maildirs, then the throwaway PostgreSQL."""
    settings = {}
    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_dsn")
        settings = {"mail_location": "postgresql", "postgresql_dsn": dsn, "postgresql_timeout": 10}
    async with running_server(tmp_path, USERS, **settings) as server:
        yield server
