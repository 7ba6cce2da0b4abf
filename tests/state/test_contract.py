"""The contract every shared-state backend keeps: memory (one node) and PostgreSQL (a cluster).

Each test runs against every backend; a backend is a factory taking the window (or the node
name and lease) and a clock the test moves by hand (no sleeping, no timed assertions).  The
PostgreSQL backend takes its times from that clock too, bound into its SQL, so the very same
tests run on a real throwaway PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest

from pobox.state import (
    FailureCounters,
    MemoryFailureCounters,
    MemorySessionRegistry,
    SessionEntry,
    SessionRegistry,
    StateUnavailable,
)
from pobox.state.postgres import PostgresFailureCounters, PostgresSessionRegistry, PostgresState
from pobox.state.remote import (
    FailingKeys,
    RemoteFailureCounters,
    RemoteSessionRegistry,
    RemoteState,
    StateService,
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[float, Clock], FailureCounters]


class Registries(Protocol):
    """Makes a registry for a node (several share one store, as the nodes of a cluster)."""

    def __call__(self, node: str, clock: Clock, *, lease: float = 30.0) -> SessionRegistry: ...


BACKENDS = ("memory", "remote", "postgresql")


class Workers:
    """The remote backend: one master's :class:`StateService`, a worker per connection."""

    def __init__(self) -> None:
        self.service: StateService | None = None
        self.states: list[RemoteState] = []

    def connect(self, window: float, clock: Clock) -> RemoteState:
        """Return a new worker's connection to the service (made on the first call)."""
        if self.service is None:
            self.service = StateService(window, "a", clock=clock)
        master_end, worker_end = socket.socketpair()
        self.service.attach(master_end)
        state = RemoteState(worker_end)
        self.states.append(state)
        return state

    async def aclose(self) -> None:
        """Close every connection, then the service."""
        for state in self.states:
            await state.aclose()
        if self.service is not None:
            await self.service.aclose()


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Each backend's factory in turn."""
    if request.param == "memory":
        yield lambda window, clock: MemoryFailureCounters(window, clock=clock)
        return
    if request.param == "remote":
        workers = Workers()
        yield lambda window, clock: RemoteFailureCounters(workers.connect(window, clock))
        await workers.aclose()
        return
    dsn = request.getfixturevalue("pg_dsn")
    states: list[PostgresState] = []

    def factory(window: float, clock: Clock) -> FailureCounters:
        state = PostgresState(dsn, timeout=5, clock=clock)
        states.append(state)
        return PostgresFailureCounters(state, window)

    yield factory
    for state in states:
        await state.aclose()


@pytest.fixture(params=BACKENDS)
async def registries(request: pytest.FixtureRequest) -> AsyncIterator[Registries]:
    """Each registry backend in turn; the PostgreSQL registries of one test share a database."""
    if request.param == "memory":
        shared: dict[str, MemorySessionRegistry] = {}

        def memory(node: str, clock: Clock, *, lease: float = 30.0) -> SessionRegistry:
            del clock, lease  # one node: no leases
            return shared.setdefault(node, MemorySessionRegistry(node))

        yield memory
        return
    if request.param == "remote":
        workers = Workers()

        def remote(node: str, clock: Clock, *, lease: float = 30.0) -> SessionRegistry:
            del lease  # one node: no leases
            return RemoteSessionRegistry(workers.connect(60, clock), node)

        yield remote
        await workers.aclose()
        return
    dsn = request.getfixturevalue("pg_dsn")
    states: list[PostgresState] = []

    def postgres(node: str, clock: Clock, *, lease: float = 30.0) -> SessionRegistry:
        state = PostgresState(dsn, timeout=5, clock=clock)
        states.append(state)
        return PostgresSessionRegistry(state, node, lease=lease)

    yield postgres
    for state in states:
        await state.aclose()


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

    async def test_counts_in_the_order_asked(self, make: Factory) -> None:
        """Counts come back in the order of the keys given, not sorted."""
        counters = make(60, Clock())
        await counters.add(["user:z"])
        assert [2, 1] == await counters.add(["user:z", "ip:a"])
        assert [2, 1] == await counters.counts(["user:z", "ip:a"])

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

    async def test_shared_by_every_instance(self, make: Factory) -> None:
        """Two counters over one store (two nodes) see each other's failures."""
        clock = Clock()
        node_a, node_b = make(60, clock), make(60, clock)
        await node_a.add(["ip:a"])
        if isinstance(node_a, MemoryFailureCounters):
            assert [0] == await node_b.counts(["ip:a"])  # memory: each node its own
        else:
            assert [2] == await node_b.add(["ip:a"])


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


def entry(sid: str, user: str = "alice", rip: str = "192.0.2.1", node: str = "a") -> SessionEntry:
    """A session entry with the defaults the tests do not care about."""
    return SessionEntry(sid, user, node, rip, 1_000_000.0, tls=True, mechanism="PLAIN")


class TestSessionRegistryContract:
    """What the connection limits and the ops tooling may rely on, whichever backend."""

    async def test_register_list_unregister(self, registries: Registries) -> None:
        """A registered session is listed with every field, and gone once unregistered."""
        reg = registries("a", Clock())
        admission = await reg.register(entry("s1"), max_user=0, max_userip=0)
        assert (True, 0, 0) == (
            admission.admitted,
            admission.user_sessions,
            admission.userip_sessions,
        )
        assert [entry("s1")] == await reg.sessions()
        assert [entry("s1")] == await reg.sessions("alice")
        assert [] == await reg.sessions("bob")
        await reg.unregister("s1")
        await reg.unregister("never-registered")
        assert [] == await reg.sessions()

    async def test_counts_per_user_and_address(self, registries: Registries) -> None:
        """count() gives the user's sessions, and those from one address."""
        reg = registries("a", Clock())
        for sid, user, rip in (
            ("s1", "alice", "192.0.2.1"),
            ("s2", "alice", "192.0.2.1"),
            ("s3", "alice", "192.0.2.2"),
            ("s4", "bob", "192.0.2.1"),
        ):
            await reg.register(entry(sid, user, rip), max_user=0, max_userip=0)
        assert (3, 2) == await reg.count("alice", "192.0.2.1")
        assert (1, 1) == await reg.count("bob", "192.0.2.1")
        assert (0, 0) == await reg.count("carol", "192.0.2.1")

    async def test_userip_limit_refuses_and_registers_nothing(self, registries: Registries) -> None:
        """At max_userip from one address the next login is refused; another address gets in."""
        reg = registries("a", Clock())
        for sid in ("s1", "s2"):
            assert (await reg.register(entry(sid), max_user=0, max_userip=2)).admitted
        refused = await reg.register(entry("s3"), max_user=0, max_userip=2)
        assert (False, 2, 2) == (
            refused.admitted,
            refused.user_sessions,
            refused.userip_sessions,
        )
        assert (2, 2) == await reg.count("alice", "192.0.2.1")
        elsewhere = await reg.register(entry("s4", rip="192.0.2.9"), max_user=0, max_userip=2)
        assert elsewhere.admitted

    async def test_user_limit_counts_every_address(self, registries: Registries) -> None:
        """max_user counts the user's sessions from anywhere."""
        reg = registries("a", Clock())
        await reg.register(entry("s1", rip="192.0.2.1"), max_user=2, max_userip=0)
        await reg.register(entry("s2", rip="192.0.2.2"), max_user=2, max_userip=0)
        assert not (
            await reg.register(entry("s3", rip="192.0.2.3"), max_user=2, max_userip=0)
        ).admitted
        assert (await reg.register(entry("s4", "bob"), max_user=2, max_userip=0)).admitted

    async def test_kick_reaches_the_owning_node(self, registries: Registries) -> None:
        """A kick by user or id, asked on any node, shows in the owner's next heartbeat."""
        clock = Clock()
        node_a = registries("a", clock)
        await node_a.register(entry("s1"), max_user=0, max_userip=0)
        await node_a.register(entry("s2"), max_user=0, max_userip=0)
        await node_a.register(entry("s3", "bob"), max_user=0, max_userip=0)
        asker = registries("a" if isinstance(node_a, MemorySessionRegistry) else "b", clock)
        assert [] == await node_a.heartbeat(["s1", "s2", "s3"])
        assert 1 == await asker.kick(session_id="s3")
        assert 0 == await asker.kick(session_id="nope")
        assert 0 == await asker.kick()
        assert ["s3"] == await node_a.heartbeat(["s1", "s2", "s3"])
        assert 2 == await asker.kick(user="alice")
        assert ["s1", "s2", "s3"] == await node_a.heartbeat(["s1", "s2", "s3"])

    async def test_heartbeat_forgets_sessions_the_node_lost(self, registries: Registries) -> None:
        """A session the node no longer has (a lost unregister, an earlier run) is forgotten."""
        reg = registries("a", Clock())
        await reg.register(entry("s1"), max_user=0, max_userip=0)
        await reg.register(entry("s2"), max_user=0, max_userip=0)
        await reg.heartbeat(["s2"])
        assert ["s2"] == [e.id for e in await reg.sessions()]


@pytest.fixture
async def cluster(pg_dsn: str) -> AsyncIterator[Registries]:
    """PostgreSQL registries, one per node, all on one database."""
    states: list[PostgresState] = []

    def postgres(node: str, clock: Clock, *, lease: float = 30.0) -> SessionRegistry:
        state = PostgresState(pg_dsn, timeout=5, clock=clock)
        states.append(state)
        return PostgresSessionRegistry(state, node, lease=lease)

    yield postgres
    for state in states:
        await state.aclose()


class TestClusterRegistry:
    """What only a registry shared by several nodes does: leases, limits across nodes."""

    async def test_limits_count_every_node(self, cluster: Registries) -> None:
        """Sessions on node a count toward a login on node b."""
        clock = Clock()
        node_a, node_b = cluster("a", clock), cluster("b", clock)
        await node_a.heartbeat([])
        await node_a.register(entry("s1"), max_user=0, max_userip=1)
        refused = await node_b.register(entry("s2", node="b"), max_user=0, max_userip=1)
        assert (False, 1) == (refused.admitted, refused.userip_sessions)
        assert ["a"] == [e.node for e in await node_b.sessions()]

    async def test_dead_node_sessions_expire(self, cluster: Registries) -> None:
        """A node that stops beating: its sessions stop counting after the lease, then go."""
        clock = Clock()
        node_a, node_b = cluster("a", clock, lease=15), cluster("b", clock, lease=15)
        await node_a.heartbeat([])
        await node_b.heartbeat([])
        await node_a.register(entry("s1"), max_user=0, max_userip=0)
        clock.now += 14
        await node_b.heartbeat([])
        assert (1, 1) == await node_b.count("alice", "192.0.2.1")
        clock.now += 1
        await node_b.heartbeat([])
        assert (0, 0) == await node_b.count("alice", "192.0.2.1")
        admitted = await node_b.register(entry("s2", node="b"), max_user=1, max_userip=1)
        assert (True, 0) == (admitted.admitted, admitted.user_sessions)
        await node_b.unregister("s2")
        assert [] == await node_b.sessions()
        assert 0 == await node_b.kick(user="alice")
        assert isinstance(node_b, PostgresSessionRegistry)
        assert (1, 0) == await node_b.purge()
        await node_a.heartbeat(["s1"])  # back: its (purged) session does not come back
        assert [] == await node_a.sessions()

    async def test_own_sessions_count_without_a_lease(self, cluster: Registries) -> None:
        """A node's own sessions count for it even before its first heartbeat."""
        reg = cluster("a", Clock())
        await reg.register(entry("s1"), max_user=1, max_userip=0)
        assert not (await reg.register(entry("s2"), max_user=1, max_userip=0)).admitted


class TestNodeNames:
    """A node notices another live process using its name, and not a restart of itself."""

    async def test_two_live_processes_one_name(self, cluster: Registries) -> None:
        """Two registries of one node name beating in turn both see the name taken."""
        clock = Clock()
        first, second = cluster("a", clock), cluster("a", clock)
        assert isinstance(first, PostgresSessionRegistry)
        assert isinstance(second, PostgresSessionRegistry)
        await first.heartbeat([])
        await second.heartbeat([])
        await first.heartbeat([])
        await second.heartbeat([])
        assert (True, True) == (first.name_taken, second.name_taken)

    async def test_restart_is_no_clash(self, cluster: Registries) -> None:
        """A new process of a node (the old one gone) is not a clash."""
        clock = Clock()
        old, new = cluster("a", clock), cluster("a", clock)
        assert isinstance(new, PostgresSessionRegistry)
        await old.heartbeat([])
        await new.heartbeat([])
        await new.heartbeat([])
        assert not new.name_taken


class TestClockSkew:
    """The PostgreSQL registry tells how far this node's clock is from the database's."""

    async def test_skew_measured_at_each_heartbeat(self, cluster: Registries) -> None:
        """A node clock 60 s ahead shows as about -60 s; none before the first beat."""
        registry = cluster("a", lambda: time.time() + 60)  # type: ignore[arg-type]
        assert isinstance(registry, PostgresSessionRegistry)
        before = registry.clock_skew
        await registry.heartbeat([])
        skew = registry.clock_skew
        assert (None, True) == (before, skew is not None and -70 < skew < -50)


class TestPostgresBounds:
    """The PostgreSQL counters stay bounded: upkeep drops expired rows, then the idlest."""

    async def test_upkeep_drops_expired_then_idlest(self, pg_dsn: str) -> None:
        """Beyond max_entries the keys idle longest go; expired ones go first of all."""
        clock = Clock()
        state = PostgresState(pg_dsn, timeout=5, clock=clock)
        try:
            counters = PostgresFailureCounters(state, 60, max_entries=2)
            await counters.add(["ip:old"])
            clock.now += 30
            for key in ("ip:1", "ip:2", "ip:1", "ip:3"):
                clock.now += 1
                await counters.add([key])
            clock.now += 26  # ip:old expired (61 s), the others live
            assert (1, 1) == await counters.upkeep()
            assert [2, 0, 1] == await counters.counts(["ip:1", "ip:2", "ip:3"])
            rows = await state.fetch("test", "counts", {"keys": ["ip:old"], "expired": 0.0})
            assert [] == rows
        finally:
            await state.aclose()

    async def test_add_sweeps_a_few_expired_rows(self, pg_dsn: str) -> None:
        """Expired rows nobody asks about again are deleted by later adds."""
        clock = Clock()
        state = PostgresState(pg_dsn, timeout=5, clock=clock)
        try:
            counters = PostgresFailureCounters(state, 60)
            await counters.add([f"user:{i}" for i in range(3)])
            clock.now += 61
            await counters.add(["ip:new"])
            rows = await state.fetch(
                "test", "counts", {"keys": [f"user:{i}" for i in range(3)], "expired": 0.0}
            )
            assert [] == rows
        finally:
            await state.aclose()


class PgState:
    """A PostgreSQL state with a hand-moved clock, its failure counters and a registry."""

    def __init__(self, dsn: str) -> None:
        self.clock = Clock()
        self.state = PostgresState(dsn, timeout=5, clock=self.clock)
        self.counters = PostgresFailureCounters(self.state, 60)
        self.registry = PostgresSessionRegistry(self.state, "a", lease=30, failure_window=60)


@pytest.fixture
async def pg_state(pg_dsn: str) -> AsyncIterator[PgState]:
    """A :class:`PgState` on the test database, closed at the end."""
    made = PgState(pg_dsn)
    yield made
    await made.state.aclose()


class TestPostgresCheckedRegistration:
    """PostgreSQL registers a session and checks its address's failed logins in one step."""

    async def test_failures_reported_and_refused_at_the_limit(self, pg_state: PgState) -> None:
        """Under the limit the session is registered and the failures said; at it, nothing is
        registered; the window ended, the failures no longer count."""
        registry = pg_state.registry
        await pg_state.counters.add(["ip:192.0.2.1"])
        first = await registry.register_checked(
            entry("s1"), max_user=0, max_userip=0, failure_key="ip:192.0.2.1", max_failures=2
        )
        await pg_state.counters.add(["ip:192.0.2.1"])
        second = await registry.register_checked(
            entry("s2"), max_user=0, max_userip=0, failure_key="ip:192.0.2.1", max_failures=2
        )
        registered = [e.id for e in await registry.sessions()]
        pg_state.clock.now += 61
        third = await registry.register_checked(
            entry("s3"), max_user=0, max_userip=0, failure_key="ip:192.0.2.1", max_failures=2
        )
        assert ((True, 1), (False, 2), ["s1"], (True, 0)) == (
            (first.admitted, first.failures),
            (second.admitted, second.failures),
            registered,
            (third.admitted, third.failures),
        )

    async def test_plain_register_checks_no_failures(self, pg_state: PgState) -> None:
        """register leaves the failures alone, and says it did not check them."""
        await pg_state.counters.add(["ip:192.0.2.1"])
        admission = await pg_state.registry.register(entry("s1"), max_user=0, max_userip=0)
        assert (True, None) == (admission.admitted, admission.failures)


class TestRemoteWorkers:
    """The master's state, shared by its workers: what one worker does stays its own."""

    async def test_heartbeat_keeps_other_workers_sessions(self) -> None:
        """A worker's heartbeat forgets only its own lost sessions, never another worker's."""
        workers = Workers()
        try:
            one = RemoteSessionRegistry(workers.connect(60, Clock()), "a")
            two = RemoteSessionRegistry(workers.connect(60, Clock()), "a")
            await one.register(entry("s1"), max_user=0, max_userip=0)
            await two.register(entry("s2"), max_user=0, max_userip=0)
            assert [] == await one.heartbeat([])
            assert ["s2"] == [e.id for e in await one.sessions()]
            assert (1, 1) == await one.count("alice", "192.0.2.1")
        finally:
            await workers.aclose()

    async def test_worker_gone_takes_its_sessions(self) -> None:
        """The sessions of a worker whose connection ends no longer count."""
        workers = Workers()
        try:
            one = workers.connect(60, Clock())
            two = RemoteSessionRegistry(workers.connect(60, Clock()), "a")
            await RemoteSessionRegistry(one, "a").register(entry("s1"), max_user=1, max_userip=0)
            assert not (await two.register(entry("s2"), max_user=1, max_userip=0)).admitted
            await one.aclose()
            while (await two.count("alice", "192.0.2.1"))[0]:
                await asyncio.sleep(0.01)
            assert (await two.register(entry("s2"), max_user=1, max_userip=0)).admitted
        finally:
            await workers.aclose()

    async def test_master_gone_is_seen(self) -> None:
        """When the master's end closes, the worker is told once and calls fail cleanly."""
        master_end, worker_end = socket.socketpair()
        lost: list[bool] = []
        state = RemoteState(worker_end, on_lost=lambda: lost.append(True))
        await state.start()
        master_end.close()
        while not lost:
            await asyncio.sleep(0.01)
        with pytest.raises(StateUnavailable):
            await RemoteFailureCounters(state).counts(["ip:a"])
        assert [True] == lost
        await state.aclose()

    async def test_unknown_call_is_refused(self) -> None:
        """A call the master does not know is answered with an error, and the link goes on."""
        workers = Workers()
        try:
            state = workers.connect(60, Clock())
            with pytest.raises(StateUnavailable, match=r"bad state call"):
                await state.call("nope")
            with pytest.raises(StateUnavailable, match=r"bad state call"):
                await state.call("counts")  # no keys
            assert [0] == await RemoteFailureCounters(state).counts(["ip:a"])
        finally:
            await workers.aclose()

    async def test_silent_master_times_out(self) -> None:
        """A master that does not answer makes the call fail as unavailable, not hang."""
        master_end, worker_end = socket.socketpair()
        state = RemoteState(worker_end, timeout=0.05)
        try:
            with pytest.raises(StateUnavailable, match=r"did not answer"):
                await RemoteFailureCounters(state).add(["ip:a"])
        finally:
            await state.aclose()
            master_end.close()

    async def test_oversized_message_closes_the_link(self) -> None:
        """A message longer than the limit ends that worker's connection (its sessions too)."""
        workers = Workers()
        try:
            state = workers.connect(60, Clock())
            registry = RemoteSessionRegistry(state, "a")
            await registry.register(entry("s1"), max_user=0, max_userip=0)
            lost: list[bool] = []
            state.on_lost = lambda: lost.append(True)
            assert state._writer is not None
            state._writer.write(b"\xff\xff\xff\xff")
            while not lost:
                await asyncio.sleep(0.01)
            other = RemoteSessionRegistry(workers.connect(60, Clock()), "a")
            assert [] == await other.sessions()
        finally:
            await workers.aclose()


async def _raw_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: str) -> str:
    """Write one framed message (JSON text) and return the next framed message read."""
    data = msg.encode()
    writer.write(len(data).to_bytes(4, "big") + data)
    size = int.from_bytes(await reader.readexactly(4), "big")
    return (await reader.readexactly(size)).decode()


class TestRemoteNotices:
    """Calls whose result is nothing are notices: no answer, applied in the worker's order."""

    async def test_notice_gets_no_answer_and_is_applied_first(self) -> None:
        """After a register (answered) and an unregister notice, the next answer is the
        count's, and it sees the session gone: the master wrote nothing for the notice."""
        service = StateService(60, "a", clock=Clock())
        master_end, worker_end = socket.socketpair()
        service.attach(master_end)
        reader, writer = await asyncio.open_unix_connection(sock=worker_end)
        try:
            e = '{"id":"s1","user":"alice","node":"a","rip":"192.0.2.1","since":1.0,'
            e += '"tls":false,"mechanism":"PLAIN"}'
            reply = await _raw_call(
                reader, writer, f'[1,"register",{{"entry":{e},"max_user":0,"max_userip":0}}]'
            )
            assert "[1,[true,0,0]]" == reply
            data = b'[0,"unregister",{"id":"s1"}]'
            writer.write(len(data).to_bytes(4, "big") + data)
            reply = await _raw_call(
                reader, writer, '[2,"count",{"user":"alice","rip":"192.0.2.1"}]'
            )
            assert "[2,[0,0]]" == reply
        finally:
            writer.close()
            await service.aclose()

    async def test_bad_notice_is_logged_and_the_link_goes_on(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A notice the master cannot apply is logged there; the worker's calls go on."""
        workers = Workers()
        try:
            state = workers.connect(60, Clock())
            await state.notify("nope")
            assert [0] == await RemoteFailureCounters(state).counts(["ip:a"])
            assert any("bad state call" in r.getMessage() for r in caplog.records)
        finally:
            await workers.aclose()

    async def test_clear_and_unregister_are_notices_seen_by_the_next_call(self) -> None:
        """Through the worker's own objects: what a notice did shows in the very next call,
        of this worker and (once the master read it) of another."""
        workers = Workers()
        try:
            state = workers.connect(60, Clock())
            counters = RemoteFailureCounters(state)
            registry = RemoteSessionRegistry(state, "a")
            await counters.add(["ip:a"])
            await counters.clear(["ip:a"])
            assert [0] == await counters.counts(["ip:a"])
            await registry.register(entry("s1"), max_user=1, max_userip=0)
            await registry.unregister("s1")
            assert (0, 0) == await registry.count("alice", "192.0.2.1")
            other = RemoteSessionRegistry(workers.connect(60, Clock()), "a")
            assert (await other.register(entry("s2"), max_user=1, max_userip=0)).admitted
        finally:
            await workers.aclose()

    async def test_notice_to_a_gone_master_fails_cleanly(self) -> None:
        """A notice the master cannot receive raises StateUnavailable, as a call does."""
        master_end, worker_end = socket.socketpair()
        lost: list[bool] = []
        state = RemoteState(worker_end, on_lost=lambda: lost.append(True))
        await state.start()
        master_end.close()
        while not lost:
            await asyncio.sleep(0.01)
        with pytest.raises(StateUnavailable):
            await RemoteSessionRegistry(state, "a").unregister("s1")
        await state.aclose()


async def _frame(reader: asyncio.StreamReader) -> bytes:
    """Read one framed message (failing, not hanging, if none comes)."""
    async with asyncio.timeout(30):
        return await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))


def _framed(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(4, "big") + m for m in messages)


class TestFailingKeys:
    """A worker's record of the keys its master said failed: a superset, bounded."""

    def test_kept_a_window_after_the_last_push(self) -> None:
        """A key may have failures until window seconds after its last push, not longer."""
        clock = Clock()
        failing = FailingKeys(60, clock=clock)
        failing.add(["ip:a"])
        clock.now += 50
        failing.add(["ip:a"])
        clock.now += 59
        assert failing.any(["ip:b", "ip:a"])
        clock.now += 1
        assert not failing.any(["ip:a"])

    def test_expired_keys_swept_by_pushes(self) -> None:
        """A push drops the expired keys at the old end: the record does not grow for ever."""
        clock = Clock()
        failing = FailingKeys(60, clock=clock)
        failing.add(["ip:a", "ip:b"])
        clock.now += 60
        failing.add(["ip:c"])
        assert 1 == len(failing)

    def test_oldest_pushed_dropped_beyond_max_entries(self) -> None:
        """Beyond max_entries the least recently pushed go first, as the master forgets them."""
        failing = FailingKeys(60, max_entries=2, clock=Clock())
        for key in ("ip:1", "ip:2", "ip:1", "ip:3"):
            failing.add([key])
        assert (True, False, True) == (
            failing.any(["ip:1"]),
            failing.any(["ip:2"]),
            failing.any(["ip:3"]),
        )

    def test_discard(self) -> None:
        """discard() forgets the keys given and leaves the others."""
        failing = FailingKeys(60, clock=Clock())
        failing.add(["ip:a", "ip:b"])
        failing.discard(["ip:a", "ip:never"])
        assert (False, True) == (failing.any(["ip:a"]), failing.any(["ip:b"]))


class TestRemoteFailureCountersAskOnlyWhenFailing:
    """A worker asks its master for counts only of keys the master said failed."""

    async def test_no_failure_no_round_trip(self) -> None:
        """After the first count (which subscribes), counts of keys that never failed are
        answered without a round trip."""
        workers = Workers()
        try:
            state = workers.connect(60, Clock())
            counters = RemoteFailureCounters(state)
            assert [0] == await counters.counts(["ip:a"])
            calls = state.calls
            for _ in range(3):
                assert [0, 0] == await counters.counts(["ip:a", "ip:b"])
            assert calls == state.calls
        finally:
            await workers.aclose()

    async def test_failure_at_another_worker_is_asked(self) -> None:
        """A failure counted through one worker is asked for by the other at its next count;
        other keys still need no round trip."""
        workers = Workers()
        try:
            one = RemoteFailureCounters(workers.connect(60, Clock()))
            two_state = workers.connect(60, Clock())
            two = RemoteFailureCounters(two_state)
            assert [0] == await two.counts(["ip:a"])
            assert [1] == await one.add(["ip:a"])
            assert [1] == await two.counts(["ip:a"])
            calls = two_state.calls
            assert [0] == await two.counts(["ip:b"])
            assert calls == two_state.calls
        finally:
            await workers.aclose()

    async def test_late_subscriber_sees_earlier_failures(self) -> None:
        """A worker started after failures were counted (a restart) learns of them."""
        workers = Workers()
        try:
            one = RemoteFailureCounters(workers.connect(60, Clock()))
            await one.add(["ip:a", "user:b"])
            two = RemoteFailureCounters(workers.connect(60, Clock()))
            assert [1, 1, 0] == await two.counts(["ip:a", "user:b", "ip:c"])
        finally:
            await workers.aclose()

    async def test_count_gone_to_zero_is_forgotten(self) -> None:
        """Once the master says a key's count is gone (window passed, or cleared), the
        worker stops asking about it."""
        clock = Clock()
        workers = Workers()
        try:
            state = workers.connect(60, clock)
            counters = RemoteFailureCounters(state)
            await counters.add(["ip:a"])
            assert [1] == await counters.counts(["ip:a"])
            clock.now += 60
            assert [0] == await counters.counts(["ip:a"])
            calls = state.calls
            assert [0] == await counters.counts(["ip:a"])
            assert calls == state.calls
        finally:
            await workers.aclose()

    async def test_master_pushes_before_answering_the_add(self) -> None:
        """On the wire: a subscribed worker is told of an add before the adder's answer is
        written; the subscription lists the live keys, with the window."""
        clock = Clock()
        service = StateService(60, "a", clock=clock)
        ends = [socket.socketpair() for _ in range(2)]
        for master_end, _ in ends:
            service.attach(master_end)
        (r1, w1), (r2, w2) = [await asyncio.open_unix_connection(sock=e) for _, e in ends]
        try:
            assert "[1,[1]]" == await _raw_call(r2, w2, '[1,"add",{"keys":["ip:old"]}]')
            clock.now += 30
            assert "[2,[1]]" == await _raw_call(r2, w2, '[2,"add",{"keys":["ip:new"]}]')
            clock.now += 30  # ip:old expired, and no add since swept it
            assert '[1,[60,["ip:new"]]]' == await _raw_call(r1, w1, '[1,"failing",{}]')
            reply = await _raw_call(r2, w2, '[3,"add",{"keys":["ip:a","user:b"]}]')
            assert "[3,[1,1]]" == reply
            assert b'[0,["failing",["ip:a","user:b"]]]' == await _frame(r1)
        finally:
            w1.close()
            w2.close()
            await service.aclose()

    async def test_push_behind_the_subscription_is_kept(self) -> None:
        """A failure pushed right behind the answer that subscribes is not lost."""
        master_end, worker_end = socket.socketpair()
        state = RemoteState(worker_end)
        counters = RemoteFailureCounters(state)
        reader, writer = await asyncio.open_unix_connection(sock=master_end)
        try:
            first = asyncio.ensure_future(counters.counts(["ip:b"]))
            assert b'[1,"failing",{}]' == await _frame(reader)
            writer.write(_framed(b"[1,[60,[]]]", b'[0,["failing",["ip:a"]]]'))
            assert [0] == await first
            second = asyncio.ensure_future(counters.counts(["ip:a"]))
            assert b'[2,"counts",{"keys":["ip:a"]}]' == await _frame(reader)
            writer.write(_framed(b"[2,[1]]"))
            assert [1] == await second
        finally:
            await state.aclose()
            writer.close()

    async def test_push_behind_a_zero_count_keeps_the_key(self) -> None:
        """A count of 0 followed at once by a push of that key (a newer failure) leaves the
        key asked for."""
        master_end, worker_end = socket.socketpair()
        state = RemoteState(worker_end)
        counters = RemoteFailureCounters(state)
        reader, writer = await asyncio.open_unix_connection(sock=master_end)
        try:
            first = asyncio.ensure_future(counters.counts(["ip:a"]))
            await _frame(reader)
            writer.write(_framed(b'[1,[60,["ip:a"]]]'))
            await _frame(reader)
            writer.write(_framed(b"[2,[0]]", b'[0,["failing",["ip:a"]]]'))
            assert [0] == await first
            assert counters.failing is not None
            assert counters.failing.any(["ip:a"])
        finally:
            await state.aclose()
            writer.close()
