"""Fixtures for the TLS tests: a test CA and a pobox with STLS and implicit TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server

from .helpers import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and a certificate for localhost and 127.0.0.1."""
    return Pki.create(tmp_path / "pki")


@pytest.fixture
async def tls_srv(tmp_path: Path, pki: Pki) -> AsyncIterator[RunningServer]:
    """A pobox with STLS on its plain port and implicit TLS on a second one."""
    async with running_server(
        tmp_path / "srv",
        {"alice": "secret"},
        ssl_listen=["127.0.0.1:0"],
        **pki.settings,
    ) as server:
        yield server
