"""Failure counters in this process's memory: one node's shared state.

An :class:`~collections.OrderedDict` of ``key → (first failure, count)`` in the order of the
last update.  Each operation is O(1) amortised: a read drops its key once the window has
passed, and each :meth:`MemoryFailureCounters.add` drops the expired entries it finds at the
old end, and the oldest entries beyond ``max_entries``, so the dict neither grows without
bound nor keeps dead entries for long.

May import: the standard library and :mod:`pobox.state.base`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

__all__ = ["MAX_ENTRIES", "MemoryFailureCounters"]

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
