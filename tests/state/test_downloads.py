"""The contract of DownloadCounters on every backend: memory, the master's (remote), PostgreSQL.

A factory takes a clock the test moves by hand (no sleeping); the instances one test makes
share one store, as the sessions of one node, the workers of one master, or the nodes of a
cluster do.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from pobox.state import DownloadCounters, MemoryDownloadCounters
from pobox.state.postgres import PostgresDownloadCounters, PostgresState
from pobox.state.remote import RemoteDownloadCounters, RemoteState, StateService


class Clock:
    """A wall clock the test moves by hand: 1970-01-12 13:46:40 UTC to start with."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[Clock], DownloadCounters]


@pytest.fixture(params=["memory", "remote", "postgresql"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Each backend's factory in turn; the instances of one test share their store."""
    if request.param == "memory":
        shared: list[MemoryDownloadCounters] = []

        def memory(clock: Clock) -> DownloadCounters:
            if not shared:
                shared.append(MemoryDownloadCounters(clock=clock))
            return shared[0]

        yield memory
        return
    if request.param == "remote":
        services: list[StateService] = []
        remotes: list[RemoteState] = []

        def remote(clock: Clock) -> DownloadCounters:
            if not services:
                services.append(StateService(60, "a", wall_clock=clock))
            master_end, worker_end = socket.socketpair()
            services[0].attach(master_end)
            remotes.append(RemoteState(worker_end))
            return RemoteDownloadCounters(remotes[-1])

        yield remote
        for state in remotes:
            await state.aclose()
        for service in services:
            await service.aclose()
        return
    dsn = request.getfixturevalue("pg_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:  # the database is shared by tests
        conn.execute("TRUNCATE pobox.download_counter")
    states: list[PostgresState] = []

    def postgres(clock: Clock) -> DownloadCounters:
        states.append(PostgresState(dsn, timeout=5, clock=clock))
        return PostgresDownloadCounters(states[-1])

    yield postgres
    for state in states:
        await state.aclose()


class TestDownloadCountersContract:
    """What every backend does."""

    async def test_charges_add_up_to_the_limit(self, make: Factory) -> None:
        """Charges within the limit are added; the one that would pass it is refused, unadded."""
        counters = make(Clock())
        assert [True, True, False, True] == [
            await counters.charge("alice", n, 100) for n in (60, 40, 1, 0)
        ]
        assert 100 == await counters.used("alice")

    async def test_a_first_charge_over_the_limit(self, make: Factory) -> None:
        """A user with nothing charged today is refused a charge larger than the limit."""
        counters = make(Clock())
        assert (False, 0) == (await counters.charge("bob", 101, 100), await counters.used("bob"))

    async def test_no_limit(self, make: Factory) -> None:
        """Limit 0 is no limit, but the octets are still counted."""
        counters = make(Clock())
        assert await counters.charge("alice", 10**12, 0)
        assert 10**12 == await counters.used("alice")

    async def test_refunds_never_below_zero(self, make: Factory) -> None:
        """A negative charge is always applied, down to 0 at most."""
        counters = make(Clock())
        await counters.charge("alice", 100, 100)
        assert await counters.charge("alice", -30, 100)
        assert 70 == await counters.used("alice")
        assert await counters.charge("alice", -500, 100)
        assert 0 == await counters.used("alice")
        assert await counters.charge("carol", -5, 100)
        assert 0 == await counters.used("carol")

    async def test_per_user(self, make: Factory) -> None:
        """One user's count does not touch another's."""
        counters = make(Clock())
        await counters.charge("alice", 100, 100)
        assert (True, 0) == (await counters.charge("bob", 100, 100), await counters.used("carol"))

    async def test_reset_at_midnight_utc(self, make: Factory) -> None:
        """The count starts again at 00:00 UTC, not 24 hours after the first charge."""
        clock = Clock()
        counters = make(clock)
        assert await counters.charge("alice", 100, 100)
        clock.now = 1_036_799.0  # 23:59:59 UTC the same day
        assert not await counters.charge("alice", 1, 100)
        clock.now = 1_036_800.0  # 00:00:00 UTC the next day
        assert 0 == await counters.used("alice")
        assert await counters.charge("alice", 100, 100)
        assert 100 == await counters.used("alice")

    async def test_shared_by_every_instance(self, make: Factory) -> None:
        """Two instances (sessions, workers, nodes) share one count per user."""
        clock = Clock()
        first, second = make(clock), make(clock)
        assert await first.charge("alice", 60, 100)
        assert not await second.charge("alice", 41, 100)
        assert 60 == await second.used("alice")

    async def test_concurrent_charges_never_pass_the_limit(self, make: Factory) -> None:
        """Of many charges at once that together pass the limit, only those within it count."""
        clock = Clock()
        instances = [make(clock) for _ in range(4)]
        results = await asyncio.gather(
            *(instances[i % 4].charge("alice", 30, 100) for i in range(12))
        )
        assert (3, 90) == (sum(results), await instances[0].used("alice"))


class TestMemoryBounds:
    """The memory backend forgets past days when it holds too many users."""

    async def test_past_days_dropped(self) -> None:
        """Past the cap, only today's entries stay."""
        clock = Clock()
        counters = MemoryDownloadCounters(max_entries=2, clock=clock)
        await counters.charge("a", 1, 0)
        await counters.charge("b", 1, 0)
        clock.now += 86_400
        await counters.charge("c", 1, 0)
        assert 1 == len(counters._data)
