"""State that every session of a server shares, and later every node of a cluster.

The interfaces are in :mod:`pobox.state.base`; :mod:`pobox.state.memory` is the in-process
backend (one node); :mod:`pobox.state.postgres` the one every node of a cluster shares
(imported only when used: it needs psycopg); :mod:`pobox.state.remote` the master's memory
reached by its worker processes (``workers``).  All pass one contract suite
(``tests/state/test_contract.py``).
"""

from __future__ import annotations

from pobox.state.base import (
    Admission,
    DownloadCounters,
    FailureCounters,
    LoginTimes,
    SessionEntry,
    SessionRegistry,
    StateUnavailable,
)
from pobox.state.memory import (
    MemoryDownloadCounters,
    MemoryFailureCounters,
    MemoryLoginTimes,
    MemorySessionRegistry,
)

__all__ = [
    "Admission",
    "DownloadCounters",
    "FailureCounters",
    "LoginTimes",
    "MemoryDownloadCounters",
    "MemoryFailureCounters",
    "MemoryLoginTimes",
    "MemorySessionRegistry",
    "SessionEntry",
    "SessionRegistry",
    "StateUnavailable",
]
