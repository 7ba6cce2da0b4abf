"""The listening side: bind the configured addresses, run a :class:`Session` per connection,
and shut down cleanly (sessions closed without UPDATE, maildrop locks released).

Plain listeners (``listen``) offer STLS when ``ssl_cert`` is set; ``ssl_listen`` addresses
speak TLS from the first byte (RFC 8314).  Connections over ``max_connections`` in all or
``max_connections_per_ip`` from one address get ``-ERR [SYS/TEMP]`` and are closed at once.

May import: the standard library, :mod:`pobox.server._session`, :mod:`pobox.config`,
:mod:`pobox.tls`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
from typing import Any, Final

from pobox.config import Listen
from pobox.errors import ConfigError
from pobox.server._session import Session, SessionContext
from pobox.tls import ServerTls

__all__ = ["Pop3Server"]

logger = logging.getLogger("pobox.server")

#: The answer to a connection over a limit (RFC 3206 §4: SYS/TEMP, "try again later").
TOO_MANY: Final = b"-ERR [SYS/TEMP] Too many connections, try later.\r\n"


class Pop3Server:
    """A POP3 server on one or more addresses.

    Use as ``async with Pop3Server(ctx) as server: await server.serve_forever()``, or call
    :meth:`start` and :meth:`aclose` yourself.
    """

    def __init__(self, ctx: SessionContext) -> None:
        if ctx.tls is None and ctx.config.ssl_cert:
            ctx = dataclasses.replace(ctx, tls=ServerTls(ctx.config))
        self.ctx = ctx
        self._servers: list[asyncio.Server] = []
        self._ssl_servers: list[asyncio.Server] = []
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._open = 0
        self._sessions: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs actually bound (port 0 in the config gets a real one)."""
        return self._bound(self._servers)

    @property
    def ssl_addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs of the implicit-TLS listeners (``ssl_listen``)."""
        return self._bound(self._ssl_servers)

    @staticmethod
    def _bound(servers: list[asyncio.Server]) -> list[tuple[str, int]]:
        out = []
        for server in servers:
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
            self._servers.append(await self._bind(listen))
        tls = self.ctx.tls
        for listen in self.ctx.config.ssl_listen:
            assert tls is not None  # config validation: ssl_listen needs ssl_cert
            server = await self._bind(
                listen, ssl=tls.context, ssl_handshake_timeout=self.ctx.config.login_timeout
            )
            self._ssl_servers.append(server)
        for host, port in self.addresses:
            logger.info("master: Listening for POP3 on %s:%d", host, port)
        for host, port in self.ssl_addresses:
            logger.info("master: Listening for POP3S (implicit TLS) on %s:%d", host, port)

    async def _bind(self, listen: Listen, **tls: Any) -> asyncio.Server:  # noqa: ANN401
        """Listen on one address; ``tls`` holds ``ssl`` and its handshake timeout, if any."""
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        return await asyncio.start_server(
            self._handle,
            listen.host,
            listen.port,
            family=family,
            reuse_address=True,
            backlog=1024,
            **tls,
        )

    def reload_tls(self) -> bool:
        """Re-read the certificates (SIGHUP); open sessions keep theirs.

        Returns:
            whether the new certificates are in use (on error the old ones stay, logged).
        """
        if self.ctx.tls is None:
            return False
        try:
            self.ctx.tls.reload()
        except ConfigError as exc:
            logger.error("master: TLS reload failed, keeping the old certificates: %s", exc)
            return False
        logger.info("master: TLS certificates reloaded")
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        ip = str(peer[0])
        cfg = self.ctx.config
        if self._open >= cfg.max_connections or self._per_ip[ip] >= cfg.max_connections_per_ip:
            which = "in all" if self._open >= cfg.max_connections else f"from {ip}"
            logger.warning("master: Too many connections %s, refusing rip=%s", which, ip)
            await self._refuse(writer)
            return
        self._open += 1
        self._per_ip[ip] += 1
        self._sessions.add(task)
        try:
            await Session(self.ctx, reader, writer).run()
        except asyncio.CancelledError:
            pass  # shutdown: the session has closed itself; this task ends here
        finally:
            self._sessions.discard(task)
            self._open -= 1
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            writer.write(TOO_MANY)
            await asyncio.wait_for(writer.drain(), 5)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)

    async def serve_forever(self) -> None:
        """Serve until :meth:`aclose` is called."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Stop listening, close every session without UPDATE, release storage and userdb."""
        for server in self._servers + self._ssl_servers:
            server.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        for server in self._servers + self._ssl_servers:
            await server.wait_closed()
        self._servers.clear()
        self._ssl_servers.clear()
        await self.ctx.store.aclose()
        close = getattr(self.ctx.authenticator, "aclose", None)  # a database's pool
        if close is not None:
            await close()
        self._closed.set()

    async def __aenter__(self) -> Pop3Server:
        """Start the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop the server."""
        await self.aclose()
