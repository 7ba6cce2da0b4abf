"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.postgres import pg_cluster, pg_dsn
from tests.integration.wire import Wire

# Property tests check outcomes, never speed: no per-example deadline, which a loaded machine
# (CI's two cores, busy with servers started by other tests) would turn into false failures.
settings.register_profile("pobox", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pobox")
# The throwaway PostgreSQL cluster and its per-test database, for every test directory.
__all__ = ["pg_cluster", "pg_dsn"]


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    """Close the raw test connections a test left open, in the test's own event loop."""
    yield
    await Wire.close_all()
