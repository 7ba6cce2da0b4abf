"""The node's side of shared state: the fallback to memory, the heartbeat, kicks, limits.

A store that is down is a real backend of the interfaces whose every call raises
:class:`~pobox.state.base.StateUnavailable` (as the PostgreSQL one does when it cannot
answer); clocks are moved by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import string
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest

from pobox.cli import build_shared_state
from pobox.config import Config, build_config, shared_state_backend
from pobox.errors import ConfigError
from pobox.records import User
from pobox.server._cluster import (
    Cluster,
    FallbackFailureCounters,
    FallbackRegistry,
    StoreHealth,
)
from pobox.server._session import session_id
from pobox.state import (
    Admission,
    MemoryFailureCounters,
    MemorySessionRegistry,
    SessionEntry,
    StateUnavailable,
)
from pobox.storage.base import DeleteResult, MailUser
from pobox.storage.memory import MemoryMaildrop, MemoryStore
from pobox.testing import running_server
from tests.integration.wire import Wire


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class DownCounters:
    """Failure counters whose store is down (or up again, when ``down`` is cleared)."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0
        self.up = MemoryFailureCounters(60)

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StateUnavailable("shared state counts: connection refused")

    async def counts(self, keys: Sequence[str]) -> list[int]:
        self._check()
        return await self.up.counts(keys)

    async def add(self, keys: Sequence[str]) -> list[int]:
        self._check()
        return await self.up.add(keys)

    async def clear(self, keys: Sequence[str]) -> None:
        self._check()
        await self.up.clear(keys)


class DownRegistry(MemorySessionRegistry):
    """A registry whose store is down: every call fails."""

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        raise StateUnavailable("down")

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        raise StateUnavailable("down")


def entry(sid: str, rip: str = "192.0.2.1") -> SessionEntry:
    """A session of alice."""
    return SessionEntry(sid, "alice", "a", rip, 0.0, tls=False, mechanism="PLAIN")


class TestFallback:
    """A store that fails: memory answers, the store is left alone a while, one log line."""

    async def test_memory_answers_and_store_rests(self, caplog: pytest.LogCaptureFixture) -> None:
        """While down, calls are answered from memory; the store is asked again after
        retry_after, and its recovery ends the episode; one line each."""
        caplog.set_level(logging.INFO, logger="pobox.cluster")
        clock = Clock()
        shared = DownCounters()
        counters = FallbackFailureCounters(
            shared, MemoryFailureCounters(60), StoreHealth(5.0, clock)
        )
        assert [1] == await counters.add(["ip:a"])
        assert [2] == await counters.add(["ip:a"])
        assert [2] == await counters.counts(["ip:a"])
        assert 1 == shared.calls  # asked once, then left alone
        clock.now += 5
        assert [3] == await counters.add(["ip:a"])
        assert 2 == shared.calls
        shared.down = False
        clock.now += 5
        assert [1] == await counters.add(["ip:a"])  # the store's own count
        messages = [r.getMessage() for r in caplog.records]
        assert 1 == sum("shared state unavailable" in m for m in messages)
        assert 1 == sum("available again (4 calls answered from memory" in m for m in messages)

    async def test_registry_falls_back_and_unregisters_in_memory(self) -> None:
        """A session registered in memory during an outage is unregistered there."""
        local = MemorySessionRegistry("a")
        registry = FallbackRegistry(DownRegistry("a"), local, StoreHealth(5.0, Clock()))
        assert (await registry.register(entry("s1"), max_user=0, max_userip=1)).admitted
        assert not (await registry.register(entry("s2"), max_user=0, max_userip=1)).admitted
        assert ["s1"] == [e.id for e in await local.sessions()]
        await registry.unregister("s1")
        assert [] == await local.sessions()

    async def test_kicks_of_memory_sessions_survive_a_failed_heartbeat(self) -> None:
        """A kick of a session registered in memory is returned even while the store fails."""
        registry = FallbackRegistry(
            DownRegistry("a"), MemorySessionRegistry("a"), StoreHealth(5.0, Clock())
        )
        await registry.register(entry("s1"), max_user=0, max_userip=0)
        assert 1 == await registry.kick(user="alice")
        assert ["s1"] == await registry.heartbeat(["s1"])


class TestCluster:
    """Admission texts, kicks delivered by the heartbeat, release."""

    async def test_refusal_names_the_limit(self) -> None:
        """Over mail_max_userip_connections the text names it; over the user limit, that."""
        cluster = Cluster(MemorySessionRegistry("a"), heartbeat=5, max_user=2, max_userip=1)
        assert (await cluster.admit(entry("s1"), lambda: None))[1] is None
        by_ip = (await cluster.admit(entry("s2"), lambda: None))[1]
        assert (await cluster.admit(entry("s3", rip="192.0.2.2"), lambda: None))[1] is None
        by_user = (await cluster.admit(entry("s4", rip="192.0.2.3"), lambda: None))[1]
        assert (
            "Maximum number of connections from user+IP exceeded (mail_max_userip_connections=1)"
        ) == by_ip
        assert (
            "Maximum number of connections from user exceeded (mail_max_user_connections=2)"
        ) == by_user

    async def test_beat_delivers_kicks_and_release_unregisters(self) -> None:
        """A kicked session's callback runs at the next beat; a released one is forgotten."""
        registry = MemorySessionRegistry("a")
        cluster = Cluster(registry, heartbeat=5, max_user=0, max_userip=0)
        kicked: list[str] = []
        await cluster.admit(entry("s1"), lambda: kicked.append("s1"))
        await cluster.admit(entry("s2"), lambda: kicked.append("s2"))
        await registry.kick(session_id="s2")
        await cluster.beat()
        assert ["s2"] == kicked
        await cluster.release("s2")
        assert ["s1"] == [e.id for e in await registry.sessions()]


class SlowAnswerRegistry(MemorySessionRegistry):
    """A registry whose register is done at once but answered only when ``answer`` is set
    (a round trip's reply still on the wire)."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.answer = asyncio.Event()

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        admission = await super().register(entry, max_user=max_user, max_userip=max_userip)
        await self.answer.wait()
        return admission


class TestHeartbeatRace:
    """A heartbeat that overtakes a registration's answer does not forget that session."""

    async def test_session_registered_during_a_beat_stays(self) -> None:
        """The row inserted while its answer is on the way survives the beat: limits, kicks."""
        registry = SlowAnswerRegistry("a")
        cluster = Cluster(registry, heartbeat=5, max_user=0, max_userip=0)
        admitting = asyncio.create_task(cluster.admit(entry("s1"), lambda: None))
        while not len(registry):
            await asyncio.sleep(0)
        await cluster.beat()
        registry.answer.set()
        await admitting
        assert ["s1"] == [e.id for e in await registry.sessions()]


class TakenRegistry(MemorySessionRegistry):
    """A registry whose store says another live process renews this node's lease."""

    name_taken = True


class TestNameTaken:
    """A node_name used by two live processes is logged, once."""

    async def test_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """Every beat sees the clash; the error is logged at the first only."""
        cluster = Cluster(TakenRegistry("a"), heartbeat=5, max_user=0, max_userip=0)
        for _ in range(3):
            await cluster.beat()
        errors = [r for r in caplog.records if "renews the lease of node a" in r.getMessage()]
        assert 1 == len(errors)


class SkewedRegistry(MemorySessionRegistry):
    """A registry whose store's clock differs from this node's by ``clock_skew`` seconds."""

    clock_skew: float | None = 30.0


class TestClockSkew:
    """A node clock away from the database's is logged once, and its return once."""

    async def test_logged_once_then_back(self, caplog: pytest.LogCaptureFixture) -> None:
        """Three beats 30 s off give one error; back within a second, one warning."""
        registry = SkewedRegistry("a")
        cluster = Cluster(registry, heartbeat=5, max_user=0, max_userip=0)
        for _ in range(3):
            await cluster.beat()
        registry.clock_skew = -0.2
        await cluster.beat()
        await cluster.beat()
        messages = [r.getMessage() for r in caplog.records]
        assert (1, 1) == (
            sum("clock is 30.0 s behind the shared state database's" in m for m in messages),
            sum("agrees with the database's again" in m for m in messages),
        )

    async def test_fallback_passes_the_skew_on(self) -> None:
        """The fallback registry shows the shared store's measure."""
        registry = FallbackRegistry(
            SkewedRegistry("a"), MemorySessionRegistry("a"), StoreHealth(5.0, Clock())
        )
        assert 30.0 == registry.clock_skew


class TestConfig:
    """The shared-state keys: validated, and auto resolved from the store and userdb."""

    def test_auto(self) -> None:
        """auto is postgresql with mail or users in PostgreSQL, else memory."""
        assert "memory" == shared_state_backend(Config())
        assert "postgresql" == shared_state_backend(Config(mail_location="postgresql"))
        assert "postgresql" == shared_state_backend(Config(userdb="postgresql"))
        assert "memory" == shared_state_backend(
            Config(mail_location="postgresql", shared_state="memory")
        )

    @pytest.mark.parametrize(
        ("values", "key"),
        [
            ({"shared_state": "redis"}, "shared_state"),
            ({"shared_state_timeout": 0}, "shared_state_timeout"),
            ({"shared_state_heartbeat": -1}, "shared_state_heartbeat"),
            ({"mail_max_userip_connections": -1}, "mail_max_userip_connections"),
            ({"mail_max_user_connections": -2}, "mail_max_user_connections"),
            ({"node_name": "a b"}, "node_name"),
        ],
    )
    def test_bad_values_name_the_key(self, values: dict[str, object], key: str) -> None:
        """A bad value is refused at start-up with the key's name."""
        with pytest.raises(ConfigError, match=f"^{key}:"):
            build_config(values)

    async def test_memory_backends_for_one_node(self) -> None:
        """shared_state = memory: memory counters and a memory registry named node_name."""
        counters, cluster = build_shared_state(Config(node_name="n1"))
        assert isinstance(counters, MemoryFailureCounters)
        assert isinstance(cluster.registry, MemorySessionRegistry)
        assert "n1" == cluster.node


class TestSessionIds:
    """Session ids, the registry's keys, are unique across forked processes too."""

    def test_forked_child_draws_its_own(self) -> None:
        """A child forked with random bytes pooled does not hand out the parent's next id."""
        session_id()  # the pool is filled
        read, write = os.pipe()
        with warnings.catch_warnings():  # 3.12+ warns of fork with threads; the child execs nothing
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: report its next id, and leave at once
            os.write(write, session_id().encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            child = pipe.read().decode()
        assert session_id() != child

    def test_never_an_option(self) -> None:
        """No id starts with "-" (``pobox kick ID`` would read it as an option), all are 12
        URL-safe characters, and the first character still takes 63 values."""
        ids = [session_id() for _ in range(20_000)]
        assert not [i for i in ids if i.startswith("-")]
        alphabet = set(string.ascii_letters + string.digits + "-_")
        assert all(len(i) == 12 and set(i) <= alphabet for i in ids)
        assert 63 == len({i[0] for i in ids})
        assert len(set(ids)) == len(ids)


class GatedStore(MemoryStore):
    """The real memory store, whose UPDATEs wait at ``gate`` once they have begun."""

    def __init__(self) -> None:
        super().__init__()
        self.deleting = asyncio.Event()
        self.gate = asyncio.Event()

    async def open(self, user: MailUser, *, lock: bool = True) -> MemoryMaildrop:
        drop = await super().open(user, lock=lock)
        delete = drop.delete

        async def gated(keys: Sequence[str]) -> DeleteResult:
            self.deleting.set()
            await self.gate.wait()
            return await delete(keys)

        drop.delete = gated  # type: ignore[method-assign]
        return drop


class TestKickDuringUpdate:
    """A kick, or the drain's deadline, while a session's UPDATE is under way lets it finish."""

    @pytest.mark.parametrize("how", ["kick", "drain deadline"])
    async def test_update_finishes_and_is_acknowledged(self, tmp_path: Path, how: str) -> None:
        """QUIT's UPDATE, interrupted midway, still deletes what was marked and answers +OK."""
        store = GatedStore()
        for n in range(3):
            store.add("alice", b"Subject: %d\r\n\r\nbody\r\n" % n)
        async with running_server(tmp_path, store=store) as node:
            cluster = node.server.ctx.cluster
            assert cluster is not None
            wire = await Wire.connect(node.host, node.port)
            await wire.login()
            await wire.command(b"DELE 1")
            await wire.command(b"DELE 2")
            await wire.send(b"QUIT\r\n")
            await asyncio.wait_for(store.deleting.wait(), 10)
            if how == "kick":
                kicked = await cluster.registry.kick(user="alice")
                await cluster.beat()
            else:
                kicked = 1
                node.server.stop_sessions()
            store.gate.set()
            answer = await wire.read_all()
            left = (await store.open(User("alice"), lock=False)).messages
        assert (1, b"+OK", 1) == (kicked, answer[:3], len(left))
