"""The small HTTP endpoint the health check and the metrics share: one path, bounded.

Strangers may reach the port, so it is bounded like the POP3 listener: at most
:data:`MAX_CONNECTIONS` open at once, :data:`READ_DEADLINE` seconds to send the request, at
most :data:`MAX_REQUEST` octets of request line and headers (more: ``431``), one request per
connection, nothing read but the request line and headers, :data:`READ_DEADLINE` seconds for
the client to take the answer (else it is cut off).  When the connections are all taken, a
new one evicts the one that has waited longest for its request among those of the client
address with the most such connections (and is refused only if every one has sent its
request): idle connections held open by a stranger, even opened faster than a legitimate
client (a load balancer's check, Prometheus) sends its request, evict each other, not that
client, unless the stranger has more addresses than the endpoint has connections.  Anything
but ``GET``/``HEAD`` of the one path gets ``400``/``404``/``405``; no answer ever echoes what
the client sent.

A subclass gives the path and answers it (:meth:`HttpEndpoint.respond`); the answer's work
runs in the event loop, so it must be quick or run elsewhere (the metrics run theirs in a
thread).

May import: the standard library, :mod:`pobox.config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Final

from pobox.config import Listen

__all__ = ["MAX_CONNECTIONS", "MAX_REQUEST", "READ_DEADLINE", "HttpEndpoint", "response"]

#: Open connections at once; HAProxy needs one per check, Prometheus one per scrape, a few
#: nodes' worth of them a handful.  Past it a new connection evicts one still waiting for its
#: request (of the address with the most), or is closed unanswered if none is waiting.
MAX_CONNECTIONS: Final = 32
#: Seconds a client has to send the request line and headers (and to take the answer).
READ_DEADLINE: Final = 2.0
#: Octets of request line and headers read at most; real requests send well under 200.
MAX_REQUEST: Final = 2048

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

_TEXT: Final = "text/plain; charset=us-ascii"


def response(status: int, body: bytes, content_type: str = _TEXT, *, head: bool = False) -> bytes:
    """Return a whole HTTP/1.0 answer (``head``: without the body)."""
    lines = [
        f"HTTP/1.0 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + (b"" if head else body)


def text_body(text: str) -> bytes:
    """Return a one-line plain-text body."""
    return (text + "\n").encode("ascii", "replace")


def parse_request(data: bytes, path: bytes) -> tuple[int, str, bool]:
    """Judge one request's line and headers; return ``(status, text, head_only)``.

    Args:
        data: the request up to and including the blank line (``\\r\\n\\r\\n``).
        path: the one path answered.

    Returns:
        what to answer (with 200 meaning "answer ``path``").
    """
    line, _, _ = data.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "bad request", False
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return 405, "only GET and HEAD", False
    if target.partition(b"?")[0] != path:
        return 404, f"not found; ask {path.decode('ascii')}", method == b"HEAD"
    return 200, "", method == b"HEAD"


class HttpEndpoint:
    """An HTTP endpoint answering ``GET``/``HEAD`` of one path (see the module documentation).

    Args:
        listen: the address to bind.
        path: the one path answered (``/health``, ``/metrics``).
    """

    def __init__(self, listen: Listen, path: bytes) -> None:
        self._listen = listen
        self._path = path
        self._server: asyncio.Server | None = None
        self._open = 0
        #: Connections still waiting for their request, per client address, oldest first.
        self._waiting: dict[str, dict[asyncio.StreamWriter, None]] = {}

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs bound."""
        if self._server is None:
            return []
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self._server.sockets]

    async def respond(self, *, head: bool) -> tuple[int, bytes, str]:
        """Answer a request of the path: return ``(status, body, content type)``."""
        raise NotImplementedError

    async def start(self) -> None:
        """Bind the address.

        Raises:
            OSError: it cannot be bound.
        """
        family = socket.AF_INET6 if ":" in self._listen.host else socket.AF_INET
        self._server = await asyncio.start_server(
            self._handle,
            self._listen.host,
            self._listen.port,
            family=family,
            reuse_address=True,
            limit=MAX_REQUEST,
        )

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
            writer.write(response(431, text_body("request too large")))
            return
        except asyncio.IncompleteReadError as exc:
            if exc.partial and not writer.transport.is_closing():  # not evicted
                writer.write(response(400, text_body("bad request")))
            return
        finally:
            self._forget(host, writer)
        status, text, head = parse_request(data, self._path)
        if status == 200:
            status, body, content_type = await self.respond(head=head)
            writer.write(response(status, body, content_type, head=head))
        else:
            writer.write(response(status, text_body(text), head=head))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(READ_DEADLINE):
                await writer.drain()

    async def _close_server(self) -> None:
        """Stop listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_DEADLINE * 2):
                    await server.wait_closed()
