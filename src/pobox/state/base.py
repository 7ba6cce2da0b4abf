"""The interfaces of shared state: what the policies (the login throttle) read and write.

:class:`FailureCounters` counts failed logins per key (``ip:203.0.113.7``, ``user:alice``).  A
count starts with a key's first failure and is forgotten ``window`` seconds later, by the
backend itself: nobody has to sweep.  A backend keeps its memory (or table) bounded whatever
the keys an attacker makes up: when it must forget early, it forgets the keys idle longest,
which only ever makes the policy more lenient, never refuses anyone wrongly.

Every method takes several keys at once, so that a backend over the network (PostgreSQL)
answers a login's questions in one round trip.  The methods are ``async`` for that backend;
the memory one never suspends.

May import: the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["FailureCounters"]


class FailureCounters(Protocol):
    """Failed-login counts per key, each forgotten ``window`` seconds after its first failure."""

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order."""

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys``."""
