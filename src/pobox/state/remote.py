"""One node's memory state, held by the master and reached by its workers over a socket.

With ``workers`` > 1 and ``shared_state = memory``, the failure counters and the session
registry must be one for the whole node, or each worker would throttle and limit on its own
(an attacker spreading guesses over the workers would get N times the allowance).  The master
holds the memory backends (:class:`StateService`) and each worker reaches them over its own
Unix socketpair, through :class:`RemoteFailureCounters` and :class:`RemoteSessionRegistry`:
the same interfaces (:mod:`pobox.state.base`) and the same contract suite as the other
backends.

Theory of operation
-------------------
Each message is a 4-byte big-endian length and a JSON array: ``[id, op, args]`` from the
worker, ``[id, result]`` or ``[id, null, error]`` back.  A worker's calls are answered in
order, one connection per worker, so one slow worker never delays another's answers beyond
the master's own loop.  The memory backends never suspend, so the master answers each call
in one step.

The calls whose result is nothing (``unregister``, ``clear``, ``octets``) are *notices*:
id ``0``, no answer (:meth:`RemoteState.notify`), so a POP3 login costs the worker two round
trips (the throttle's count before the password check, the registration after it) and one
message, not three round trips.  Nothing is lost by not waiting: the master applies a
worker's messages in the order they were written, so any later call of the same worker (a
``count``, a ``register``) sees the notice applied; and a notice is written before the
reply that ends the session, so a client that logs in again at once, through another
worker, does so after the master has the notice in its socket buffer (the event loop
handles ready sockets in the order they became ready).  A notice that fails on the master
is logged there; one the master cannot receive (it is gone) raises
:class:`~pobox.state.base.StateUnavailable` at once, as a call does.

A login asks the throttle for its address's failures before the password is checked, and
on a healthy server the answer is nearly always none: so a worker does not ask the master
while the master has said of no key it asks about that it failed.  Its first ``counts``
subscribes it (``failing``: the window, and the keys whose count is live); from then on, the
master pushes each ``add``'s keys to every subscribed worker, ``[0, ["failing", keys]]``,
before it answers that ``add``.  The worker's :class:`FailingKeys` is thus a superset of the
keys the master counts: a key is dropped only when a count the worker asked says ``0`` (and
no push came in between), when ``window`` has passed since its last push (a count lives
``window`` from its *first* failure), or beyond :data:`~pobox.state.memory.MAX_ENTRIES`,
oldest push first, which is the order in which the master forgets them too.  A failure at
one worker therefore reaches the others before its client hears the ``-ERR`` (the push is
in their socket buffers before the ``add`` is answered, and the answer waits
``auth_failure_delay``): a login that follows a failure, on any worker, asks the master as
before.  Only logins already under way while a failure is being counted miss it, as they
did when every login asked (their ``counts`` could be answered before that ``add``
arrived).  So a login costs one round trip to the master, ``register``, and a notice.

The session registry of one node forgets, at a heartbeat, the sessions the node no longer
has.  With several workers each heartbeat lists only that worker's sessions, so the service
keeps each worker's own set: a heartbeat replaces the set of its worker, and the registry is
told the union of every worker's.  A worker that goes away takes its sessions with it.
With each heartbeat a worker also reports the octets its sessions have sent (``octets``),
which the master's control socket shows in ``pobox who``.  The one message the master sends
unasked is ``[0, ["kick", ids]]`` (:meth:`StateService.push_kicks`, id 0 is never a call's):
``pobox kick`` ends a worker's sessions at once rather than at its next heartbeat, which
still carries the kick if this message is lost.

A worker whose master is gone sees the end of its connection (:attr:`RemoteState.on_lost`):
it stops, so that its listeners and maildrop locks are freed with the master.

May import: the standard library and :mod:`pobox.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from pobox.state.base import Admission, SessionEntry, StateUnavailable
from pobox.state.memory import (
    MAX_ENTRIES,
    MemoryDownloadCounters,
    MemoryFailureCounters,
    MemoryLoginTimes,
    MemorySessionRegistry,
)

__all__ = [
    "FailingKeys",
    "RemoteDownloadCounters",
    "RemoteFailureCounters",
    "RemoteLoginTimes",
    "RemoteSessionRegistry",
    "RemoteState",
    "StateService",
]

logger = logging.getLogger("pobox.state.remote")

#: The largest message either side accepts: a heartbeat lists a worker's sessions, at most
#: ``max_connections`` ids of 22 characters; 16 MiB leaves room for 500,000.
MAX_MESSAGE: Final = 16 * 1024 * 1024

_LENGTH: Final = struct.Struct(">I")


def _encode(message: list[Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> list[Any] | None:
    """Return the next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_MESSAGE:
        msg = f"state message of {size} bytes"
        raise ValueError(msg)
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        return None
    message = json.loads(data)
    if not isinstance(message, list):
        msg = "state message is not a list"
        raise TypeError(msg)
    return message


class StateService:
    """The node's memory state, answering its workers (in the master).

    Args:
        window: ``auth_failure_window``, the life of a failure count.
        node: this node's name.
        clock: the failure counters' monotonic clock (injectable for tests).
        wall_clock: the download counters' clock, seconds since the epoch (for tests).
    """

    def __init__(
        self,
        window: float,
        node: str,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.counters = (
            MemoryFailureCounters(window)
            if clock is None
            else MemoryFailureCounters(window, clock=clock)
        )
        self.registry = MemorySessionRegistry(node)
        self.downloads = MemoryDownloadCounters(clock=wall_clock)
        self.logins = MemoryLoginTimes(clock=wall_clock)
        #: Called with ``(index, pid)`` when a worker says it serves (``ready``).
        self.on_ready: Callable[[int, int], None] | None = None
        self._live: dict[int, set[str]] = {}
        #: Each worker's sessions → octets of mail sent, as of its last heartbeat.
        self._octets: dict[int, dict[str, int]] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        #: The workers told of each failure (those that asked ``failing``).
        self._subscribed: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next = 0

    def octets(self) -> dict[str, int]:
        """Return the octets of mail each worker's sessions had sent at its last heartbeat."""
        out: dict[str, int] = {}
        for sent in self._octets.values():
            out.update(sent)
        return out

    def push_kicks(self, session_ids: set[str]) -> int:
        """Tell every worker to end now those of ``session_ids`` it serves; return how many
        workers were told.

        Every worker, not only those the memory registry knows to serve them: with
        PostgreSQL shared state the workers register there.  The registry has the sessions
        marked already: a worker that misses this sees them at its next heartbeat.
        """
        if not session_ids:
            return 0
        message = _encode([0, ["kick", sorted(session_ids)]])
        told = 0
        for writer in self._writers.values():
            if not writer.is_closing():
                writer.write(message)
                told += 1
        return told

    def attach(self, sock: socket.socket) -> asyncio.Task[None]:
        """Serve one worker on ``sock`` (its end of a socketpair) until it closes."""
        self._next += 1
        task = asyncio.get_running_loop().create_task(self._serve(sock, self._next))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Stop serving every worker."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, sock: socket.socket, worker: int) -> None:
        self._live[worker] = set()
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
        self._writers[worker] = writer
        try:
            while True:
                try:
                    message = await _read(reader)
                except (ValueError, TypeError) as exc:
                    logger.error("master: worker state connection: %s; closing it", exc)
                    return
                if message is None:
                    return
                answer = await self._answer(worker, message)
                if answer[0] == 0:  # a notice: no answer, an error is only logged
                    if len(answer) > 2:
                        logger.error("master: worker %d: %s", worker, answer[2])
                    continue
                writer.write(_encode(answer))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            self._octets.pop(worker, None)
            self._writers.pop(worker, None)
            self._subscribed.discard(worker)
            for session_id in self._live.pop(worker, ()):
                await self.registry.unregister(session_id)
            writer.close()

    def _push_failing(self, keys: list[str]) -> None:
        """Tell every subscribed worker that ``keys`` failed (before the ``add`` is answered)."""
        if not self._subscribed:
            return
        message = _encode([0, ["failing", keys]])
        for worker in self._subscribed:
            writer = self._writers.get(worker)
            if writer is not None and not writer.is_closing():
                writer.write(message)

    async def _answer(self, worker: int, message: list[Any]) -> list[Any]:
        try:
            call_id, op, args = message
            return [call_id, await self._call(worker, str(op), dict(args))]
        except (ValueError, TypeError, KeyError) as exc:
            call_id = message[0] if message else None
            return [call_id, None, f"bad state call: {exc!r}"]

    async def _call(self, worker: int, op: str, args: dict[str, Any]) -> object:
        live = self._live[worker]
        if op == "counts":
            return await self.counters.counts(list(args["keys"]))
        if op == "add":
            keys = list(args["keys"])
            counts = await self.counters.add(keys)
            self._push_failing(keys)
            return counts
        if op == "failing":
            self._subscribed.add(worker)
            return [self.counters.window, self.counters.failing()]
        if op == "clear":
            await self.counters.clear(list(args["keys"]))
            return None
        if op == "charge":
            return await self.downloads.charge(
                str(args["user"]), int(args["octets"]), int(args["limit"])
            )
        if op == "used":
            return await self.downloads.used(str(args["user"]))
        if op == "login_delay":
            return await self.logins.admit(str(args["user"]), float(args["delay"]))
        if op == "register":
            entry = SessionEntry(**args["entry"])
            admission = await self.registry.register(
                entry, max_user=int(args["max_user"]), max_userip=int(args["max_userip"])
            )
            if admission.admitted:
                live.add(entry.id)
            return [admission.admitted, admission.user_sessions, admission.userip_sessions]
        if op == "unregister":
            live.discard(args["id"])
            await self.registry.unregister(str(args["id"]))
            return None
        if op == "sessions":
            found = await self.registry.sessions(args["user"])
            return [dataclasses.asdict(e) for e in found]
        if op == "count":
            return list(await self.registry.count(str(args["user"]), str(args["rip"])))
        if op == "kick":
            return await self.registry.kick(user=args["user"], session_id=args["id"])
        if op == "octets":
            self._octets[worker] = {str(k): int(v) for k, v in dict(args["sent"]).items()}
            return None
        if op == "ready":
            if self.on_ready is not None:
                self.on_ready(int(args["index"]), int(args["pid"]))
            return None
        if op == "heartbeat":
            live.clear()
            live.update(str(i) for i in args["live"])
            every = set().union(*self._live.values())
            kicked = await self.registry.heartbeat(sorted(every))
            return [i for i in kicked if i in live]
        msg = f"unknown operation {op}"
        raise ValueError(msg)


class RemoteState:
    """A worker's connection to the :class:`StateService` of its master.

    Args:
        sock: the worker's end of the socketpair.
        timeout: seconds a call may take before :class:`StateUnavailable`.
        on_lost: called once when the master closes the connection (it is gone).
        on_kick: called with the session ids the master says to end now (``pobox kick``).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float = 5.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        self.on_lost = on_lost
        self.on_kick: Callable[[list[str]], object] | None = None
        #: Called with the keys of each failure the master pushes (:class:`FailingKeys`).
        self.on_failing: Callable[[list[str]], object] | None = None
        #: Round trips made so far (calls; notices are not counted).
        self.calls = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._lost = False
        self._opening = asyncio.Lock()

    async def start(self) -> None:
        """Open the connection and begin watching it (done by the first call otherwise)."""
        async with self._opening:
            if self._writer is not None or self._lost:
                return
            reader, self._writer = await asyncio.open_unix_connection(
                sock=self._sock, limit=MAX_MESSAGE
            )
            self._reading = asyncio.get_running_loop().create_task(self._read_answers(reader))

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await _read(reader)) is not None:
                if message[0] == 0:  # unasked: a kick from the master
                    self._pushed(message[1])
                    continue
                future = self._pending.pop(message[0], None)
                if future is None or future.done():
                    continue
                if len(message) > 2:
                    future.set_exception(StateUnavailable(str(message[2])))
                else:
                    future.set_result(message[1])
        except (ConnectionError, OSError, ValueError, TypeError) as exc:
            logger.debug("master: state connection failed: %s", exc)
        self._lose()

    def _pushed(self, body: object) -> None:
        if not (
            isinstance(body, list)
            and len(body) == 2
            and body[0] in ("kick", "failing")
            and isinstance(body[1], list)
        ):
            logger.debug("master: unknown message from the master: %.100r", body)
            return
        handler = self.on_kick if body[0] == "kick" else self.on_failing
        if handler is not None:
            handler([str(i) for i in body[1]])

    def _lose(self) -> None:
        if self._lost:
            return
        self._lost = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(StateUnavailable("the master is gone"))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
        if self.on_lost is not None:
            self.on_lost()

    async def call(self, op: str, **args: object) -> Any:  # noqa: ANN401 - JSON
        """Send one call and return its result.

        Raises:
            StateUnavailable: the master did not answer in time, or is gone.
        """
        if self._writer is None:
            await self.start()
        if self._lost or self._writer is None:
            raise StateUnavailable("the master is gone")
        self._next += 1
        self.calls += 1
        call_id = self._next
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(_encode([call_id, op, args]))
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise StateUnavailable(f"the master did not answer within {self.timeout:g} s") from None
        finally:
            self._pending.pop(call_id, None)

    async def notify(self, op: str, **args: object) -> None:
        """Send one call whose result is nothing, without waiting for the master (a notice).

        The master applies it before any later call of this worker (see the module's
        theory of operation).

        Raises:
            StateUnavailable: the master is gone.
        """
        if self._writer is None:
            await self.start()
        if self._lost or self._writer is None:
            raise StateUnavailable("the master is gone")
        self._writer.write(_encode([0, op, args]))

    async def aclose(self) -> None:
        """Close the connection (without calling :attr:`on_lost`)."""
        self.on_lost = None
        self._lose()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


class FailingKeys:
    """The keys a worker's master said failed: a superset of those it counts (in a worker).

    See the module's theory of operation.  Each key is kept until ``window`` seconds after
    its last push, in the order of the pushes; beyond ``max_entries`` the oldest go first.

    Args:
        window: ``auth_failure_window``, as the master said.
        max_entries: keys kept at most (the master's bound).
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
        self._until: OrderedDict[str, float] = OrderedDict()
        #: Pushes taken so far: a count asked across one may not drop its key.
        self.pushes = 0

    def __len__(self) -> int:
        """How many keys are kept now (expired ones may linger until swept)."""
        return len(self._until)

    def add(self, keys: Iterable[str]) -> None:
        """Note that ``keys`` failed now (a push); sweep expired keys at the old end."""
        self.pushes += 1
        now = self._clock()
        until, kept = now + self.window, self._until
        for key in keys:
            kept[key] = until
            kept.move_to_end(key)
        while kept and (next(iter(kept.values())) <= now or len(kept) > self.max_entries):
            kept.popitem(last=False)

    def any(self, keys: Iterable[str]) -> bool:
        """Return whether any of ``keys`` may have failures (those the master must count)."""
        kept = self._until
        if not kept:  # the usual case: nothing failed within the window
            return False
        now = self._clock()
        return any(kept.get(key, now) > now for key in keys)

    def discard(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (the master counts none for them)."""
        for key in keys:
            self._until.pop(key, None)


class RemoteFailureCounters:
    """A :class:`~pobox.state.base.FailureCounters` held by the master.

    ``counts`` asks the master only for keys it said failed (:class:`FailingKeys`).
    """

    def __init__(self, state: RemoteState) -> None:
        self._state = state
        #: The keys the master said failed, once subscribed (the first ``counts``).
        self.failing: FailingKeys | None = None
        self._early: list[list[str]] | None = None
        self._subscribing = asyncio.Lock()
        state.on_failing = self._pushed

    def _pushed(self, keys: list[str]) -> None:
        if self.failing is not None:
            self.failing.add(keys)
        elif self._early is not None:  # pushed behind the answer to ``failing``
            self._early.append(keys)

    async def _subscribe(self) -> FailingKeys:
        async with self._subscribing:  # one ``failing`` call, whatever the counts waiting
            if self.failing is not None:
                return self.failing
            self._early = []
            try:
                window, keys = await self._state.call("failing")
                failing = FailingKeys(float(window))
                failing.add(str(k) for k in keys)
                for pushed in self._early:
                    failing.add(pushed)
            finally:
                self._early = None
            self.failing = failing
            return failing

    async def counts(self, keys: Sequence[str]) -> list[int]:
        """Return the failures remembered for each of ``keys`` (0 when none), in order.

        Without a round trip to the master when it said none of ``keys`` failed.
        """
        failing = self.failing or await self._subscribe()
        if not failing.any(keys):
            return [0] * len(keys)
        pushes = failing.pushes
        counts = [int(n) for n in await self._state.call("counts", keys=list(keys))]
        if failing.pushes == pushes:  # else a push may be newer than these counts
            failing.discard(key for key, n in zip(keys, counts, strict=True) if not n)
        return counts

    async def add(self, keys: Sequence[str]) -> list[int]:
        """Count one failure for each of ``keys``; return each count, this failure included."""
        return [int(n) for n in await self._state.call("add", keys=list(keys))]

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the failures of ``keys`` (a notice: applied before this worker's next call)."""
        await self._state.notify("clear", keys=list(keys))


class RemoteDownloadCounters:
    """A :class:`~pobox.state.base.DownloadCounters` held by the master."""

    def __init__(self, state: RemoteState) -> None:
        self._state = state

    async def charge(self, user: str, octets: int, limit: int) -> bool:
        """Add ``octets`` to ``user``'s count of today if it stays within ``limit``; say if so."""
        return bool(await self._state.call("charge", user=user, octets=octets, limit=limit))

    async def used(self, user: str) -> int:
        """Return the octets ``user`` has been charged today."""
        return int(await self._state.call("used", user=user))


class RemoteLoginTimes:
    """A :class:`~pobox.state.base.LoginTimes` held by the master."""

    def __init__(self, state: RemoteState) -> None:
        self._state = state

    async def admit(self, user: str, delay: float) -> bool:
        """Record a login of ``user`` now unless their last one is under ``delay`` s ago."""
        return bool(await self._state.call("login_delay", user=user, delay=delay))


class RemoteSessionRegistry:
    """A :class:`~pobox.state.base.SessionRegistry` held by the master, for one worker.

    Args:
        state: the connection to the master.
        node: this node's name.
    """

    def __init__(self, state: RemoteState, node: str) -> None:
        self._state = state
        self._node = node

    @property
    def node(self) -> str:
        """The name of this node."""
        return self._node

    async def register(self, entry: SessionEntry, *, max_user: int, max_userip: int) -> Admission:
        """Register ``entry`` if the node's sessions leave room; say what was found."""
        admitted, per_user, per_userip = await self._state.call(
            "register", entry=dataclasses.asdict(entry), max_user=max_user, max_userip=max_userip
        )
        return Admission(bool(admitted), int(per_user), int(per_userip))

    async def unregister(self, session_id: str) -> None:
        """Forget a session that ended (a notice: applied before this worker's next call)."""
        await self._state.notify("unregister", id=session_id)

    async def sessions(self, user: str | None = None) -> list[SessionEntry]:
        """Return the node's sessions (of ``user`` only, if given), oldest first."""
        return [SessionEntry(**e) for e in await self._state.call("sessions", user=user)]

    async def count(self, user: str, rip: str) -> tuple[int, int]:
        """Return the node's sessions of ``user``, and of ``user`` from ``rip``."""
        per_user, per_userip = await self._state.call("count", user=user, rip=rip)
        return int(per_user), int(per_userip)

    async def kick(self, *, user: str | None = None, session_id: str | None = None) -> int:
        """Mark the sessions of ``user``, or the one ``session_id``, to be ended."""
        return int(await self._state.call("kick", user=user, id=session_id))

    async def heartbeat(self, live: Sequence[str]) -> list[str]:
        """Forget this worker's sessions not in ``live``; return those asked to end."""
        return [str(i) for i in await self._state.call("heartbeat", live=list(live))]
