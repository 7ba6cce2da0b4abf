"""The listening side: bind the configured addresses, run a :class:`Session` per connection,
and shut down cleanly (sessions closed without UPDATE, maildrop locks released).

May import: the standard library, :mod:`pobox.server._session`, :mod:`pobox.config`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from pobox.server._session import Session, SessionContext

__all__ = ["Pop3Server"]

logger = logging.getLogger("pobox.server")


class Pop3Server:
    """A POP3 server on one or more addresses.

    Use as ``async with Pop3Server(ctx) as server: await server.serve_forever()``, or call
    :meth:`start` and :meth:`aclose` yourself.
    """

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self._servers: list[asyncio.Server] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs actually bound (port 0 in the config gets a real one)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    @property
    def session_count(self) -> int:
        """How many sessions are open now."""
        return len(self._sessions)

    async def start(self) -> None:
        """Bind every configured address.

        Raises:
            OSError: an address cannot be bound (in use, not permitted).
        """
        for listen in self.ctx.config.listen:
            family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            server = await asyncio.start_server(
                self._handle,
                listen.host,
                listen.port,
                family=family,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
        for host, port in self.addresses:
            logger.info("master: Listening for POP3 on %s:%d", host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await Session(self.ctx, reader, writer).run()
        except asyncio.CancelledError:
            pass  # shutdown: the session has closed itself; this task ends here
        finally:
            self._sessions.discard(task)

    async def serve_forever(self) -> None:
        """Serve until :meth:`aclose` is called."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Stop listening, close every session without UPDATE, release storage."""
        for server in self._servers:
            server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await self.ctx.store.aclose()
        self._closed.set()

    async def __aenter__(self) -> Pop3Server:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the server."""
        await self.aclose()
