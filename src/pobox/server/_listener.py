"""The listening side: bind the configured addresses, serve each connection with a driver,
and shut down cleanly (sessions closed without UPDATE, maildrop locks released).

A drain (``SIGTERM``, driven by :func:`pobox.cli.drain`) uses three steps of its own:
:meth:`Pop3Server.stop_accepting` closes the listeners, :meth:`Pop3Server.wait_sessions`
waits for the sessions to end by themselves, and :meth:`Pop3Server.stop_sessions` ends the
rest at their next wait for the client, without UPDATE.

Plain listeners (``listen``) offer STLS when ``ssl_cert`` is set; ``ssl_listen`` addresses
speak TLS from the first byte (RFC 8314).  Connections over ``max_connections`` in all or
``max_connections_per_ip`` from one address get ``-ERR [SYS/TEMP]`` and are closed at once.

Each connection is served by a :class:`~pobox.server._driver.Pop3Protocol` (callbacks, no
task per connection or per command); the listener is its :class:`~pobox.server._driver.Door`:
it admits the connection against the caps and the drain and forgets it at its end.

Behind HAProxy (``haproxy_trusted_networks``, :mod:`pobox.server._proxy`) a trusted peer's
PROXY header is read first, and the caps count the real client's address.  On a plain
listener the driver reads it (bytes after it go to the session).  On an implicit-TLS
listener it comes before the ClientHello, so pobox accepts those connections itself
(:class:`_TlsListener`): the header is read from the raw socket, never a byte past it, and
only then does TLS start, with ``loop.connect_accepted_socket(ssl=...)`` under the same
handshake timeout (``login_timeout``) as before.  A failed handshake is logged once, with its
reason and the client's address, as the session's only line (it gets a session id for it).

May import: the standard library, :mod:`pobox.server._session`, :mod:`pobox.server._driver`,
:mod:`pobox.server._proxy`, :mod:`pobox.config`, :mod:`pobox.tls`, :mod:`pobox.log`,
:mod:`pobox._logevents` (and counts in :mod:`pobox.metrics` through the session context).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Final

from pobox import _logevents as events
from pobox.binding import binding
from pobox.config import Listen
from pobox.errors import ConfigError
from pobox.log import SessionLog
from pobox.server import _inherit
from pobox.server._driver import Pop3Protocol
from pobox.server._limits import ConnectionLimits
from pobox.server._proxy import Origin, ProxyPolicy, receive_origin
from pobox.server._session import SessionContext, session_id
from pobox.tls import ServerTls

__all__ = ["Pop3Server"]

logger = logging.getLogger("pobox.server")
#: Where sessions log (a failed POP3S handshake is a session's line).
session_logger = logging.getLogger("pobox.session")

#: The answer to a connection over a limit (RFC 3206 §4: SYS/TEMP, "try again later").
TOO_MANY: Final = b"-ERR [SYS/TEMP] Too many connections, try later.\r\n"

#: The answer to a connection that got in just as the server began to drain.
DRAINING: Final = b"-ERR [SYS/TEMP] Server shutting down, try another server or later.\r\n"

#: Connections the kernel may queue before pobox accepts them.
BACKLOG: Final = 1024

#: Seconds to wait after accept() fails for want of descriptors or memory, as asyncio does.
ACCEPT_RETRY_DELAY: Final = 1.0


class _TlsListener:
    """The accept loop of one implicit-TLS address (``ssl_listen``).

    ``start_server(ssl=...)`` would start TLS on the first byte; pobox must first see whether
    the peer is a trusted HAProxy whose PROXY header comes before the ClientHello, so it
    accepts the connections itself and hands each socket to ``serve``.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        serve: Callable[[socket.socket, Any], Coroutine[Any, Any, None]],
    ) -> None:
        self.sockets = sockets
        self._serve = serve
        self._connections: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(sock)) for sock in sockets]

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM
                logger.error("master: accept() failed, retrying in 1 s: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            task = loop.create_task(self._serve(conn, address))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def close(self) -> None:
        """Stop accepting and drop connections whose TLS has not started."""
        for task in self._accepting + list(self._connections):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has taken effect."""
        await asyncio.gather(*self._accepting, *self._connections, return_exceptions=True)


def _listening_sockets(listen: Listen) -> list[socket.socket]:
    """Bind and listen on every address ``listen`` names, as ``asyncio.start_server`` does.

    Raises:
        OSError: an address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    infos = socket.getaddrinfo(
        listen.host, listen.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for af, kind, proto, _, address in infos:
            sock = socket.socket(af, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
        self._ssl_servers: list[_TlsListener] = []
        #: Who may send a PROXY header (read by the drivers).
        self.proxy = ProxyPolicy.from_config(ctx.config)
        self._limits = ConnectionLimits(
            ctx.config.max_connections, ctx.config.max_connections_per_ip
        )
        #: Every connection not yet forgotten (PROXY headers being read included).
        self._connections: set[Pop3Protocol] = set()
        #: The connections admitted, with a session.
        self._sessions: set[Pop3Protocol] = set()
        self._emptied = asyncio.Event()
        self._draining = False
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
    def _bound(servers: list[asyncio.Server] | list[_TlsListener]) -> list[tuple[str, int]]:
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
            ListenError: an address cannot be bound (in use, not permitted), naming its key.
        """
        if self.ctx.cluster is not None:  # the node's lease first: its sessions must count
            await self.ctx.cluster.start()
        for listen in self.ctx.config.listen:
            with binding("listen", str(listen)):
                self._servers.extend(await self._bind(listen))
        for listen in self.ctx.config.ssl_listen:
            assert self.ctx.tls is not None  # config validation: ssl_listen needs ssl_cert
            sockets = _inherit.take(_inherit.key("pop3s", f"{listen.host}:{listen.port}"))
            with binding("ssl_listen", str(listen)):
                sockets = sockets or _listening_sockets(listen)
            self._ssl_servers.append(_TlsListener(sockets, self._serve_tls))
        for host, port in self.addresses:
            logger.info("master: Listening for POP3 on %s:%d", host, port)
        for host, port in self.ssl_addresses:
            logger.info("master: Listening for POP3S (implicit TLS) on %s:%d", host, port)

    def _protocol(self, origin: Origin | None = None, *, counted: bool = False) -> Pop3Protocol:
        """Make the driver of a new connection (and remember it for :meth:`aclose`)."""
        driver = Pop3Protocol(self, origin, counted=counted)
        self._connections.add(driver)
        if self.ctx.metrics is not None:
            self.ctx.metrics.connections_open(len(self._connections))
        return driver

    def _plain_protocol(self) -> Pop3Protocol:
        """Make the driver of a new connection to a plain listener."""
        if self.ctx.metrics is not None:
            self.ctx.metrics.connected("pop3")
        return self._protocol()

    async def _bind(self, listen: Listen) -> list[asyncio.Server]:
        """Listen on one plain address (on the sockets a master bound, in a worker)."""
        loop = asyncio.get_running_loop()
        inherited = _inherit.take(_inherit.key("pop3", f"{listen.host}:{listen.port}"))
        if inherited is not None:
            # (the backlog again: asyncio listens on a given socket once more, with its own)
            return [
                await loop.create_server(self._plain_protocol, sock=sock, backlog=BACKLOG)
                for sock in inherited
            ]
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        return [
            await loop.create_server(
                self._plain_protocol,
                listen.host,
                listen.port,
                family=family,
                reuse_address=True,
                backlog=BACKLOG,
            )
        ]

    async def _serve_tls(self, sock: socket.socket, address: Any) -> None:  # noqa: ANN401
        """Start an implicit-TLS connection: its PROXY header if it owes one, then TLS."""
        loop = asyncio.get_running_loop()
        tls = self.ctx.tls
        assert tls is not None
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.connected("pop3s")
        origin: Origin | None = None
        try:
            sock.setblocking(False)
            rip, lip = str(address[0]), str(sock.getsockname()[0])
            if self.proxy.trusts(rip):
                origin = await receive_origin(
                    self.proxy,
                    functools.partial(loop.sock_recv, sock),
                    address,
                    sock.getsockname(),
                    log=logger,
                    service="pop3-login",
                )
                if origin is None:
                    sock.close()
                    return
                rip, lip = origin.rip, origin.lip
        except OSError:  # the client is gone already
            sock.close()
            return
        except BaseException:  # the server is shutting down
            sock.close()
            raise
        # Counted before the handshake, which may take login_timeout: connections that never
        # finish it must not escape the caps (and hold descriptors the caps are sized for).
        which = self._limits.admit(rip)
        if which is not None:
            events.too_many_connections(logger, "master", which, rip)
            sock.close()  # no TLS yet, so no POP3 reply: as Dovecot, close at once
            return
        made: list[Pop3Protocol] = []

        def protocol() -> Pop3Protocol:
            made.append(self._protocol(origin, counted=True))
            return made[-1]

        try:
            # From here the transport owns the socket, and closes it if the handshake fails.
            await loop.connect_accepted_socket(
                protocol, sock, ssl=tls.context, ssl_handshake_timeout=self.ctx.config.login_timeout
            )
        except BaseException as exc:
            for driver in made:  # never connected: nothing else forgets it
                self._connections.discard(driver)
            self._limits.release(rip)  # the session (which releases it) never started
            if not isinstance(exc, OSError | TimeoutError):  # ssl.SSLError is an OSError
                raise
            if metrics is not None:
                metrics.connections_open(len(self._connections))
                metrics.tls_handshake("pop3s", exc, ok=False)
            events.tls_handshake_failed(
                SessionLog(session_logger, session_id(), rip=rip, lip=lip), exc
            )
        else:
            if metrics is not None:
                metrics.tls_handshake("pop3s", None, ok=True)

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

    # ----------------------------------------------------------------- the door

    def admit(self, driver: Pop3Protocol, ip: str, *, counted: bool) -> bytes | None:
        """Count a connection from ``ip`` against the caps; return the line refusing it, or None.

        Args:
            driver: the connection's driver.
            ip: the client's address (the real client's behind HAProxy, never HAProxy's).
            counted: whether it was counted already (POP3S: before its handshake).
        """
        if self._draining:  # accepted just before the listeners closed
            if counted:
                self._limits.release(ip)
            return DRAINING
        if not counted:
            which = self._limits.admit(ip)
            if which is not None:
                events.too_many_connections(logger, "master", which, ip)
                return TOO_MANY
        self._sessions.add(driver)
        self._emptied.clear()
        return None

    def closed(self, driver: Pop3Protocol, ip: str | None) -> None:
        """Forget a connection; ``ip``: where it was counted against the caps, if it was."""
        self._connections.discard(driver)
        if self.ctx.metrics is not None:
            self.ctx.metrics.connections_open(len(self._connections))
        if driver in self._sessions:
            self._sessions.discard(driver)
            if ip is not None:
                self._limits.release(ip)
            if not self._sessions:
                self._emptied.set()

    # ----------------------------------------------------------------- draining

    def stop_accepting(self) -> None:
        """Close the listening sockets (SIGTERM): new connections are refused by the kernel.

        Sessions already open go on; a connection accepted in the same moment is answered
        ``-ERR [SYS/TEMP]`` and closed.
        """
        self._draining = True
        for server in self._servers + self._ssl_servers:
            server.close()

    async def wait_sessions(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every session to end; return whether they did."""
        if not self._sessions:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._emptied.wait()
        return not self._sessions

    def stop_sessions(self) -> None:
        """End every session at its next wait for the client, without UPDATE.

        See :meth:`pobox.server._driver.Pop3Protocol.stop`; a session busy with a command (an UPDATE
        under way) finishes it first.  :meth:`aclose` then cancels whatever is left.
        """
        for driver in list(self._sessions):
            driver.stop()

    async def serve_forever(self) -> None:
        """Serve until :meth:`aclose` is called."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Stop listening, close every session without UPDATE, release storage and userdb."""
        for server in self._servers + self._ssl_servers:
            server.close()
        for server in self._ssl_servers:  # handshakes under way end here
            server.close()
            await server.wait_closed()
        drivers = list(self._connections)
        for driver in drivers:
            driver.shutdown()
        if drivers:
            await asyncio.gather(*(driver.done for driver in drivers), return_exceptions=True)
        for server in self._servers + self._ssl_servers:
            await server.wait_closed()
        self._servers.clear()
        self._ssl_servers.clear()
        if self.ctx.cluster is not None:  # the sessions have unregistered themselves
            await self.ctx.cluster.aclose()
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
