"""Fixtures of the SASL and brute-force defence tests."""

from __future__ import annotations

import pytest

from pobox.server import _session


@pytest.fixture
def failure_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record each failure delay the session sleeps (it still sleeps it)."""
    waits: list[float] = []
    real_sleep = _session._sleep

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(_session, "_sleep", recording_sleep)
    return waits
