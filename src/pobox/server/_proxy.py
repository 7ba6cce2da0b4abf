"""The PROXY protocol at the listeners: who may send a header, reading it, what it changes.

Behind HAProxy in TCP mode (``send-proxy``, ``send-proxy-v2``) every connection comes from
HAProxy, and its first bytes are a header naming the real client (:mod:`pobox.proxy`).  pobox
follows Dovecot's ``haproxy_trusted_networks``, decided per connection by the socket's peer:

- From a trusted network the header is **mandatory**, within ``haproxy_timeout`` seconds
  (Dovecot's default, 3): a missing, late or invalid header closes the connection, logged
  the way Dovecot logs it (``haproxy: Client timed out (rip=...)``, ``haproxy(v2): Client
  disconnected: ... (rip=...)``).  A valid one makes its addresses the session's
  (:class:`Origin`): ``rip``/``lip`` in the log, fail2ban, throttling, the per-address
  connection caps and the plaintext policy all see the real client, never HAProxy.  A v2
  ``LOCAL`` header (HAProxy's health checks), v1 ``UNKNOWN`` and v2 AF_UNSPEC/AF_UNIX keep
  the connection's own addresses, as the specification asks.
- From anywhere else no header is expected and none is believed: a client that starts with
  one is refused and logged (``haproxy: Client not trusted, PROXY header refused``); a client
  that sends none is served as always.  With the default empty list no connection is trusted.

TLS done by HAProxy (``send-proxy-v2-ssl``): a header whose PP2_TYPE_SSL TLV has the
client-SSL flag makes the session secure (plaintext logins allowed, no STLS), as Dovecot does
(``haproxy_terminated_tls``); with ``send-proxy-v2-ssl-cn`` SASL EXTERNAL logs in as the
certificate's CN, but only when HAProxy says it verified that certificate (see
:attr:`pobox.proxy.SslInfo.verified_cn`).  Those TLVs, like the header, are believed only from
trusted networks.

Three readers drive the same sans-IO parser: :func:`receive_origin` over any ``recv(n)``
coroutine (a plain listener's StreamReader, an implicit-TLS listener's raw socket before TLS),
and :class:`ProxyGate`, a protocol placed in front of the LMTP listener's aiosmtpd protocol.
They read at most :attr:`~pobox.proxy.ProxyHeaderParser.wanted` octets at a time, so no byte
of a TLS ClientHello after the header is ever taken.

May import: the standard library, :mod:`pobox.proxy`, :mod:`pobox._logevents` and
:mod:`pobox.config`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from pobox import _logevents as events
from pobox.config import Config
from pobox.proxy import (
    NEED_DATA,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    starts_like_header,
)

__all__ = [
    "HeaderNotReceived",
    "Origin",
    "ProxiedTransport",
    "ProxyGate",
    "ProxyPolicy",
    "log_header_failure",
    "log_header_refused",
    "read_header",
    "receive_origin",
]

#: What a gate reads at once from an untrusted connection's first bytes.
_FIRST_READ: Final = 64 * 1024

Address = tuple[str, int]


class HeaderNotReceived(Exception):
    """A trusted peer closed the connection, or went quiet, before its header was complete."""

    def __init__(self, *, timed_out: bool) -> None:
        super().__init__("Client timed out" if timed_out else "Client disconnected")
        self.timed_out = timed_out


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return ``address`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or ``None``."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyPolicy:
    """Who may send a PROXY header (``haproxy_trusted_networks``) and how long it may take.

    Args:
        networks: CIDR networks of the proxies; empty: PROXY headers are never accepted.
        timeout: seconds a trusted peer has to send its whole header (``haproxy_timeout``).
    """

    def __init__(self, networks: Iterable[str], timeout: float) -> None:
        self.networks = tuple(ipaddress.ip_network(net, strict=False) for net in networks)
        self.timeout = timeout

    @classmethod
    def from_config(cls, config: Config) -> ProxyPolicy:
        """Return the policy ``config`` sets."""
        return cls(config.haproxy_trusted_networks, config.haproxy_timeout)

    def trusts(self, address: str) -> bool:
        """Whether a connection from ``address`` must start with a PROXY header.

        Loopback is not trusted unless listed: a local user's connection must never be
        able to claim another address.
        """
        if not self.networks:
            return False
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.networks)


def _plain(address: str) -> str:
    """Return ``address`` with an IPv4-mapped IPv6 address shown as IPv4."""
    ip = _ip(address)
    return str(ip) if ip is not None else address


@dataclass(frozen=True, slots=True)
class Origin:
    """Who a proxied connection is from: the client's addresses and HAProxy's.

    Names follow Dovecot's: ``rip``/``lip`` are the client's address and the one it connected
    to (on HAProxy); ``real_rip``/``real_lip`` are this socket's ends (HAProxy and pobox).
    """

    rip: str
    rport: int
    lip: str
    lport: int
    real_rip: str
    real_rport: int
    real_lip: str
    real_lport: int
    header: ProxyHeader

    @classmethod
    def of(cls, header: ProxyHeader, peer: Any, sock: Any) -> Origin:  # noqa: ANN401
        """Combine ``header`` with the socket's ``peer`` and ``sock`` names."""
        real_rip, real_rport = _host_port(peer)
        real_lip, real_lport = _host_port(sock)
        rip, rport = header.source or (real_rip, real_rport)
        lip, lport = header.destination or (real_lip, real_lport)
        rip, lip = _plain(rip), _plain(lip)
        return cls(rip, rport, lip, lport, real_rip, real_rport, real_lip, real_lport, header)

    @property
    def secure(self) -> bool:
        """Whether HAProxy says the client reached it over TLS (PP2_CLIENT_SSL)."""
        ssl = self.header.ssl
        return ssl is not None and ssl.client_ssl

    @property
    def tls_identity(self) -> str | None:
        """The client certificate's CN, if HAProxy says it verified the certificate."""
        ssl = self.header.ssl
        return ssl.verified_cn if ssl is not None else None

    def describe(self) -> str:
        """Return the addresses for a log line, in Dovecot's names."""
        header = self.header
        if header.command == "LOCAL":
            return f"LOCAL (health check), rip={self.real_rip}, lip={self.real_lip}"
        tls = ", TLS (haproxy)" if self.secure else ""
        return (
            f"PROXY v{header.version}: rip={self.rip}, rport={self.rport}, lip={self.lip}, "
            f"lport={self.lport}, real_rip={self.real_rip}, real_rport={self.real_rport}, "
            f"real_lip={self.real_lip}, real_lport={self.real_lport}{tls}"
        )


def _host_port(name: Any) -> Address:  # noqa: ANN401 - what get_extra_info returns
    """Return ``(host, port)`` of a socket name (``("unknown", 0)`` if it has none)."""
    if isinstance(name, tuple) and len(name) >= 2:
        return _plain(str(name[0])), int(name[1])
    return "unknown", 0


async def read_header(recv: Callable[[int], Awaitable[bytes]], timeout: float) -> ProxyHeader:
    """Read one PROXY header with ``recv(n)``, never asking for a byte past it.

    Raises:
        ProxyHeaderError: the bytes are no valid header.
        HeaderNotReceived: the peer closed first, or ``timeout`` seconds passed.
    """
    parser = ProxyHeaderParser()
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await recv(parser.wanted)
                if not data:
                    raise HeaderNotReceived(timed_out=False)
                result = parser.feed(data)
                if result is not NEED_DATA:
                    assert isinstance(result, ProxyHeader)
                    return result
    except TimeoutError:
        raise HeaderNotReceived(timed_out=True) from None
    except OSError:  # reset by the peer
        raise HeaderNotReceived(timed_out=False) from None


def log_header_failure(
    log: logging.Logger, service: str, exc: ProxyHeaderError | HeaderNotReceived, rip: str
) -> None:
    """Log why a trusted peer's header was not accepted, in Dovecot's words."""
    if isinstance(exc, HeaderNotReceived):
        events.proxy_header_failed(log, service, rip, reason=None, timed_out=exc.timed_out)
    else:
        events.proxy_header_failed(log, service, rip, reason=exc.reason, version=exc.version)


def log_header_refused(log: logging.Logger, service: str, rip: str, lip: str) -> None:
    """Log a PROXY header from a peer not in ``haproxy_trusted_networks``."""
    events.proxy_header_refused(log, service, rip, lip)


async def receive_origin(
    policy: ProxyPolicy,
    recv: Callable[[int], Awaitable[bytes]],
    peer: Any,  # noqa: ANN401 - a socket name
    sock: Any,  # noqa: ANN401
    *,
    log: logging.Logger,
    service: str,
) -> Origin | None:
    """Read the header a trusted peer must send; ``None`` (logged) if it sent no valid one."""
    try:
        header = await read_header(recv, policy.timeout)
    except (ProxyHeaderError, HeaderNotReceived) as exc:
        log_header_failure(log, service, exc, _host_port(peer)[0])
        return None
    return Origin.of(header, peer, sock)


class ProxiedTransport(asyncio.Transport):
    """A transport that shows the client's addresses (:class:`Origin`) as its own.

    For a protocol that takes its peer from ``get_extra_info("peername")`` (aiosmtpd's
    ``session.peer``); everything else is the wrapped transport's.  ``get_extra_info
    ("proxy_origin")`` returns the :class:`Origin`.  Not for STARTTLS: ``loop.start_tls``
    wants the event loop's own transport.
    """

    def __init__(self, transport: asyncio.Transport, origin: Origin) -> None:
        super().__init__()
        self._transport = transport
        self._shown = {
            "peername": (origin.rip, origin.rport),
            "sockname": (origin.lip, origin.lport),
            "proxy_origin": origin,
        }

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        """Return the client's names for peername/sockname, else the transport's."""
        if name in self._shown:
            return self._shown[name]
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        """Whether the connection is closing or closed."""
        return self._transport.is_closing()

    def close(self) -> None:
        """Close the connection once buffered data is sent."""
        self._transport.close()

    def abort(self) -> None:
        """Close the connection at once."""
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Give the connection's events to ``protocol``."""
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """Return the protocol getting the connection's events."""
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        """Whether the transport is reading."""
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading`."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the flow-control marks of the write buffer."""
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        """Return the octets waiting to be sent."""
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """Return the flow-control marks of the write buffer."""
        return self._transport.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``."""
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Send each of ``list_of_data``."""
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        """Close the sending side once buffered data is sent."""
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        """Whether :meth:`write_eof` is possible."""
        return self._transport.can_write_eof()


class ProxyGate(asyncio.BufferedProtocol):
    """The first moments of a connection to a server-speaks-first protocol (LMTP).

    From a trusted peer it reads the PROXY header (at most :attr:`~pobox.proxy.
    ProxyHeaderParser.wanted` octets at a time, within ``haproxy_timeout``) and then starts
    the protocol on a :class:`ProxiedTransport` showing the client's addresses.  From anyone
    else it starts the protocol at once and looks at the client's first bytes only: a PROXY
    header there closes the connection, logged; anything else goes on to the protocol, which
    gets every later event from the transport directly.

    Args:
        policy: who may send a header.
        factory: makes the protocol that serves the connection.
        log: where refusals and accepted headers are logged.
        service: the log prefix (``lmtp``).
    """

    def __init__(
        self,
        policy: ProxyPolicy,
        factory: Callable[[], asyncio.Protocol],
        *,
        log: logging.Logger,
        service: str,
    ) -> None:
        self._policy = policy
        self._factory = factory
        self._log = log
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None
        self._parser: ProxyHeaderParser | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buffer = bytearray(_FIRST_READ)
        self._rip = self._lip = "unknown"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wait for the header of a trusted peer; serve anyone else at once."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        self._rip = _host_port(peer)[0]
        self._lip = _host_port(transport.get_extra_info("sockname"))[0]
        if isinstance(peer, tuple) and self._policy.trusts(self._rip):
            self._parser = ProxyHeaderParser()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._policy.timeout, self._timed_out)
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Give room for what may be read: never past a header."""
        size = self._parser.wanted if self._parser is not None else _FIRST_READ
        return memoryview(self._buffer)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        """Take what was read: header bytes, or an untrusted client's first bytes."""
        data = bytes(self._buffer[:nbytes])
        if self._parser is not None:
            self._header_bytes(self._parser, data)
            return
        self._first_bytes(data)

    def _header_bytes(self, parser: ProxyHeaderParser, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            header = parser.feed(data)
        except ProxyHeaderError as exc:
            log_header_failure(self._log, self._service, exc, self._rip)
            self._stop()
            transport.abort()
            return
        if header is NEED_DATA:
            return
        assert isinstance(header, ProxyHeader)
        self._stop()
        origin = Origin.of(
            header, transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        )
        log = self._log.debug if header.command == "LOCAL" else self._log.info
        log("%s: haproxy: Client connected: %s", self._service, origin.describe())
        inner = self._inner = self._factory()
        transport.set_protocol(inner)
        inner.connection_made(ProxiedTransport(transport, origin))
        if parser.rest:
            inner.data_received(parser.rest)

    def _first_bytes(self, data: bytes) -> None:
        transport, inner = self._transport, self._inner
        assert transport is not None
        assert inner is not None
        transport.set_protocol(inner)
        if starts_like_header(data):
            log_header_refused(self._log, self._service, self._rip, self._lip)
            transport.abort()
            return
        inner.data_received(data)

    def _timed_out(self) -> None:
        self._timer = None
        log_header_failure(self._log, self._service, HeaderNotReceived(timed_out=True), self._rip)
        self._stop()
        if self._transport is not None:
            self._transport.abort()

    def _stop(self) -> None:
        """Stop waiting for a header."""
        self._parser = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        """Pass the end of the client's stream on (before its header: close)."""
        if self._inner is None:
            if self._parser is not None:
                exc = HeaderNotReceived(timed_out=False)
                log_header_failure(self._log, self._service, exc, self._rip)
            self._stop()
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Pass the end of the connection on."""
        self._stop()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.resume_writing()
