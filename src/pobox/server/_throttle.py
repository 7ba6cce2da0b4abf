"""Brute-force defence: remember failed logins per source address and per user, in memory.

A failed login waits ``auth_failure_delay`` seconds, doubled for each earlier failure from
the same address still remembered, up to ``auth_failure_delay_max`` (Dovecot's
``auth_failure_delay`` grows the same way with its penalty table).  More than
``auth_failures_per_ip`` failures from one address, or ``auth_failures_per_user`` for one user,
within ``auth_failure_window`` seconds block further logins from that address / as that user
until the window has passed since the first of them: the client gets ``-ERR [LOGIN-DELAY]``.

State is two LRU-bounded dicts of ``key → (first failure time, count)``: every operation is
O(1) and memory stays bounded whatever an attacker does (the oldest entries are forgotten
first, which only ever makes the defence more lenient, never blocks anyone wrongly).

May import: the standard library only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["LoginThrottle"]

#: Addresses and users remembered each; 100k entries is a few tens of MB at most.
MAX_ENTRIES: Final = 100_000


class _Counter:
    """Failures per key within a window, LRU-bounded."""

    def __init__(self, window: float, limit: int, max_entries: int) -> None:
        self.window = window
        self.limit = limit
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def count(self, key: str, now: float) -> int:
        entry = self._data.get(key)
        if entry is None:
            return 0
        if now - entry[0] >= self.window:
            del self._data[key]
            return 0
        return entry[1]

    def add(self, key: str, now: float) -> int:
        count = self.count(key, now) + 1
        first = self._data[key][0] if count > 1 else now
        self._data[key] = (first, count)
        self._data.move_to_end(key)
        if len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return count

    def clear(self, key: str) -> None:
        self._data.pop(key, None)


class LoginThrottle:
    """Failed-login bookkeeping shared by all sessions of a server.

    Args:
        delay: the delay after a first failure, in seconds.
        delay_max: the cap of the growing delay.
        per_ip, per_user: failures within ``window`` after which logins are refused.
        window: seconds a failure is remembered.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        *,
        delay: float,
        delay_max: float,
        per_ip: int,
        per_user: int,
        window: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.delay = delay
        self.delay_max = max(delay, delay_max)
        self._ips = _Counter(window, per_ip, max_entries)
        self._users = _Counter(window, per_user, max_entries)
        self._clock = clock

    def blocked(self, ip: str, user: str | None) -> bool:
        """Return whether logins from ``ip`` (as ``user``, if known) are refused for now."""
        now = self._clock()
        if self._ips.count(ip, now) >= self._ips.limit:
            return True
        return user is not None and self._users.count(user, now) >= self._users.limit

    def failed(self, ip: str, user: str | None) -> float:
        """Record a failed login; return the seconds to wait before answering it."""
        now = self._clock()
        count = self._ips.add(ip, now)
        if user is not None:
            self._users.add(user, now)
        return float(min(self.delay * (1 << min(count - 1, 32)), self.delay_max))

    def succeeded(self, ip: str, user: str) -> None:
        """Forget the failures of an address and user that just logged in."""
        self._ips.clear(ip)
        self._users.clear(user)
