"""The interfaces of shared state: what the policies (the login throttle, the per-user
connection limits) read and write, on one node or on every node of a cluster.

:class:`FailureCounters` counts failed logins per key (``ip:203.0.113.7``, ``user:alice``).  A
count starts with a key's first failure and is forgotten ``window`` seconds later, by the
backend itself: nobody has to sweep.  A backend keeps its memory (or table) bounded whatever
the keys an attacker makes up: when it must forget early, it forgets the keys idle longest,
which only ever makes the policy more lenient, never refuses anyone wrongly.

:class:`SessionRegistry` knows who is logged in where: one :class:`SessionEntry` per POP3
session after login, on every node.  It counts a user's sessions for the connection limits
(and admits a session in the same step), lists them for the ops tooling, and carries kick
requests to the node that owns a session, which sees them at its next
:meth:`~SessionRegistry.heartbeat`.  Each node renews a lease with that heartbeat; the
sessions of a node whose lease ran out (it died) are ignored at once and purged later, so
nothing has to clean up after a crash.

:class:`DownloadCounters` counts the octets of mail each user has downloaded (RETR and TOP)
today, a UTC day (``pop3_daily_download_bytes``).  A charge is checked and added in one step,
so two sessions of one user on two nodes cannot both pass the cap; the count of a day is
replaced by the next day's first charge (one entry per user, nothing to sweep).

:class:`LoginTimes` remembers when each user last logged in, for RFC 2449 LOGIN-DELAY
(``pop3_login_delay``): a login is checked and recorded in one step, so two logins of one
user on two nodes cannot both pass within the delay (one entry per user, nothing to sweep).

Every method answers in one round trip for a backend over the network (PostgreSQL): the
methods take several keys at once, and the registry admits and counts in one call.  The
methods are ``async`` for that backend; the memory ones never suspend.  A backend that cannot
answer raises :class:`StateUnavailable`; the shell then falls back to per-node state
(the fallback wrappers in :mod:`pobox.server._cluster`).

May import: the standard library and :mod:`pobox.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pobox.errors import PoboxError

__all__ = [
    "Admission",
    "CheckingRegistry",
    "DownloadCounters",
    "FailureCounters",
    "LoginTimes",
    "SessionEntry",
    "SessionRegistry",
    "StateUnavailable",
    "utc_day",
]


class StateUnavailable(PoboxError):
    """The shared state store did not answer (down, slow, or refusing)."""


class FailureCounters(Protocol):
    """Failed-login counts per key, each forgotten ``window`` seconds after its first failure."""

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order."""

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys``."""


#: Seconds in a UTC day: the download counters reset at 00:00 UTC.
DAY: Final = 86_400


def utc_day(now: float) -> int:
    """Return the number of the UTC day ``now`` (seconds since the epoch) falls in."""
    return int(now // DAY)


class DownloadCounters(Protocol):
    """Octets of mail downloaded per user on the current UTC day."""

    async def charge(self, user: str, octets: int, limit: int) -> bool:
        """Add ``octets`` to ``user``'s count of today if it stays within ``limit``; say if so.

        ``octets`` <= 0 (a refund of octets charged but not sent) is always applied, and a
        count never goes below 0.  ``limit`` 0 is no limit.
        """

    async def used(self, user: str) -> int:
        """Return the octets ``user`` has been charged today (0 when none)."""


class LoginTimes(Protocol):
    """When each user last logged in, for RFC 2449 §6.5 LOGIN-DELAY."""

    async def admit(self, user: str, delay: float) -> bool:
        """Record a login of ``user`` now unless their last one is under ``delay`` s ago.

        Returns:
            whether the login was recorded (``False``: too soon, nothing recorded, so a
            client retrying early does not push its wait further out).
        """


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One logged-in POP3 session, as the registry lists it.

    Attributes:
        id: the session id of the logs (``session=<...>``), unique in the cluster.
        user: the user name logged in.
        node: the ``node_name`` of the node serving it.
        rip: the real client address (from the PROXY header behind HAProxy).
        since: when the login succeeded, in seconds since the epoch.
        tls: whether the session is encrypted (STLS, implicit TLS, or TLS at HAProxy).
        mechanism: how the user logged in (``PLAIN``, ``USER``, ``APOP``, ``SCRAM-SHA-256``...).
    """

    id: str
    user: str
    node: str
    rip: str
    since: float
    tls: bool
    mechanism: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`SessionRegistry.register` decided.

    Attributes:
        admitted: whether the session was registered (within both limits).
        user_sessions: the user's other live sessions, on every node, before this one.
        userip_sessions: those of them from the same client address.
        failures: the failed logins of the client's address, when the registration checked
            them (:meth:`CheckingRegistry.register_checked`); ``None`` when it did not.
    """

    admitted: bool
    user_sessions: int
    userip_sessions: int
    failures: int | None = None


class SessionRegistry(Protocol):
    """Who is logged in where, across the nodes of a cluster (or on this one node).

    A registry object belongs to one node (:attr:`node`): it registers that node's sessions
    and renews that node's lease.  Listing and kicking reach every node.
    """

    @property
    def node(self) -> str:
        """The name of the node this registry object registers for."""

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        """Register ``entry`` if the user's live sessions leave room; say what was found.

        ``max_user`` limits the user's sessions from anywhere, ``max_userip`` those from
        ``entry.rip`` (0: no limit); the new session counts toward both.  Concurrent
        registrations on several nodes may both get in (lenient, never refusing wrongly).
        """

    async def unregister(self, session_id: str) -> None:
        """Forget a session that ended (nothing if it is not registered)."""

    async def sessions(self, user: str | None = None) -> list[SessionEntry]:
        """Return the live sessions of every node (of ``user`` only, if given), oldest first."""

    async def count(self, user: str, rip: str) -> tuple[int, int]:
        """Return the live sessions of ``user``, and of ``user`` from ``rip``, on every node."""

    async def kick(self, *, user: str | None = None, session_id: str | None = None) -> int:
        """Ask the owning nodes to end the sessions of ``user`` or the one ``session_id``.

        Returns:
            how many live sessions were asked to end.
        """

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        """Renew this node's lease; return the ids of its sessions that were asked to end.

        ``live`` is the ids of this node's sessions still registered as far as the node
        knows: the registry forgets any other session of this node (one whose unregister
        got lost, or one of an earlier run of a node of the same name).  The sessions of
        nodes whose lease ran out are purged.
        """


class CheckingRegistry(Protocol):
    """A registry that can check the throttle's failure count in the registration itself.

    Where the failure counters and the registry share a store over the network
    (PostgreSQL), the login throttle's check of the client's address costs no round trip of
    its own: it is made by the statement that registers the session (see
    :mod:`pobox.server._throttle`).
    """

    async def register_checked(
        self,
        entry: SessionEntry,
        *,
        max_user: int,
        max_userip: int,
        failure_key: str,
        max_failures: int,
    ) -> Admission:
        """Register ``entry`` as ``register`` does, unless the failure counter of
        ``failure_key`` has reached ``max_failures`` (0: no limit).

        Returns:
            the admission, with the failures found (``None``: not checked after all, the
            caller checks them itself).
        """
