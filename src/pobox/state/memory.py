"""Failure counters and the session registry in this process's memory: one node's state.

An :class:`~collections.OrderedDict` of ``key → (first failure, count)`` in the order of the
last update.  Each operation is O(1) amortised: a read drops its key once the window has
passed, and each :meth:`MemoryFailureCounters.add` drops the expired entries it finds at the
old end, and the oldest entries beyond ``max_entries``, so the dict neither grows without
bound nor keeps dead entries for long.

The session registry (:class:`MemorySessionRegistry`) is a dict of this node's sessions.

May import: the standard library and :mod:`pobox.state.base`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from pobox.state.base import Admission, SessionEntry, utc_day

__all__ = [
    "MAX_ENTRIES",
    "MemoryDownloadCounters",
    "MemoryFailureCounters",
    "MemoryLoginTimes",
    "MemorySessionRegistry",
]

#: Keys remembered at most; an entry is about 200 bytes, so 200,000 keys are some 40 MB.
MAX_ENTRIES: Final = 200_000

#: Expired entries dropped from the old end per add, at most: a bounded step each time.
_SWEEP: Final = 4


class MemoryFailureCounters:
    """A :class:`~pobox.state.base.FailureCounters` in memory.

    Args:
        window: seconds a key's count lives after its first failure.
        max_entries: keys remembered at most; the least recently failed go first.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        window: float,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are held now (expired ones may linger until touched or swept)."""
        return len(self._data)

    def _count(self, key: str, now: float) -> int:
        entry = self._data.get(key)
        if entry is None:
            return 0
        if now - entry[0] >= self.window:
            del self._data[key]
            return 0
        return entry[1]

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order."""
        if not self._data:  # the usual case on a quiet server: nothing to look up
            return [0] * len(keys)
        now = self._clock()
        return [self._count(key, now) for key in keys]

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""
        now = self._clock()
        data = self._data
        out = []
        for key in keys:
            count = self._count(key, now) + 1
            first = data[key][0] if count > 1 else now
            data[key] = (first, count)
            data.move_to_end(key)
            out.append(count)
        for _ in range(_SWEEP):
            oldest = next(iter(data.values()), None)
            if oldest is None or now - oldest[0] < self.window:
                break
            data.popitem(last=False)
        while len(data) > self.max_entries:
            data.popitem(last=False)
        return out

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys``."""
        for key in keys:
            self._data.pop(key, None)

    def failing(self) -> list[str]:
        """Return the keys whose count is live, least recently failed first (the order in
        which :meth:`add` forgets them beyond ``max_entries``)."""
        now = self._clock()
        return [key for key, (first, _) in self._data.items() if now - first < self.window]


class MemoryDownloadCounters:
    """A :class:`~pobox.state.base.DownloadCounters` in memory: ``user → (day, octets)``.

    One entry per user who downloaded something (users who logged in: not a stranger's
    choice); entries of past days are dropped when the dict passes ``max_entries``.

    Args:
        clock: the wall clock, seconds since the epoch (injectable for tests).
    """

    def __init__(
        self, *, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: dict[str, tuple[int, int]] = {}

    def _today(self, user: str, day: int) -> int:
        entry = self._data.get(user)
        return entry[1] if entry is not None and entry[0] == day else 0

    async def charge(self, user: str, octets: int, limit: int) -> bool:
        """Add ``octets`` to ``user``'s count of today if it stays within ``limit``; say if so."""
        day = utc_day(self._clock())
        used = self._today(user, day)
        if octets > 0 and limit and used + octets > limit:
            return False
        self._data[user] = (day, max(used + octets, 0))
        if len(self._data) > self.max_entries:
            self._data = {u: e for u, e in self._data.items() if e[0] == day}
        return True

    async def used(self, user: str) -> int:
        """Return the octets ``user`` has been charged today."""
        return self._today(user, utc_day(self._clock()))


class MemoryLoginTimes:
    """A :class:`~pobox.state.base.LoginTimes` in memory: ``user → last login``.

    One entry per user who logged in (past the password: not a stranger's choice); beyond
    ``max_entries`` the users who logged in longest ago are forgotten, which only lets a
    login in sooner, never refuses one wrongly.

    Args:
        clock: the wall clock, seconds since the epoch (injectable for tests).
    """

    def __init__(
        self, *, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, float] = OrderedDict()

    async def admit(self, user: str, delay: float) -> bool:
        """Record a login of ``user`` now unless their last one is under ``delay`` s ago."""
        now = self._clock()
        last = self._data.get(user)
        # A last login in the future (the clock was set back) does not lock the user out.
        if last is not None and now - delay < last <= now:
            return False
        self._data[user] = now
        self._data.move_to_end(user)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return True


class MemorySessionRegistry:
    """A :class:`~pobox.state.base.SessionRegistry` in memory: the sessions of one node.

    Bounded by the node's own connection caps (``max_connections``): an entry exists only
    between a login and the end of its session.  Counting a user's sessions walks that
    user's entries only (an index by user name).

    Args:
        node: this node's name.
    """

    def __init__(self, node: str) -> None:
        self._node = node
        self._entries: dict[str, SessionEntry] = {}
        self._by_user: dict[str, set[str]] = {}
        self._kicked: set[str] = set()

    @property
    def node(self) -> str:
        """The name of this node."""
        return self._node

    def __len__(self) -> int:
        """How many sessions are registered now."""
        return len(self._entries)

    def _count(self, user: str, rip: str) -> tuple[int, int]:
        ids = self._by_user.get(user, ())
        return len(ids), sum(1 for i in ids if self._entries[i].rip == rip)

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        """Register ``entry`` if the user's sessions leave room; say what was found."""
        per_user, per_userip = self._count(entry.user, entry.rip)
        admitted = (not max_user or per_user < max_user) and (
            not max_userip or per_userip < max_userip
        )
        if admitted:
            self._forget(entry.id)
            self._entries[entry.id] = entry
            self._by_user.setdefault(entry.user, set()).add(entry.id)
        return Admission(admitted, per_user, per_userip)

    def _forget(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        self._kicked.discard(session_id)
        if entry is not None:
            ids = self._by_user[entry.user]
            ids.discard(session_id)
            if not ids:
                del self._by_user[entry.user]

    async def unregister(self, session_id: str) -> None:
        """Forget a session that ended."""
        self._forget(session_id)

    async def sessions(self, user: str | None = None) -> list[SessionEntry]:
        """Return the sessions (of ``user`` only, if given), oldest first."""
        ids = self._entries if user is None else self._by_user.get(user, ())
        return sorted((self._entries[i] for i in ids), key=lambda e: (e.since, e.id))

    async def count(self, user: str, rip: str) -> tuple[int, int]:
        """Return the sessions of ``user``, and of ``user`` from ``rip``."""
        return self._count(user, rip)

    async def kick(self, *, user: str | None = None, session_id: str | None = None) -> int:
        """Mark the sessions of ``user``, or the one ``session_id``, to be ended."""
        if session_id is not None:
            ids: set[str] = {session_id} if session_id in self._entries else set()
            if user is not None:
                ids = {i for i in ids if self._entries[i].user == user}
        elif user is not None:
            ids = set(self._by_user.get(user, ()))
        else:
            ids = set()
        self._kicked |= ids
        return len(ids)

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        """Forget sessions not in ``live``; return those asked to end."""
        keep = set(live)
        for gone in [i for i in self._entries if i not in keep]:
            self._forget(gone)
        return sorted(self._kicked)
