"""Fixtures for tests that run a real pobox server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A pobox server with users alice/secret and bob/hunter2 and empty Maildirs."""
    async with running_server(tmp_path, {"alice": "secret", "bob": "hunter2"}) as server:
        yield server
