"""The health check a load balancer asks: ``GET /health`` on ``health_listen``.

HAProxy (``option httpchk GET /health``, or ``http-check send meth GET uri /health``) takes a
node out of rotation when the answer is not 2xx.  The answer is ``200 ok`` while the node can
reach its stores and is not draining, else ``503`` with a one-line reason:

- *reach its stores*: every probe the composition root gives (``SELECT 1`` on the PostgreSQL
  pool of the mail store and of the userdb; a Maildir needs none) answered within
  :data:`CHECK_TIMEOUT`.  The result is kept for :data:`CHECK_TTL` seconds and concurrent
  requests share one check in flight, so a check storm costs the database one query a second.
  A check that takes longer is answered 503 at :data:`CHECK_TIMEOUT` and left to finish
  under the store's own timeout (``postgresql_timeout``).
- *draining*: after ``SIGTERM`` (:meth:`HealthServer.drain`), at once, for good.

Strangers may reach the port, so it is bounded like the POP3 listener: at most
:data:`MAX_CONNECTIONS` open at once, :data:`READ_DEADLINE` seconds to send the request, at
most :data:`MAX_REQUEST` octets of request line and headers (more: ``431``), one request per
connection, nothing read but the request line and headers.  When the connections are all
taken, a new one evicts the one that has waited longest for its request among those of the
client address with the most such connections (and is refused only if every one has sent
its request): idle connections held open by a stranger, even opened faster than the load
balancer's check sends its request, evict each other, not the check, unless the stranger
has more addresses than the endpoint has connections; so they cannot take the node out of
rotation.  Anything else gets ``400``/``404``/``405``; no answer ever
echoes what the client sent.  A ``503`` names the store that failed, never the driver's
message (which names database hosts and users; it goes to the log).  Bind it to loopback
or a private network all the same.

May import: the standard library, :mod:`pobox.config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from pobox.config import Listen
from pobox.errors import binding

__all__ = ["CHECK_TIMEOUT", "CHECK_TTL", "HealthServer", "Probe"]

logger = logging.getLogger("pobox.health")

#: A check of one store: returns normally when it can be reached, raises when not.
Probe = Callable[[], Awaitable[object]]

#: Open connections to the health port at once; HAProxy needs one per check, a few nodes'
#: worth of load balancers a handful.  Past it a new connection evicts one still waiting for
#: its request (of the address with the most), or is closed unanswered if none is waiting.
MAX_CONNECTIONS: Final = 32
#: Seconds a client has to send the request line and headers (HAProxy sends them at once).
READ_DEADLINE: Final = 2.0
#: Octets of request line and headers read at most; real checks send well under 200.
MAX_REQUEST: Final = 2048
#: Seconds the stores' probes may take together before the node counts as unhealthy; below
#: HAProxy's default check timeout (``inter``, 2 s).
CHECK_TIMEOUT: Final = 1.5
#: Seconds a check result is reused (the database sees at most one query per this).
CHECK_TTL: Final = 1.0

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(status: int, text: str, *, head: bool = False) -> bytes:
    body = (text + "\n").encode("ascii", "replace")
    lines = [
        f"HTTP/1.0 {status} {_REASONS[status]}",
        "Content-Type: text/plain; charset=us-ascii",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + (b"" if head else body)


def parse_request(data: bytes) -> tuple[int, str, bool]:
    """Judge one request's line and headers; return ``(status, text, head_only)``.

    Args:
        data: the request up to and including the blank line (``\\r\\n\\r\\n``).

    Returns:
        what to answer (with 200 meaning "answer with the node's health").
    """
    line, _, _ = data.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "bad request", False
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return 405, "only GET and HEAD", False
    path = target.partition(b"?")[0]
    if path != b"/health":
        return 404, "not found; ask /health", method == b"HEAD"
    return 200, "", method == b"HEAD"


class HealthServer:
    """The HTTP health endpoint of one node."""

    def __init__(self, listen: Listen, probes: Sequence[tuple[str, Probe]]) -> None:
        """Prepare the endpoint on ``listen``; each probe is ``(name, check)``."""
        self._listen = listen
        self._probes = list(probes)
        self._server: asyncio.Server | None = None
        self._open = 0
        #: Connections still waiting for their request, per client address, oldest first.
        self._waiting: dict[str, dict[asyncio.StreamWriter, None]] = {}
        self._draining = False
        self._result: str | None = None
        self._checked_at = -CHECK_TTL
        self._check: asyncio.Task[None] | None = None
        self._probing = ""
        self._was_ok = True

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs bound."""
        if self._server is None:
            return []
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    async def start(self) -> None:
        """Bind the address.

        Raises:
            ListenError: it cannot be bound (naming health_listen).
        """
        family = socket.AF_INET6 if ":" in self._listen.host else socket.AF_INET
        with binding("health_listen", str(self._listen)):
            self._server = await asyncio.start_server(
                self._handle,
                self._listen.host,
                self._listen.port,
                family=family,
                reuse_address=True,
                limit=MAX_REQUEST,
            )
        for host, port in self.addresses:
            logger.info("master: Health check on http://%s:%d/health", host, port)

    def drain(self) -> None:
        """Answer 503 from now on: the node is draining (SIGTERM)."""
        self._draining = True

    async def status(self) -> str | None:
        """Return why the node is unhealthy, or ``None`` if it is healthy.

        A check still running after :data:`CHECK_TIMEOUT` counts as failed, but is not
        cancelled (cancelling a database query waits for the server, which may be the one
        that cannot be reached): it goes on, bounded by the store's own timeout, and later
        requests wait for it rather than start another.
        """
        if self._draining:
            return "draining"
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < CHECK_TTL:
            return self._result
        if self._check is None:
            self._check = loop.create_task(self._run_probes())
        done, _ = await asyncio.wait({self._check}, timeout=CHECK_TIMEOUT)
        if done:
            return self._result
        return f"{self._probing} did not answer within {CHECK_TIMEOUT:g} s"

    async def _run_probes(self) -> None:
        loop = asyncio.get_running_loop()
        result: str | None = None
        detail = ""
        try:
            for name, probe in self._probes:
                self._probing = name
                try:
                    await probe()
                except Exception as exc:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    result, detail = f"{name} unreachable", first
                    break
        finally:
            self._check = None
        self._result, self._checked_at = result, loop.time()
        if result is not None and self._was_ok:
            logger.warning("master: health check failing: %s: %s", result, detail)
        elif result is None and not self._was_ok:
            logger.info("master: health check passing again")
        self._was_ok = result is None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            if not self._waiting:
                writer.transport.abort()  # no answer, no lingering: a reset
                return
            # The oldest of the address holding the most: a load balancer has one or two.
            crowd = max(self._waiting, key=lambda host: len(self._waiting[host]))
            self._forget(crowd, next(iter(self._waiting[crowd]))).transport.abort()
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else ""
        self._open += 1
        self._waiting.setdefault(host, {})[writer] = None
        try:
            await self._answer(reader, writer, host)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            self._forget(host, writer)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    def _forget(self, host: str, writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
        """Take ``writer`` off the connections waiting for their request; return it."""
        waiting = self._waiting.get(host)
        if waiting is not None:
            waiting.pop(writer, None)
            if not waiting:
                del self._waiting[host]
        return writer

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        try:
            async with asyncio.timeout(READ_DEADLINE):
                data = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            writer.write(_response(431, "request too large"))
            return
        except asyncio.IncompleteReadError as exc:
            if exc.partial and not writer.transport.is_closing():  # not evicted
                writer.write(_response(400, "bad request"))
            return
        finally:
            self._forget(host, writer)
        status, text, head = parse_request(data)
        if status == 200:
            reason = await self.status()
            status, text = (200, "ok") if reason is None else (503, reason)
        writer.write(_response(status, text, head=head))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(READ_DEADLINE):
                await writer.drain()

    async def aclose(self) -> None:
        """Stop listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_DEADLINE * 2):
                    await server.wait_closed()
        check = self._check
        if check is not None:
            check.cancel()
            with contextlib.suppress(BaseException):
                await check


def probes_of(stores: Sequence[object]) -> list[tuple[str, Probe]]:
    """Return the probes of the stores that have one (a ``ping`` coroutine method)."""
    out: list[tuple[str, Probe]] = []
    for store in stores:
        ping = getattr(store, "ping", None)
        if ping is not None:
            out.append((getattr(store, "health_name", type(store).__name__), ping))
    return out
