"""The delivery listeners: LMTP and SMTP servers on TCP addresses and Unix sockets.

:class:`DeliveryServer` starts one asyncio server per configured address (``lmtp_listen``,
``smtp_listen``), each connection served by a fresh aiosmtpd protocol object, and closes them
again. A ``unix:/path`` address is a Unix socket; a stale socket file left by a crashed
server is replaced, any other file at that path is an error.

LMTP connections pass a :class:`~pobox.server._proxy.ProxyGate` first: from
``haproxy_trusted_networks`` it reads the PROXY header and gives aiosmtpd a transport showing
the real client, from elsewhere it refuses a header (aiosmtpd is not changed).

May import: the standard library, aiosmtpd, :mod:`pobox.config`, :mod:`pobox.delivery` and
:mod:`pobox.server._proxy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from pobox.config import Config, parse_listen
from pobox.delivery._agent import DeliveryAgent
from pobox.delivery._protocol import DeliveryProtocol
from pobox.delivery.lmtp import LmtpHandler, LmtpProtocol
from pobox.delivery.smtp import SmtpHandler, SmtpProtocol
from pobox.errors import ConfigError
from pobox.server._proxy import ProxyGate, ProxyPolicy

__all__ = ["DeliveryServer"]

logger = logging.getLogger(__name__)

#: Seconds of silence after which a delivery connection is closed (RFC 5321 §4.5.3.2.7 asks
#: for 5 minutes while waiting for a command).
_TIMEOUT = 300.0
_UNIX_PREFIX = "unix:"
#: Seconds :meth:`DeliveryServer.aclose` waits for the listeners to close.
_CLOSE_GRACE = 5.0


class DeliveryServer:
    """The LMTP and SMTP listeners of one configuration."""

    def __init__(self, config: Config, agent: DeliveryAgent) -> None:
        """Prepare listeners for ``config``'s ``lmtp_listen`` and ``smtp_listen``."""
        self._config = config
        self._agent = agent
        self._servers: list[tuple[str, asyncio.Server]] = []
        self._unix_paths: list[Path] = []

    @property
    def addresses(self) -> list[tuple[str, str | tuple[str, int]]]:
        """``(protocol, address)`` of every listener: ``(host, port)`` or a socket path."""
        out: list[tuple[str, str | tuple[str, int]]] = []
        for protocol, server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((protocol, name if isinstance(name, str) else (name[0], name[1])))
        return out

    def address(self, protocol: str) -> tuple[str, int]:
        """Return the first TCP ``(host, port)`` of ``protocol`` (``"lmtp"`` or ``"smtp"``)."""
        for name, address in self.addresses:
            if name == protocol and not isinstance(address, str):
                return address
        msg = f"no TCP {protocol} listener"
        raise LookupError(msg)

    async def start(self) -> None:
        """Bind every configured address.

        Raises:
            ConfigError: an address is malformed.
            OSError: an address cannot be bound.
        """
        config = self._config
        size = config.max_message_size or None
        hostname = config.hostname or socket.gethostname()
        lmtp = LmtpHandler(self._agent)
        smtp = SmtpHandler(self._agent)
        loop = asyncio.get_running_loop()

        def lmtp_factory() -> DeliveryProtocol:
            return LmtpProtocol(
                lmtp,
                data_size_limit=size,
                hostname=hostname,
                ident="pobox LMTP",
                timeout=_TIMEOUT,
                loop=loop,
            )

        def smtp_factory() -> DeliveryProtocol:
            return SmtpProtocol(
                smtp,
                data_size_limit=size,
                hostname=hostname,
                ident="pobox ESMTP",
                timeout=_TIMEOUT,
                loop=loop,
            )

        policy = ProxyPolicy.from_config(config)

        def lmtp_gate() -> asyncio.BaseProtocol:
            return ProxyGate(policy, lmtp_factory, log=logger, service="lmtp")

        try:
            for text in config.lmtp_listen:
                await self._listen("lmtp", text, lmtp_gate)
            for text in config.smtp_listen:
                await self._listen("smtp", text, smtp_factory)
        except BaseException:
            await self.aclose()
            raise
        for protocol, address in self.addresses:
            logger.info("delivery: %s listening on %s", protocol, address)

    async def _listen(
        self, protocol: str, text: str, factory: Callable[[], asyncio.BaseProtocol]
    ) -> None:
        """Start one server on ``text`` (``HOST:PORT`` or ``unix:/path``)."""
        loop = asyncio.get_running_loop()
        if text.startswith(_UNIX_PREFIX):
            path = Path(text[len(_UNIX_PREFIX) :])
            _remove_stale_socket(path)
            server = await loop.create_unix_server(factory, path)
            self._unix_paths.append(path)
        else:
            listen = parse_listen(text, key=f"{protocol}_listen")
            server = await loop.create_server(factory, listen.host, listen.port)
        self._servers.append((protocol, server))

    async def aclose(self) -> None:
        """Stop listening; connections still open finish on their own."""
        servers, self._servers = self._servers, []
        for _, server in servers:
            server.close()
        # From Python 3.12 wait_closed() also waits for open connections, which an MTA may
        # keep idle for minutes: wait a little, then leave them to the loop's shutdown (a
        # delivery not yet acknowledged is sent again by the MTA: a duplicate, never a loss).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(server.wait_closed() for _, server in servers)),
                _CLOSE_GRACE,
            )
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        self._unix_paths.clear()


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket file left at ``path``; refuse to remove anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        msg = f"unix socket path {path} exists and is not a socket"
        raise ConfigError(msg)
    path.unlink()
