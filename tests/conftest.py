"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers.postgres import pg_cluster, pg_dsn
from tests.integration.wire import Wire

# The throwaway PostgreSQL cluster and its per-test database, for every test directory.
__all__ = ["pg_cluster", "pg_dsn"]


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    """Close the raw test connections a test left open, in the test's own event loop."""
    yield
    await Wire.close_all()
