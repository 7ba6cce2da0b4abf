"""The failed-login policy over real memory counters, with an injected clock (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from pobox.server._throttle import LoginThrottle
from pobox.state import MemoryFailureCounters
from pobox.state.postgres import PostgresFailureCounters, PostgresState
from tests.state.test_contract import Clock


def throttle(clock: Clock, **kwargs: float) -> LoginThrottle:
    """A throttle with small limits: 3 failures per address, 4 per user, 60 s window."""
    settings: dict[str, float] = {"delay": 1.0, "delay_max": 5.0, "per_ip": 3, "per_user": 4}
    settings.update(kwargs)
    return LoginThrottle(
        MemoryFailureCounters(60.0, clock=clock),
        delay=settings["delay"],
        delay_max=settings["delay_max"],
        per_ip=int(settings["per_ip"]),
        per_user=int(settings["per_user"]),
    )


async def refused(t: LoginThrottle, ip: str) -> bool:
    """Whether a login from ``ip`` is refused now."""
    return t.refuses(await t.failures(ip))


class TestDelay:
    """How long a failure waits."""

    async def test_delay_doubles_up_to_the_cap(self) -> None:
        """Each failure from an address doubles the delay, up to delay_max."""
        t = throttle(Clock(), per_ip=100, per_user=100)
        assert [1.0, 2.0, 4.0, 5.0, 5.0] == [await t.failed("10.0.0.1", "tim") for _ in range(5)]

    async def test_other_address_starts_low(self) -> None:
        """The delay grows per address: another address starts at the base delay."""
        t = throttle(Clock())
        await t.failed("10.0.0.1", "tim")
        await t.failed("10.0.0.1", "tim")
        assert 1.0 == await t.failed("10.0.0.2", "bob")

    async def test_user_under_attack_waits_the_cap(self) -> None:
        """Once a user name has per_user failures, its failures wait delay_max, from anywhere."""
        t = throttle(Clock())
        for i in range(3):
            assert 1.0 == await t.failed(f"10.0.0.{i}", "tim")
        assert 5.0 == await t.failed("10.0.0.9", "tim")
        assert 1.0 == await t.failed("10.0.0.8", "bob")

    async def test_no_delay_configured(self) -> None:
        """With delay 0 nothing waits, not even a user under attack."""
        t = throttle(Clock(), delay=0.0)
        assert [0.0] * 6 == [await t.failed("10.0.0.1", "tim") for _ in range(6)]


class TestRefusal:
    """Who is refused: the failing address, never a user as such."""

    async def test_failing_address_refused(self) -> None:
        """After per_ip failures the address is refused, whoever it claims to be."""
        t = throttle(Clock())
        for _ in range(3):
            assert not await refused(t, "10.0.0.1")
            await t.failed("10.0.0.1", "tim")
        assert await refused(t, "10.0.0.1")
        assert not await refused(t, "10.0.0.2")

    async def test_user_never_locked_out(self) -> None:
        """However many strangers fail as tim, tim's clean address is not refused."""
        t = throttle(Clock())
        for i in range(100):
            await t.failed(f"10.0.{i}.1", "tim")
        assert not await refused(t, "192.0.2.7")

    async def test_window_passes(self) -> None:
        """Once the window has passed since the first failure the refusal lifts."""
        clock = Clock()
        t = throttle(clock)
        for _ in range(3):
            await t.failed("10.0.0.1", "tim")
        clock.now += 60
        assert not await refused(t, "10.0.0.1")
        assert 1.0 == await t.failed("10.0.0.1", "tim")

    async def test_success_forgets_the_address(self) -> None:
        """A login forgets its address's failures, not the user name's."""
        t = throttle(Clock(), per_user=3)
        await t.failed("10.0.0.1", "tim")
        await t.failed("10.0.0.2", "tim")
        await t.succeeded("10.0.0.1", await t.failures("10.0.0.1"))
        assert 0 == await t.failures("10.0.0.1")
        assert 5.0 == await t.failed("10.0.0.3", "tim")


class TestAddressGroups:
    """Failures are counted per IPv6 /64: one attacker's network is one address."""

    async def test_slash_64_refused_as_one(self) -> None:
        """Failures from many addresses of one /64 refuse the whole /64, not another one."""
        t = throttle(Clock(), per_user=100)
        for n in range(1, 4):
            await t.failed(f"2001:db8:0:1::{n:x}", None)
        assert (True, False) == (
            await refused(t, "2001:db8:0:1:abcd::9"),
            await refused(t, "2001:db8:0:2::1"),
        )

    async def test_delay_grows_across_the_slash_64(self) -> None:
        """The delay doubles for each failure from the /64, whichever address it came from."""
        t = throttle(Clock(), per_ip=100, per_user=100)
        delays = [await t.failed(f"2001:db8::{n:x}", None) for n in range(1, 4)]
        assert [1.0, 2.0, 4.0] == delays

    async def test_ipv4_mapped_is_the_ipv4_address(self) -> None:
        """An IPv4-mapped address counts with its IPv4 address, and apart from other ones."""
        t = throttle(Clock(), per_user=100)
        for _ in range(3):
            await t.failed("::ffff:192.0.2.7", None)
        assert (True, False) == (
            await refused(t, "192.0.2.7"),
            await refused(t, "::ffff:192.0.2.8"),
        )


class KeyRecorder(MemoryFailureCounters):
    """Real memory counters that also remember every key they were handed."""

    def __init__(self, window: float, clock: Clock) -> None:
        super().__init__(window, clock=clock)
        self.keys: set[str] = set()

    async def add(self, keys: Sequence[str]) -> list[int]:
        self.keys.update(keys)
        return await super().add(keys)


#: What a stranger can name: 6 KiB of random text through AUTH PLAIN/LOGIN (8 KiB of base64),
#: NUL and controls through AUTH LOGIN.
_RANDOM = random.Random(7)
HOSTILE_NAMES = [
    "".join(chr(_RANDOM.randrange(0x4E00, 0x9FFF)) for _ in range(2000)),
    "tim\x00root",
    "a\r\nb\x1b[2J",
    "user#" + "0" * 32,
]


class TestUserKeys:
    """A user name a stranger makes up costs the counters a small, printable key."""

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    async def test_keys_are_small_and_printable(self, name: str) -> None:
        """Whatever the name, each key is at most 72 octets of printable text without NUL."""
        counters = KeyRecorder(60.0, Clock())
        t = LoginThrottle(counters, delay=1.0, delay_max=5.0, per_ip=3, per_user=4)
        await t.failed("10.0.0.1", name)
        assert [] == [k for k in counters.keys if len(k.encode()) > 72 or not k.isprintable()]

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    async def test_long_name_still_counts_as_one(self, name: str) -> None:
        """A long or odd name's failures still add up under one key (the user delay)."""
        t = throttle(Clock())
        delays = [await t.failed(f"10.0.0.{i}", name) for i in range(4)]
        assert [1.0, 1.0, 1.0, 5.0] == delays
        assert 1.0 == await t.failed("10.0.0.9", name[:-1] + "?")

    async def test_short_names_stay_readable(self) -> None:
        """An ordinary name is counted under ``user:`` and the name itself."""
        counters = KeyRecorder(60.0, Clock())
        t = LoginThrottle(counters, delay=1.0, delay_max=5.0, per_ip=3, per_user=4)
        await t.failed("10.0.0.1", "alice@example.org")
        assert {"ip:10.0.0.1", "user:alice@example.org"} == counters.keys

    @pytest.mark.parametrize("name", HOSTILE_NAMES)
    async def test_postgres_takes_any_name(self, pg_dsn: str, name: str) -> None:
        """Shared counters in PostgreSQL count any name (no index-row or NUL error)."""
        state = PostgresState(pg_dsn, timeout=5, clock=Clock())
        try:
            counters = PostgresFailureCounters(state, 60.0)
            t = LoginThrottle(counters, delay=1.0, delay_max=5.0, per_ip=9, per_user=3)
            delays = [await t.failed(f"10.0.0.{i}", name) for i in range(3)]
        finally:
            await state.aclose()
        assert [1.0, 1.0, 5.0] == delays


class TestSuspects:
    """What this node remembers of failing addresses: when to ask before the password."""

    async def test_suspect_for_the_window_after_a_failure(self) -> None:
        """An address that failed here is suspect (its /64 too) until the window has passed;
        one that never failed is not."""
        clock = Clock()
        counters = MemoryFailureCounters(60.0, clock=clock)
        t = LoginThrottle(
            counters, delay=1.0, delay_max=5.0, per_ip=3, per_user=4, window=60.0, clock=clock
        )
        await t.failed("2001:db8::1", "tim")
        during = [t.suspect("2001:db8::2"), t.suspect("10.0.0.1")]
        clock.now += 60
        assert ([True, False], False) == (during, t.suspect("2001:db8::1"))

    async def test_success_or_a_clean_count_forgets_it(self) -> None:
        """A login that succeeded, or counters found empty, make the address unsuspected;
        failures found (by the registration) make it suspect."""
        clock = Clock()
        counters = MemoryFailureCounters(60.0, clock=clock)
        t = LoginThrottle(
            counters, delay=1.0, delay_max=5.0, per_ip=3, per_user=4, window=60.0, clock=clock
        )
        await t.failed("10.0.0.1", "tim")
        await t.succeeded("10.0.0.1", await t.failures("10.0.0.1"))
        after_success = t.suspect("10.0.0.1")
        t.found("10.0.0.2", 2)
        found = t.suspect("10.0.0.2")
        assert [0] == await counters.counts(["ip:10.0.0.2"])
        await t.failures("10.0.0.2")
        assert (False, True, False) == (after_success, found, t.suspect("10.0.0.2"))
