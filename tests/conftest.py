"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.wire import Wire


@pytest.fixture(autouse=True)
async def _close_wires() -> AsyncIterator[None]:
    """Close the raw test connections a test left open, in the test's own event loop."""
    yield
    await Wire.close_all()
