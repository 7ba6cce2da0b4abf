"""The contract of LoginTimes (LOGIN-DELAY) on every backend: memory, the master's, PostgreSQL.

A factory takes a clock the test moves by hand (no sleeping); the instances one test makes
share one store, as the sessions of one node, the workers of one master, or the nodes of a
cluster do.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from pobox.state import LoginTimes, MemoryLoginTimes
from pobox.state.postgres import PostgresLoginTimes, PostgresState
from pobox.state.remote import RemoteLoginTimes, RemoteState, StateService


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[Clock], LoginTimes]


@pytest.fixture(params=["memory", "remote", "postgresql"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Each backend's factory in turn; the instances of one test share their store."""
    if request.param == "memory":
        shared: list[MemoryLoginTimes] = []

        def memory(clock: Clock) -> LoginTimes:
            if not shared:
                shared.append(MemoryLoginTimes(clock=clock))
            return shared[0]

        yield memory
        return
    if request.param == "remote":
        services: list[StateService] = []
        remotes: list[RemoteState] = []

        def remote(clock: Clock) -> LoginTimes:
            if not services:
                services.append(StateService(60, "a", wall_clock=clock))
            master_end, worker_end = socket.socketpair()
            services[0].attach(master_end)
            remotes.append(RemoteState(worker_end))
            return RemoteLoginTimes(remotes[-1])

        yield remote
        for state in remotes:
            await state.aclose()
        for service in services:
            await service.aclose()
        return
    dsn = request.getfixturevalue("pg_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE pobox.login_time")
    states: list[PostgresState] = []

    def postgres(clock: Clock) -> LoginTimes:
        states.append(PostgresState(dsn, timeout=5, clock=clock))
        return PostgresLoginTimes(states[-1])

    yield postgres
    for state in states:
        await state.aclose()


class TestLoginTimesContract:
    """What every LoginTimes backend does."""

    async def test_first_login_admitted(self, make: Factory) -> None:
        """A user's first login is admitted."""
        assert await make(Clock()).admit("alice", 900)

    async def test_second_login_within_delay_refused(self, make: Factory) -> None:
        """A login under ``delay`` seconds after the last is refused, at the limit admitted."""
        clock = Clock()
        times = make(clock)
        assert await times.admit("alice", 900)
        clock.now += 899
        assert not await times.admit("alice", 900)
        clock.now += 1
        assert await times.admit("alice", 900)

    async def test_refusal_records_nothing(self, make: Factory) -> None:
        """A refused login does not push the wait further out."""
        clock = Clock()
        times = make(clock)
        assert await times.admit("alice", 60)
        clock.now += 30
        assert not await times.admit("alice", 60)
        clock.now += 30
        assert await times.admit("alice", 60)

    async def test_per_user(self, make: Factory) -> None:
        """One user's login does not delay another's."""
        times = make(Clock())
        assert await times.admit("alice", 900)
        assert await times.admit("bob", 900)
        assert not await times.admit("alice", 900)

    async def test_delay_is_the_callers(self, make: Factory) -> None:
        """The delay is that of the login being checked (a user's own value may change)."""
        clock = Clock()
        times = make(clock)
        assert await times.admit("alice", 900)
        clock.now += 100
        assert await times.admit("alice", 60)

    async def test_future_login_does_not_lock_out(self, make: Factory) -> None:
        """A last login in the future (a clock set back) does not refuse the user."""
        clock = Clock()
        times = make(clock)
        assert await times.admit("alice", 900)
        clock.now -= 3600
        assert await times.admit("alice", 900)

    async def test_shared_by_every_instance(self, make: Factory) -> None:
        """Two instances (sessions, workers, nodes) see each other's logins."""
        clock = Clock()
        assert await make(clock).admit("alice", 900)
        assert not await make(clock).admit("alice", 900)


class TestMemoryBounds:
    """The memory backend forgets the oldest logins beyond its bound."""

    async def test_at_most_max_entries(self) -> None:
        """Beyond ``max_entries`` the user who logged in longest ago is forgotten."""
        clock = Clock()
        times = MemoryLoginTimes(max_entries=2, clock=clock)
        for user in ("a", "b", "c"):
            assert await times.admit(user, 900)
        assert await times.admit("a", 900)  # forgotten: admitted again
        assert not await times.admit("c", 900)
