"""State that every session of a server shares, and later every node of a cluster.

The interfaces are in :mod:`pobox.state.base`; :mod:`pobox.state.memory` is the in-process
backend (one node).  A PostgreSQL backend for several nodes (issue 12) implements the same
interfaces and passes the same contract suite (``tests/state/test_contract.py``).
"""

from __future__ import annotations

from pobox.state.base import FailureCounters
from pobox.state.memory import MemoryFailureCounters

__all__ = ["FailureCounters", "MemoryFailureCounters"]
