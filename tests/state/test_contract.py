"""The contract every FailureCounters backend keeps (memory now; PostgreSQL in issue 12).

Each test runs against every backend; a backend is a factory taking the window and a clock
the test moves by hand (no sleeping, no timed assertions).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pobox.state import FailureCounters, MemoryFailureCounters


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[float, Clock], FailureCounters]

BACKENDS: dict[str, Factory] = {
    "memory": lambda window, clock: MemoryFailureCounters(window, clock=clock),
}


@pytest.fixture(params=sorted(BACKENDS))
def make(request: pytest.FixtureRequest) -> Factory:
    """Each backend's factory in turn."""
    return BACKENDS[request.param]


class TestFailureCountersContract:
    """What the login throttle may rely on, whichever backend holds the counts."""

    async def test_unknown_keys_count_zero(self, make: Factory) -> None:
        """Keys never failed count 0, in the order asked."""
        counters = make(60, Clock())
        assert [0, 0] == await counters.counts(["ip:a", "user:b"])

    async def test_add_counts_up_per_key(self, make: Factory) -> None:
        """Each add counts one more for each key given, and returns the new counts."""
        counters = make(60, Clock())
        assert [1, 1] == await counters.add(["ip:a", "user:b"])
        assert [2] == await counters.add(["ip:a"])
        assert [2, 1, 0] == await counters.counts(["ip:a", "user:b", "ip:c"])

    async def test_window_runs_from_the_first_failure(self, make: Factory) -> None:
        """A count is forgotten window seconds after its first failure, later ones or not."""
        clock = Clock()
        counters = make(60, clock)
        await counters.add(["ip:a"])
        clock.now += 59
        await counters.add(["ip:a"])
        assert [2] == await counters.counts(["ip:a"])
        clock.now += 1
        assert [0] == await counters.counts(["ip:a"])
        assert [1] == await counters.add(["ip:a"])

    async def test_clear_forgets_only_those_keys(self, make: Factory) -> None:
        """clear() forgets the keys given and leaves the others."""
        counters = make(60, Clock())
        await counters.add(["ip:a", "user:b"])
        await counters.clear(["ip:a", "ip:never-seen"])
        assert [0, 1] == await counters.counts(["ip:a", "user:b"])


class TestMemoryBounds:
    """The memory backend stays bounded whatever keys an attacker makes up."""

    async def test_at_most_max_entries(self) -> None:
        """Beyond max_entries the least recently failed keys are forgotten first."""
        counters = MemoryFailureCounters(60, max_entries=2, clock=Clock())
        for key in ("ip:1", "ip:2", "ip:1", "ip:3"):
            await counters.add([key])
        assert 2 == len(counters)
        assert [2, 0, 1] == await counters.counts(["ip:1", "ip:2", "ip:3"])

    async def test_expired_entries_swept_by_adds(self) -> None:
        """Expired keys nobody asks about again are dropped by later adds: no sweeper needed."""
        clock = Clock()
        counters = MemoryFailureCounters(60, clock=clock)
        await counters.add([f"user:{i}" for i in range(3)])
        clock.now += 61
        await counters.add(["ip:new"])
        assert 1 == len(counters)
