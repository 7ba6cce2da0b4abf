"""The node's side of cluster-wide state: falling back when the store is slow, the heartbeat,
kicks, and the per-user connection limits.

Falling back
------------
The shared store (PostgreSQL) answers each call within ``shared_state_timeout`` or raises
:class:`~pobox.state.base.StateUnavailable`.  :class:`FallbackFailureCounters` and
:class:`FallbackRegistry` then answer that call from this node's memory, and keep doing so
without asking the store for :data:`RETRY_AFTER` seconds (a login must not wait for a dead
store every time); the heartbeat asks it meanwhile and ends the episode as soon as it
answers.  One warning when an episode begins and one line when it ends, whatever the logins
in between (:class:`StoreHealth`).  In an episode the limits and the throttle are per node:
lenient, never refusing anyone the shared state would admit... except those already over
the per-node limits.

Kicks
-----
:class:`Cluster` renews the node's lease every ``shared_state_heartbeat`` seconds with
:meth:`~pobox.state.base.SessionRegistry.heartbeat`, which also returns the sessions of this
node someone asked to end; each is ended by :meth:`pobox.server.Session.kick` at once: its
wait for the client is cut short, it answers ``-ERR [SYS/TEMP]`` and closes without UPDATE.
``pobox kick`` (:mod:`pobox.server._control`) marks sessions in the registry, and ends
those of this process at once (:meth:`Cluster.kick_here`) rather than at the next beat.

May import: the standard library, :mod:`pobox.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, TypeVar

from pobox.state.base import (
    Admission,
    DownloadCounters,
    FailureCounters,
    LoginTimes,
    SessionEntry,
    SessionRegistry,
    StateUnavailable,
)
from pobox.state.memory import MemoryDownloadCounters, MemoryLoginTimes

__all__ = [
    "LEASE_BEATS",
    "RETRY_AFTER",
    "THROTTLED",
    "Cluster",
    "FallbackFailureCounters",
    "FallbackRegistry",
    "StoreHealth",
]

logger = logging.getLogger("pobox.cluster")

_T = TypeVar("_T")

#: Seconds the shared store is left alone after it failed a call (the heartbeat still asks).
RETRY_AFTER: Final = 5.0
#: Heartbeats a node's lease lasts: a node that missed this many is dead to the others.
LEASE_BEATS: Final = 3
#: Seconds of difference from the store's clock that are logged as an error (or the
#: heartbeat, if longer): NTP keeps clocks within milliseconds.
MAX_SKEW: Final = 2.0
#: The refusal of :meth:`Cluster.admit` when the client's address has too many failures.
THROTTLED: Final = "Too many failed logins, try again later."
#: Heartbeats between two upkeeps of the shared store (expired rows, dead nodes).
UPKEEP_EVERY: Final = 12


class StoreHealth:
    """Whether the shared store is worth asking now; logs once per episode of failure.

    Args:
        retry_after: seconds to answer from memory after a failure, before asking again.
        clock: a monotonic clock.
    """

    def __init__(
        self, retry_after: float = RETRY_AFTER, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.retry_after = retry_after
        self._clock = clock
        self._down_until: float | None = None
        #: Calls answered from memory in the current episode.
        self.fallbacks = 0

    @property
    def down(self) -> bool:
        """Whether an episode of failure is under way."""
        return self._down_until is not None

    def usable(self) -> bool:
        """Whether to ask the shared store now."""
        return self._down_until is None or self._clock() >= self._down_until

    def failed(self, exc: StateUnavailable) -> None:
        """Note that the store failed a call; begin an episode (logged) if none is under way."""
        if self._down_until is None:
            logger.warning(
                "master: shared state unavailable (%s); using this node's memory until it "
                "answers again",
                exc,
            )
            self.fallbacks = 0
        self._down_until = self._clock() + self.retry_after

    def answered(self) -> None:
        """Note that the store answered; end the episode (logged) if one is under way."""
        if self._down_until is not None:
            logger.warning(
                "master: shared state available again (%d calls answered from memory meanwhile)",
                self.fallbacks,
            )
            self._down_until = None


class FallbackFailureCounters:
    """Failure counters in the shared store, or in this node's memory while it fails.

    Counts made in memory during an episode stay there (and are read there only then): the
    throttle is per node for that time, which only makes it lenient.
    """

    def __init__(
        self, shared: FailureCounters, local: FailureCounters, health: StoreHealth
    ) -> None:
        self.shared = shared
        self.local = local
        self.health = health

    async def _call(
        self,
        shared: Callable[[], Awaitable[list[int]]],
        local: Callable[[], Awaitable[list[int]]],
    ) -> list[int]:
        if self.health.usable():
            try:
                result = await shared()
            except StateUnavailable as exc:
                self.health.failed(exc)
            else:
                self.health.answered()
                return result
        self.health.fallbacks += 1
        return await local()

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order."""
        return await self._call(lambda: self.shared.counts(keys), lambda: self.local.counts(keys))

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""
        return await self._call(lambda: self.shared.add(keys), lambda: self.local.add(keys))

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys`` (in memory too)."""

        async def shared() -> list[int]:
            await self.shared.clear(keys)
            return []

        async def local() -> list[int]:
            return []

        await self.local.clear(keys)
        await self._call(shared, local)


class FallbackRegistry:
    """A session registry in the shared store, or in this node's memory while it fails.

    A session registered in memory (during an episode) is unregistered there; the shared
    store forgets one whose unregister failed at this node's next heartbeat.
    """

    def __init__(
        self, shared: SessionRegistry, local: SessionRegistry, health: StoreHealth
    ) -> None:
        self.shared = shared
        self.local = local
        self.health = health
        self._in_memory: set[str] = set()

    @property
    def node(self) -> str:
        """The name of this node."""
        return self.shared.node

    async def _try(self, call: Callable[[], Awaitable[_T]]) -> tuple[bool, _T | None]:
        if not self.health.usable():
            self.health.fallbacks += 1
            return False, None
        try:
            result = await call()
        except StateUnavailable as exc:
            self.health.failed(exc)
            self.health.fallbacks += 1
            return False, None
        self.health.answered()
        return True, result

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        """Register ``entry`` in the shared store, or in memory if it fails."""
        ok, admission = await self._try(
            lambda: self.shared.register(entry, max_user=max_user, max_userip=max_userip)
        )
        if ok and admission is not None:
            return admission
        return await self._register_locally(entry, max_user, max_userip)

    @property
    def checks_failures(self) -> bool:
        """Whether :meth:`register_checked` checks the failures now (the store is asked)."""
        return callable(getattr(self.shared, "register_checked", None)) and self.health.usable()

    async def register_checked(
        self,
        entry: SessionEntry,
        *,
        max_user: int,
        max_userip: int,
        failure_key: str,
        max_failures: int,
    ) -> Admission:
        """Register ``entry`` checking the failures in the shared store; in memory if it fails.

        Registered in memory, the admission says no failures were checked (``None``).
        """
        check = getattr(self.shared, "register_checked", None)
        if check is None:
            return await self.register(entry, max_user=max_user, max_userip=max_userip)
        ok, admission = await self._try(
            lambda: check(
                entry,
                max_user=max_user,
                max_userip=max_userip,
                failure_key=failure_key,
                max_failures=max_failures,
            )
        )
        if ok and isinstance(admission, Admission):
            return admission
        return await self._register_locally(entry, max_user, max_userip)

    async def _register_locally(
        self, entry: SessionEntry, max_user: int, max_userip: int
    ) -> Admission:
        """Register ``entry`` in this node's memory (the shared store failed)."""
        admission = await self.local.register(entry, max_user=max_user, max_userip=max_userip)
        if admission.admitted:
            self._in_memory.add(entry.id)
        return admission

    async def unregister(self, session_id: str) -> None:
        """Forget a session that ended, where it was registered."""
        if session_id in self._in_memory:
            self._in_memory.discard(session_id)
            await self.local.unregister(session_id)
            return
        await self._try(lambda: self.shared.unregister(session_id))

    async def sessions(self, user: str | None = None) -> list[SessionEntry]:
        """Return the sessions of every node (of this one only while the store fails)."""
        ok, found = await self._try(lambda: self.shared.sessions(user))
        mine = await self.local.sessions(user)
        return sorted([*(found or []), *mine], key=lambda e: (e.since, e.id)) if ok else mine

    async def count(self, user: str, rip: str) -> tuple[int, int]:
        """Return the live sessions of ``user`` (and from ``rip``), in the store and in memory."""
        ok, found = await self._try(lambda: self.shared.count(user, rip))
        mine = await self.local.count(user, rip)
        return (found[0] + mine[0], found[1] + mine[1]) if ok and found else mine

    async def kick(self, *, user: str | None = None, session_id: str | None = None) -> int:
        """Ask for the sessions to be ended, in the store and in memory."""
        mine = await self.local.kick(user=user, session_id=session_id)
        _, found = await self._try(lambda: self.shared.kick(user=user, session_id=session_id))
        return mine + (found or 0)

    @property
    def name_taken(self) -> bool:
        """Whether the store saw another live process renew this node's lease."""
        return bool(getattr(self.shared, "name_taken", False))

    @property
    def clock_skew(self) -> float | None:
        """The store's clock minus this node's at the last heartbeat, if the store says."""
        skew = getattr(self.shared, "clock_skew", None)
        return skew if isinstance(skew, float) else None

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        """Renew the lease (asking the store even in an episode: it ends one); return kicks.

        Raises:
            StateUnavailable: the store failed (the episode goes on; memory kicks are lost
                for this beat only).
        """
        kicked = await self.local.heartbeat([i for i in live if i in self._in_memory])
        try:
            found = await self.shared.heartbeat([i for i in live if i not in self._in_memory])
        except StateUnavailable as exc:
            self.health.failed(exc)
            return kicked
        self.health.answered()
        return sorted({*kicked, *found})


class Cluster:
    """This node in the cluster: its sessions in the registry, the heartbeat, kicks, limits.

    Args:
        registry: the session registry (shared, with a fallback; or memory on one node).
        heartbeat: seconds between heartbeats (the lease is :data:`LEASE_BEATS` of them).
        max_user: ``mail_max_user_connections`` (0: no limit).
        max_userip: ``mail_max_userip_connections`` (0: no limit).
        upkeep: work to do every :data:`UPKEEP_EVERY` heartbeats (the store's expiry and
            bounds); its :class:`StateUnavailable` is ignored.
        on_close: what releases the store's resources (a connection pool), at :meth:`aclose`.
        store: where the shared state is, for the log (``memory``, ``postgresql``).
        check: checks the store's schema (raising :class:`~pobox.errors.PoboxError`).
        report: with each heartbeat, tells the master (``workers`` > 1) the octets each of
            this process's sessions has sent, for ``pobox who``; its
            :class:`StateUnavailable` is ignored.
        downloads: the daily download counters (default: this process's memory).
        logins: the users' last login times, for LOGIN-DELAY (default: this process's
            memory).
    """

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        heartbeat: float,
        max_user: int,
        max_userip: int,
        upkeep: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        store: str = "memory",
        check: Callable[[], Awaitable[None]] | None = None,
        report: Callable[[dict[str, int]], Awaitable[object]] | None = None,
        downloads: DownloadCounters | None = None,
        logins: LoginTimes | None = None,
    ) -> None:
        self.registry = registry
        #: The octets each user downloaded today (``pop3_daily_download_bytes``), as shared
        #: as the registry: this process, the master, or PostgreSQL.
        self.downloads: DownloadCounters = downloads or MemoryDownloadCounters()
        #: When each user last logged in (``pop3_login_delay``), shared as the downloads are.
        self.logins: LoginTimes = logins or MemoryLoginTimes()
        self.heartbeat = heartbeat
        self.max_user = max_user
        self.max_userip = max_userip
        self._upkeep = upkeep
        self._on_close = on_close
        self.store = store
        self._check = check
        #: Session id → the callable that ends that session (its kick).
        self.live: dict[str, Callable[[], None]] = {}
        #: Session id → the octets of mail it has sent so far (RETR and TOP), for ``who``.
        self.sent: dict[str, Callable[[], int]] = {}
        self._report = report
        #: Sessions whose registration is under way: the heartbeat names them live too, or
        #: one that overtook a registration's answer would forget the row just inserted.
        self._admitting: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        #: Heartbeats made so far.
        self.beats = 0
        self._name_taken = False
        self._skewed = False

    @property
    def node(self) -> str:
        """This node's name."""
        return self.registry.node

    @property
    def checks_failures(self) -> bool:
        """Whether :meth:`admit` can check the throttle's failures in the registration."""
        return bool(getattr(self.registry, "checks_failures", False))

    async def admit(
        self,
        entry: SessionEntry,
        kick: Callable[[], None],
        sent: Callable[[], int] | None = None,
        failures: tuple[str, int] | None = None,
    ) -> tuple[Admission, str | None]:
        """Register a session that just logged in, within the limits.

        ``sent`` counts the octets of mail the session has sent (``pobox who``).
        ``failures``: the client address's key in the failure counters and the failures at
        which it is refused, for a registry that checks them in the registration
        (:attr:`checks_failures`); the admission then says the failures found.

        Returns:
            the admission, and the text of the refusal if it was not admitted
            (:data:`THROTTLED` when the failures refused it).
        """
        self._admitting.add(entry.id)
        check = getattr(self.registry, "register_checked", None)
        try:
            if failures is not None and check is not None:
                admission: Admission = await check(
                    entry,
                    max_user=self.max_user,
                    max_userip=self.max_userip,
                    failure_key=failures[0],
                    max_failures=failures[1],
                )
            else:
                admission = await self.registry.register(
                    entry, max_user=self.max_user, max_userip=self.max_userip
                )
        finally:
            self._admitting.discard(entry.id)
        if (
            failures is not None
            and admission.failures is not None
            and failures[1]
            and admission.failures >= failures[1]
        ):
            return admission, THROTTLED
        if not admission.admitted:
            if self.max_userip and admission.userip_sessions >= self.max_userip:
                return admission, (
                    "Maximum number of connections from user+IP exceeded "
                    f"(mail_max_userip_connections={self.max_userip})"
                )
            return admission, (
                "Maximum number of connections from user exceeded "
                f"(mail_max_user_connections={self.max_user})"
            )
        self.live[entry.id] = kick
        if sent is not None:
            self.sent[entry.id] = sent
        return admission, None

    def octets(self) -> dict[str, int]:
        """Return the octets of mail each live session of this process has sent."""
        return {session_id: count() for session_id, count in self.sent.items()}

    def kick_here(self, session_ids: Iterable[str]) -> int:
        """End at once those of ``session_ids`` that this process serves; return how many."""
        ended = 0
        for session_id in session_ids:
            kick = self.live.get(session_id)
            if kick is not None:
                kick()
                ended += 1
        return ended

    async def release(self, session_id: str) -> None:
        """Unregister a session that ended (a failure is left to the next heartbeat)."""
        self.sent.pop(session_id, None)
        if self.live.pop(session_id, None) is not None:
            with contextlib.suppress(StateUnavailable):
                await self.registry.unregister(session_id)

    async def beat(self) -> None:
        """Renew the lease and end the sessions kicked; every so often, the upkeep."""
        self.beats += 1
        try:
            kicked = await self.registry.heartbeat([*self.live, *self._admitting])
        except StateUnavailable as exc:
            logger.debug("master: heartbeat failed: %s", exc)
            kicked = []
        self.kick_here(kicked)
        if self._report is not None:
            try:
                await self._report(self.octets())
            except StateUnavailable as exc:
                logger.debug("master: reporting the sessions' octets failed: %s", exc)
        taken = bool(getattr(self.registry, "name_taken", False))
        if taken and not self._name_taken:
            logger.error(
                "master: another live pobox renews the lease of node %s: give each node its "
                "own node_name (each would forget the other's sessions)",
                self.node,
            )
        self._name_taken = taken
        self._check_skew(getattr(self.registry, "clock_skew", None))
        if self._upkeep is not None and self.beats % UPKEEP_EVERY == 1:
            try:
                await self._upkeep()
            except StateUnavailable as exc:
                logger.debug("master: shared state upkeep failed: %s", exc)

    def _check_skew(self, skew: object) -> None:
        """Log (once, until it is fixed) a clock that differs from the store's.

        Times in the store (leases, failure windows) come from each node's clock: a node
        behind by more than a lease looks dead to the others (its sessions escape limits and
        kicks, and are purged), one ahead keeps its failure counts alive longer.
        """
        if not isinstance(skew, float):
            return
        off = abs(skew) > max(MAX_SKEW, self.heartbeat)
        if off and not self._skewed:
            logger.error(
                "master: this node's clock is %.1f s %s the shared state database's: run NTP "
                "on every node (leases and failure windows use the nodes' clocks)",
                abs(skew),
                "behind" if skew > 0 else "ahead of",
            )
        elif self._skewed and not off:
            logger.warning("master: this node's clock agrees with the database's again")
        self._skewed = off

    async def check_schema(self) -> None:
        """Refuse a store whose schema this pobox does not know; serve on if it is down.

        Raises:
            pobox.errors.PoboxError: the schema is missing, older or newer (saying what to run).
        """
        if self._check is None:
            return
        try:
            await self._check()
        except StateUnavailable as exc:
            logger.warning(
                "master: cannot check the shared state's schema now (%s); this node uses its "
                "memory until the store answers",
                exc,
            )

    async def start(self) -> None:
        """Register the node (the first heartbeat), then beat in the background."""
        logger.info(
            "master: node %s, shared state in %s, heartbeat every %gs, "
            "mail_max_userip_connections=%d, mail_max_user_connections=%d",
            self.node,
            self.store,
            self.heartbeat,
            self.max_userip,
            self.max_user,
        )
        await self.beat()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.beat()
            except Exception:
                logger.exception("master: heartbeat failed")

    async def aclose(self) -> None:
        """Stop beating and release the store (the sessions have unregistered themselves)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._on_close is not None:
            close, self._on_close = self._on_close, None
            await close()
