"""The failed-login throttle, with an injected clock (no sleeping, no timed assertions)."""

from __future__ import annotations

from pobox.server._throttle import LoginThrottle


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock: Clock, **kwargs: float) -> LoginThrottle:
    """A throttle with small limits."""
    settings: dict[str, float] = {
        "delay": 1.0,
        "delay_max": 5.0,
        "per_ip": 3,
        "per_user": 4,
        "window": 60.0,
    }
    settings.update(kwargs)
    return LoginThrottle(
        delay=settings["delay"],
        delay_max=settings["delay_max"],
        per_ip=int(settings["per_ip"]),
        per_user=int(settings["per_user"]),
        window=settings["window"],
        max_entries=int(kwargs.get("max_entries", 100)),
        clock=clock,
    )


class TestLoginThrottle:
    """LoginThrottle."""

    def test_delay_doubles_up_to_the_cap(self):
        """Each failure from an address doubles the delay, up to delay_max."""
        t = throttle(Clock(), per_ip=100)

        assert [1.0, 2.0, 4.0, 5.0, 5.0] == [t.failed("10.0.0.1", "tim") for _ in range(5)]

    def test_other_address_not_delayed_more(self):
        """The delay grows per address: another address starts at the base delay."""
        t = throttle(Clock())
        t.failed("10.0.0.1", "tim")
        t.failed("10.0.0.1", "tim")

        assert 1.0 == t.failed("10.0.0.2", "bob")

    def test_blocked_by_address(self):
        """After per_ip failures the address is blocked, whoever it claims to be."""
        t = throttle(Clock())
        for _ in range(3):
            assert not t.blocked("10.0.0.1", "tim")
            t.failed("10.0.0.1", "tim")

        assert t.blocked("10.0.0.1", "someone-else")
        assert not t.blocked("10.0.0.2", "someone-else")

    def test_blocked_by_user(self):
        """After per_user failures from many addresses the user is blocked."""
        t = throttle(Clock())
        for i in range(4):
            t.failed(f"10.0.0.{i}", "tim")

        assert t.blocked("10.9.9.9", "tim")
        assert not t.blocked("10.9.9.9", "bob")

    def test_window_passes(self):
        """Once the window has passed since the first failure the block lifts."""
        clock = Clock()
        t = throttle(clock)
        for _ in range(3):
            t.failed("10.0.0.1", "tim")
        clock.now += 60

        assert not t.blocked("10.0.0.1", "tim")
        assert 1.0 == t.failed("10.0.0.1", "tim")

    def test_success_forgets(self):
        """A successful login clears the address's and the user's failures."""
        t = throttle(Clock())
        t.failed("10.0.0.1", "tim")
        t.failed("10.0.0.1", "tim")
        t.succeeded("10.0.0.1", "tim")

        assert 1.0 == t.failed("10.0.0.1", "tim")

    def test_bounded(self):
        """At most max_entries addresses are remembered; the oldest go first."""
        t = throttle(Clock(), per_ip=1, max_entries=2)
        t.failed("10.0.0.1", None)
        t.failed("10.0.0.2", None)
        t.failed("10.0.0.3", None)

        assert [False, True, True] == [t.blocked(f"10.0.0.{i}", None) for i in (1, 2, 3)]
