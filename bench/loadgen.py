"""The load generator: asyncio POP3 clients over raw sockets, checking every answer.

Each client sends one command at a time and waits for the whole answer, as real POP3 clients
(fetchmail, getmail, Thunderbird) do; nothing is pipelined.  Every answer is checked while the
load runs, so a fast wrong answer cannot win:

- STAT's count equals the number of messages the benchmark delivered;
- LIST has that many lines and its sizes add up to STAT's total;
- UIDL has that many distinct lines;
- each RETR returns exactly the LIST size once the dot-stuffing is undone;
- and when the spec carries the delivered messages (``Spec.expected``, each normalised to CRLF
  line ends: what RFC 1939 puts on the wire before dot-stuffing), each RETR's content, once
  un-stuffed, is byte for byte one of them: the message stored under that number, or (when a
  server numbers the maildrop in another order) another one, and one session's RETRs together
  return every message exactly once.

:func:`run_load` runs one workload for a fixed time in the calling process (the caller pins it
to a core) and returns a :class:`LoadResult`.  uvloop is used when it is installed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

try:  # uvloop is faster; the benchmark says which loop it used.
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None

LOOP_NAME = "uvloop" if uvloop is not None else "asyncio"


class CheckError(Exception):
    """A server's answer was wrong (or the connection broke)."""


class Client(asyncio.Protocol):
    """A minimal POP3 client connection: a receive buffer and two readers."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _more(self) -> None:
        if self.closed:
            raise CheckError("connection closed by the server")
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line)

    async def line(self) -> bytes:
        """Return the next CRLF-terminated line, without the CRLF."""
        while (end := self.buf.find(b"\r\n")) < 0:
            await self._more()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def ok(self, command: bytes) -> bytes:
        """Send ``command`` and return its +OK line (anything else is a :class:`CheckError`)."""
        self.send(command)
        reply = await self.line()
        if not reply.startswith(b"+OK"):
            raise CheckError(f"{command!r}: {reply!r}")
        return reply

    async def multi(
        self, command: bytes, *, keep: bool = False, expect: bytes | None = None
    ) -> tuple[int, int, bytes | None]:
        """Send ``command``; return (body length unstuffed, line count, the body if ``keep``).

        LIST and UIDL keep their bodies to check them. A RETR checked for content passes
        ``expect``, the expected body dot-stuffed as on the wire: when the body is exactly
        that (one comparison in the receive buffer, no copy) the body returned is ``None``,
        else the body, for the caller to un-stuff and compare.
        """
        await self.ok(command)
        start = 0
        while True:
            if self.buf[:3] == b".\r\n":
                del self.buf[:3]
                return 0, 0, b""
            end = self.buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                size = end + 2
                stuffed = self.buf.count(b"\r\n..", 0, size) + self.buf.startswith(b"..")
                lines = self.buf.count(b"\r\n", 0, size)
                matched = expect is not None and len(expect) == size and self.buf.startswith(expect)
                body = bytes(self.buf[:size]) if keep and not matched else None
                del self.buf[: size + 3]
                return size - stuffed, lines, body
            start = max(0, len(self.buf) - 4)
            await self._more()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort() if self.closed else self.transport.close()


async def connect(host: str, port: int, source: str = "") -> Client:
    """Open a connection (from the address ``source``, if given) and read the greeting."""
    loop = asyncio.get_running_loop()
    local = (source, 0) if source else None
    _, client = await loop.create_connection(Client, host, port, local_addr=local)
    greeting = await client.line()
    if not greeting.startswith(b"+OK"):
        raise CheckError(f"greeting {greeting!r}")
    return client


async def login(host: str, port: int, user: str, password: str, source: str = "") -> Client:
    """Connect and log in with USER/PASS."""
    client = await connect(host, port, source)
    await client.ok(b"USER " + user.encode() + b"\r\n")
    await client.ok(b"PASS " + password.encode() + b"\r\n")
    return client


async def quit_(client: Client) -> None:
    await client.ok(b"QUIT\r\n")
    client.close()


@dataclass(frozen=True)
class Spec:
    """One workload's parameters (picklable, for generator processes)."""

    kind: str  # session, login, empty, bulk, bigbox
    host: str
    port: int
    users: tuple[str, ...]
    password: str
    concurrency: int
    duration: float
    messages: int = 0  # the maildrop's expected message count
    retr: bool = True
    ops_limit: int = 0  # stop after this many sessions (0: run for ``duration``)
    source: str = ""  # the clients' address (bench/cluster.py: one HAProxy does not trust)
    #: The delivered messages in delivery order, with CRLF line ends (empty: sizes only).
    expected: tuple[bytes, ...] = ()


def unstuff(body: bytes) -> bytes:
    """Undo RFC 1939 §3 dot-stuffing of a multi-line body (without its ``.`` line)."""
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def stuff(message: bytes) -> bytes:
    """Dot-stuff a CRLF message as RFC 1939 §3 sends it (without the ``.`` line)."""
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


@functools.cache
def wire_forms(expected: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The messages dot-stuffed, once per process: the fast path of the content check.

    ``stuff`` is one-to-one, so a body that equals ``stuff(message)`` un-stuffs to
    ``message``: comparing on the wire is comparing after un-stuffing, without a copy.
    """
    return tuple(stuff(message) for message in expected)


class ContentCheck:
    """Check RETR contents against the delivered messages (see the module docstring)."""

    def __init__(self, expected: tuple[bytes, ...]) -> None:
        self.expected = expected
        self.wire = wire_forms(expected)
        self.index = {message: number for number, message in enumerate(expected)}
        self.seen: set[int] = set()

    def expect(self, number: int) -> bytes | None:
        """The wire form RETR ``number`` should return when the server numbers as delivered."""
        return self.wire[number - 1] if number <= len(self.wire) else None

    def check(self, number: int, body: bytes | None) -> None:
        """Check what RETR ``number`` (1-based) returned: ``None`` if it was :meth:`expect`."""
        position = number - 1
        got = None if body is None else unstuff(body)
        if got is not None and (position >= len(self.expected) or got != self.expected[position]):
            found = self.index.get(got)
            if found is None:
                msg = f"RETR {number}: content differs from every delivered message"
                raise CheckError(msg)
            position = found
        if position in self.seen:
            msg = f"RETR {number}: the same message as an earlier RETR"
            raise CheckError(msg)
        self.seen.add(position)


@dataclass
class LoadResult:
    """What a load run did."""

    ops: int = 0
    bytes: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # generator CPU seconds (user + system)
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    def merge(self, other: LoadResult) -> None:
        self.ops += other.ops
        self.bytes += other.bytes
        self.errors += other.errors
        self.elapsed = max(self.elapsed, other.elapsed)
        self.cpu += other.cpu
        self.latencies.extend(other.latencies)
        self.first_error = self.first_error or other.first_error


def _parse_listing(body: bytes, count: int, command: str) -> list[bytes]:
    lines = body.split(b"\r\n")[:-1]
    if len(lines) != count:
        raise CheckError(f"{command}: {len(lines)} lines, expected {count}")
    return lines


async def session(spec: Spec, user: str) -> int:
    """Login, STAT, LIST, UIDL, RETR each message, QUIT; return the message bytes received."""
    client = await login(spec.host, spec.port, user, spec.password, spec.source)
    try:
        stat = (await client.ok(b"STAT\r\n")).split()
        count, total = int(stat[1]), int(stat[2])
        if count != spec.messages:
            raise CheckError(f"STAT {count} messages, expected {spec.messages}")
        if spec.kind == "bigbox":
            _, _, body = await client.multi(b"UIDL\r\n", keep=True)
            if body is None:
                raise CheckError("UIDL too long")
            uids = {line.split()[1] for line in _parse_listing(body, count, "UIDL")}
            if len(uids) != count:
                raise CheckError("UIDL: duplicate unique-ids")
            await quit_(client)
            return 0
        if spec.kind == "empty":
            await quit_(client)
            return 0
        _, _, body = await client.multi(b"LIST\r\n", keep=True)
        assert body is not None
        sizes = [int(line.split()[1]) for line in _parse_listing(body, count, "LIST")]
        if sum(sizes) != total:
            raise CheckError(f"LIST sizes add up to {sum(sizes)}, STAT says {total}")
        _, _, body = await client.multi(b"UIDL\r\n", keep=True)
        assert body is not None
        uids = {line.split()[1] for line in _parse_listing(body, count, "UIDL")}
        if len(uids) != count:
            raise CheckError("UIDL: duplicate unique-ids")
        received = 0
        if spec.retr:
            content = ContentCheck(spec.expected) if spec.expected else None
            for number, size in enumerate(sizes, 1):
                expect = content.expect(number) if content is not None else None
                got, _, body = await client.multi(
                    b"RETR %d\r\n" % number, keep=content is not None, expect=expect
                )
                if got != size:
                    raise CheckError(f"RETR {number}: {got} bytes, LIST said {size}")
                if content is not None:
                    content.check(number, body)
                received += got
        await quit_(client)
        return received
    finally:
        client.close()


async def login_only(spec: Spec, user: str) -> int:
    """Connect, USER/PASS, QUIT."""
    client = await login(spec.host, spec.port, user, spec.password, spec.source)
    try:
        await quit_(client)
    finally:
        client.close()
    return 0


async def _closed_loop(
    spec: Spec, work: Callable[[Spec, str], Awaitable[int]], result: LoadResult
) -> None:
    """Run ``work`` from ``concurrency`` clients, each on a user nobody else holds."""
    free: asyncio.Queue[str] = asyncio.Queue()
    for user in spec.users:
        free.put_nowait(user)
    deadline = time.perf_counter() + spec.duration
    busy = [0]

    async def worker() -> None:
        while time.perf_counter() < deadline:
            if spec.ops_limit and result.ops + result.errors + busy[0] >= spec.ops_limit:
                return
            user = await free.get()
            busy[0] += 1
            started = time.perf_counter()
            try:
                result.bytes += await work(spec, user)
            except (CheckError, OSError, ValueError, IndexError) as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{user}: {exc!r}"
                await asyncio.sleep(0.01)
            else:
                result.ops += 1
                result.latencies.append(time.perf_counter() - started)
            finally:
                busy[0] -= 1
                free.put_nowait(user)

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def _bulk(spec: Spec, result: LoadResult) -> None:
    """One session, RETR 1 again and again; bytes are the unstuffed message bytes."""
    client = await login(spec.host, spec.port, spec.users[0], spec.password, spec.source)
    _, _, body = await client.multi(b"LIST\r\n", keep=True)
    assert body is not None
    size = int(_parse_listing(body, spec.messages, "LIST")[0].split()[1])
    expected = spec.expected[0] if spec.expected else None
    wire = wire_forms(spec.expected)[0] if spec.expected else None
    deadline = time.perf_counter() + spec.duration
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        got, _, body = await client.multi(b"RETR 1\r\n", keep=wire is not None, expect=wire)
        wrong = ""
        if got != size:
            wrong = f"RETR 1: {got} bytes, LIST said {size}"
        elif body is not None and unstuff(body) != expected:
            wrong = "RETR 1: content differs from the delivered message"
        if wrong:
            result.errors += 1
            result.first_error = result.first_error or wrong
        else:
            result.ops += 1
            result.bytes += got
            result.latencies.append(time.perf_counter() - started)
    await quit_(client)


async def _run(spec: Spec) -> LoadResult:
    result = LoadResult()
    started = time.perf_counter()
    if spec.kind == "bulk":
        await _bulk(spec, result)
    elif spec.kind == "login":
        await _closed_loop(spec, login_only, result)
    else:
        await _closed_loop(spec, session, result)
    result.elapsed = time.perf_counter() - started
    return result


def run_load(spec: Spec) -> LoadResult:
    """Run ``spec`` in this process and return what it did, with this process's CPU time."""
    before = os.times()
    result = uvloop.run(_run(spec)) if uvloop is not None else asyncio.run(_run(spec))
    after = os.times()
    result.cpu = (after.user - before.user) + (after.system - before.system)
    return result


async def hold_idle(
    host: str, port: int, users: list[str], password: str, opened: list[Client]
) -> int:
    """Log ``users`` in (100 at a time) and keep the connections in ``opened``; return errors."""
    errors = 0
    gate = asyncio.Semaphore(100)

    async def one(user: str) -> None:
        nonlocal errors
        async with gate:
            try:
                opened.append(await login(host, port, user, password))
            except (CheckError, OSError) as exc:
                errors += 1
                if errors == 1:
                    print(f"  idle login {user} failed: {exc!r}", flush=True)

    await asyncio.gather(*(one(user) for user in users))
    return errors
