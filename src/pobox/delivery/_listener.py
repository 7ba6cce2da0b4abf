"""The delivery listeners: LMTP and SMTP servers on TCP addresses and Unix sockets.

:class:`DeliveryServer` starts one asyncio server per configured address (``lmtp_listen``,
``smtp_listen``), each connection served by a fresh aiosmtpd protocol object, and closes them
again. A ``unix:/path`` address is a Unix socket; a stale socket file left by a crashed
server is replaced, any other file at that path is an error.

Each protocol has its own connection caps, so an SMTP flood from the network never takes
the MTA's LMTP slots (and neither touches POP3's): ``smtp_max_connections`` and
``lmtp_max_connections`` in all, Unix socket connections included, and
``*_max_connections_per_ip`` from one address. A connection over a cap gets ``421 4.3.2``
(in all: the system is not accepting network messages) or ``421 4.7.0`` (from one address)
and is closed before aiosmtpd sees it: a small :class:`asyncio.Protocol` counts it at the
door and hands the transport's events on to the protocol serving it.

LMTP connections pass a :class:`~pobox.server._proxy.ProxyGate` first: from
``haproxy_trusted_networks`` it reads the PROXY header and gives the door (and aiosmtpd) a
transport showing the real client, so the per-address caps count the real client; from
elsewhere it refuses a header (aiosmtpd is not changed).

May import: the standard library, aiosmtpd, :mod:`pobox.config`, :mod:`pobox.delivery`,
:mod:`pobox.server._limits` (the connection caps POP3 uses too), :mod:`pobox.server._proxy` and
:mod:`pobox._logevents`, :mod:`pobox.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from pobox import _logevents as events
from pobox.binding import binding
from pobox.config import Config, parse_listen
from pobox.delivery._agent import DeliveryAgent
from pobox.delivery._protocol import DeliveryLimits, DeliveryProtocol
from pobox.delivery.lmtp import LmtpHandler, LmtpProtocol
from pobox.delivery.smtp import SmtpHandler, SmtpProtocol
from pobox.errors import ConfigError
from pobox.metrics import Metrics
from pobox.server import _inherit
from pobox.server._limits import IN_ALL, ConnectionLimits
from pobox.server._proxy import ProxyGate, ProxyPolicy

__all__ = ["DeliveryServer"]

logger = logging.getLogger(__name__)

_UNIX_PREFIX = "unix:"
#: Seconds :meth:`DeliveryServer.aclose` waits for the listeners to close.
_CLOSE_GRACE = 5.0
#: Connections the kernel may queue before pobox accepts them (as the POP3 listener).
_BACKLOG: Final = 1024


@dataclass(frozen=True, slots=True)
class _Door:
    """What the connections of one protocol share: its caps and its protocol factory."""

    name: str
    hostname: str
    limits: ConnectionLimits
    factory: Callable[[], DeliveryProtocol]
    #: The connections being served (for :meth:`DeliveryServer.stop_connections`).
    gates: set[_Gate] = field(default_factory=set, compare=False)
    #: Where connections are counted (``metrics_listen``; none: they are not).
    metrics: Metrics | None = None

    def refuse(self, transport: asyncio.Transport, which: str, address: str | None) -> None:
        """Answer a connection over a cap with ``421`` and close it."""
        rip = address or "local"
        events.too_many_connections(logger, self.name, which, rip)
        if which == IN_ALL:
            reply = f"421 4.3.2 {self.hostname} Error: too many connections, try again later"
        else:
            reply = f"421 4.7.0 {self.hostname} Error: too many connections from {rip}"
        transport.write(reply.encode() + b"\r\n")
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


class _Gate(asyncio.Protocol):
    """One connection at the door: counted against the caps, then served or refused."""

    def __init__(self, door: _Door) -> None:
        self._door = door
        self._inner: DeliveryProtocol | None = None
        self._address: str | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection and start its protocol, or refuse it."""
        peer = transport.get_extra_info("peername")
        # A TCP peer is (host, port, ...); a Unix socket's is a path, often empty.
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        metrics = self._door.metrics
        if metrics is not None:
            metrics.connected(self._door.name)
        which = self._door.limits.admit(self._address)
        if which is not None:
            self._door.refuse(cast("asyncio.Transport", transport), which, self._address)
            return
        self._inner = self._door.factory()
        self._transport = cast("asyncio.Transport", transport)
        self._door.gates.add(self)
        self._inner.connection_made(transport)

    @property
    def busy(self) -> bool:
        """Whether a message is on its way (between MAIL and the reply to its DATA)."""
        envelope = getattr(self._inner, "envelope", None)
        return envelope is not None and envelope.mail_from is not None

    def shut_down(self) -> None:
        """Say ``421 4.3.2`` and close (drain deadline): the MTA delivers again later.

        A message whose ``250`` was not sent may be delivered twice, never lost.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        hostname = self._door.hostname
        transport.write(f"421 4.3.2 {hostname} Service shutting down, try again later\r\n".encode())
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        """Pass the bytes on (a refused connection's are dropped)."""
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the end of the client's stream on."""
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """End the protocol and give the slot back."""
        if self._inner is None:
            return
        try:
            self._inner.connection_lost(exc)
        finally:
            self._inner = None
            self._transport = None
            self._door.gates.discard(self)
            self._door.limits.release(self._address)


class DeliveryServer:
    """The LMTP and SMTP listeners of one configuration."""

    def __init__(self, config: Config, agent: DeliveryAgent) -> None:
        """Prepare listeners for ``config``'s ``lmtp_listen`` and ``smtp_listen``."""
        self._config = config
        self._agent = agent
        self._servers: list[tuple[str, asyncio.Server]] = []
        self._unix_paths: list[Path] = []
        self._doors: list[_Door] = []

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
            ListenError: an address cannot be bound, naming its key.
        """
        config = self._config
        size = config.max_message_size or None
        hostname = config.hostname or socket.gethostname()
        lmtp = LmtpHandler(self._agent)
        smtp = SmtpHandler(self._agent)
        limits = DeliveryLimits.from_config(config)
        loop = asyncio.get_running_loop()

        def lmtp_factory() -> DeliveryProtocol:
            return LmtpProtocol(
                lmtp,
                limits=limits,
                data_size_limit=size,
                hostname=hostname,
                ident="pobox LMTP",
                loop=loop,
            )

        def smtp_factory() -> DeliveryProtocol:
            return SmtpProtocol(
                smtp,
                limits=limits,
                data_size_limit=size,
                hostname=hostname,
                ident="pobox ESMTP",
                loop=loop,
            )

        lmtp_door = _Door(
            "lmtp",
            hostname,
            ConnectionLimits(config.lmtp_max_connections, config.lmtp_max_connections_per_ip),
            lmtp_factory,
            metrics=self._agent.metrics,
        )
        smtp_door = _Door(
            "smtp",
            hostname,
            ConnectionLimits(config.smtp_max_connections, config.smtp_max_connections_per_ip),
            smtp_factory,
            metrics=self._agent.metrics,
        )
        policy = ProxyPolicy.from_config(config)
        self._doors = [lmtp_door, smtp_door]
        try:
            for text in config.lmtp_listen:
                await self._listen(lmtp_door, text, policy)
            for text in config.smtp_listen:
                await self._listen(smtp_door, text)
        except BaseException:
            await self.aclose()
            raise
        for protocol, address in self.addresses:
            logger.info("delivery: %s listening on %s", protocol, address)

    async def _listen(self, door: _Door, text: str, policy: ProxyPolicy | None = None) -> None:
        """Start one server on ``text`` (``HOST:PORT`` or ``unix:/path``).

        With a ``policy`` (LMTP), each connection passes a PROXY-protocol gate first.
        """

        def gate() -> asyncio.BaseProtocol:
            if policy is not None:
                return ProxyGate(policy, lambda: _Gate(door), log=logger, service=door.name)
            return _Gate(door)

        with binding(f"{door.name}_listen", text):
            await self._bind(door, text, gate)

    async def _bind(self, door: _Door, text: str, gate: Callable[[], asyncio.BaseProtocol]) -> None:
        loop = asyncio.get_running_loop()
        inherited = _inherit.take(_inherit.key(door.name, text))
        if inherited is not None:  # a worker: the master bound it, and removes a socket file
            for sock in inherited:
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(gate, sock=sock, backlog=_BACKLOG)
                else:
                    server = await loop.create_server(gate, sock=sock, backlog=_BACKLOG)
                self._servers.append((door.name, server))
            return
        if text.startswith(_UNIX_PREFIX):
            path = Path(text[len(_UNIX_PREFIX) :])
            _remove_stale_socket(path)
            server = await loop.create_unix_server(gate, path, backlog=_BACKLOG)
            self._unix_paths.append(path)
        else:
            listen = parse_listen(text, key=f"{door.name}_listen")
            server = await loop.create_server(gate, listen.host, listen.port, backlog=_BACKLOG)
        self._servers.append((door.name, server))

    @property
    def connection_count(self) -> int:
        """How many LMTP and SMTP connections are being served."""
        return sum(len(door.gates) for door in self._doors)

    @property
    def busy_count(self) -> int:
        """How many of them are delivering a message now (a drain waits for these)."""
        return sum(gate.busy for door in self._doors for gate in door.gates)

    def stop_accepting(self) -> None:
        """Close the listening sockets (SIGTERM); open connections go on."""
        for _, server in self._servers:
            server.close()

    def stop_connections(self) -> None:
        """Close every open connection with ``421 4.3.2`` (the end of a drain).

        An MTA keeps idle connections open for its next message; a connection delivering
        one at the drain deadline gets it too (the MTA sends the message again).
        """
        for door in self._doors:
            for gate in list(door.gates):
                gate.shut_down()

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
