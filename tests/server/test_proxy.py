"""The PROXY protocol at pobox's listeners, with hand-made headers from loopback addresses.

The trusted "HAProxy" is 127.0.0.1 (``haproxy_trusted_networks = ["127.0.0.1/32"]``); other
loopback addresses (127.0.0.2, ...) are strangers.  Real HAProxy is in
``tests/integration/test_haproxy.py``.
"""

# Expected value first (STYLE.md §3.11), which SIM300 calls a Yoda condition.

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pobox.config import KEYS, build_config
from pobox.errors import ConfigError
from pobox.proxy import ProxyHeaderParser
from pobox.server._proxy import Origin, ProxiedTransport, ProxyPolicy
from pobox.testing import RunningServer, running_server
from tests.delivery.helpers import maildir_files, running_pobox
from tests.integration.wire import Wire
from tests.proxy import build
from tests.tls.helpers import Pki

HAPROXY = "127.0.0.1"
STRANGER = "127.0.0.2"
CLIENT = "203.0.113.7"

V1 = build.v1("TCP4", CLIENT, "192.0.2.1", 50123, 110)
V2 = build.v2_tcp(CLIENT, "192.0.2.1", 50123, 110)


def v2_ssl(client: int, verify: int = 0, cn: str = "alice", src: str = CLIENT) -> bytes:
    """A v2 header from ``src`` with HAProxy's SSL TLV (send-proxy-v2-ssl-cn)."""
    tlvs = build.ssl_tlv(client, verify, version="TLSv1.3", cn=cn)
    return build.v2_tcp(src, "192.0.2.1", 50123, 995, tlvs)


async def connect(host: str, port: int, source: str, header: bytes = b"") -> Wire:
    """Connect from ``source`` and send ``header`` first."""
    wire = Wire(*await asyncio.open_connection(host, port, local_addr=(source, 0)))
    if header:
        await wire.send(header)
    return wire


async def login(wire: Wire, user: bytes = b"alice") -> bytes:
    """Read the greeting, then USER/PASS; return the PASS reply."""
    assert (await wire.line()).startswith(b"+OK")
    await wire.command(b"USER " + user)
    return await wire.command(b"PASS secret")


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every line pobox logged so far."""
    return [r.getMessage() for r in caplog.records]


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The log lines containing ``text``."""
    return [line for line in log_lines(caplog) if text in line]


async def until_logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """Wait (up to 5 s) for a log line containing ``text``; return those lines."""
    async with asyncio.timeout(5):
        while not logged(caplog, text):
            await asyncio.sleep(0.01)
    return logged(caplog, text)


Factory = Callable[..., AbstractAsyncContextManager[RunningServer]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and a certificate for localhost."""
    return Pki.create(tmp_path / "pki", "localhost")


@pytest.fixture
def server(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> Callable[..., AbstractAsyncContextManager[RunningServer]]:
    """Start a pobox trusting 127.0.0.1 as HAProxy, with TLS; settings override."""
    caplog.set_level(logging.DEBUG, logger="pobox")

    @asynccontextmanager
    async def start(**settings: Any) -> AsyncIterator[RunningServer]:
        values: dict[str, Any] = {
            "haproxy_trusted_networks": [f"{HAPROXY}/32"],
            "haproxy_timeout": 1,
            "ssl_listen": ["127.0.0.1:0"],
            "disable_plaintext_auth": "no",
            "auth_mechanisms": "PLAIN EXTERNAL",
            **pki.settings,
            **settings,
        }
        async with running_server(
            tmp_path / "srv", {"alice": "secret", "bob": "secret"}, **values
        ) as srv:
            yield srv

    return start


class TestTrustedProxy:
    """A connection from haproxy_trusted_networks: its header names the client."""

    @pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
    async def test_real_address_in_log(self, server: Factory, caplog, header):
        """The client's address, not HAProxy's, is rip=/lip= in the Login line."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, header)
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert [
            f"pop3-login: Login: user=<alice>, method=PLAIN, rip={CLIENT}, lip=192.0.2.1, "
        ] == [line[: line.index("session=")] for line in logged(caplog, "Login: ")]

    async def test_connection_line_names_haproxy(self, server: Factory, caplog):
        """One line per proxied connection names both ends, Dovecot's real_rip for HAProxy."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V2)
            await wire.line()
            lines = await until_logged(caplog, "haproxy: Client connected")

        expected = (
            f"pop3-login: haproxy: Client connected: PROXY v2: rip={CLIENT}, rport=50123, "
            f"lip=192.0.2.1, lport=110, real_rip={HAPROXY}, real_rport="
        )
        assert [expected] == [line[: len(expected)] for line in lines]

    async def test_ipv6_client(self, server: Factory, caplog):
        """An IPv6 client's address is logged as the header gives it."""
        async with server() as srv:
            wire = await connect(
                srv.host, srv.port, HAPROXY, build.v2_tcp("2001:db8::7", "2001:db8::1", 1, 110)
            )
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert 1 == len(logged(caplog, "rip=2001:db8::7, lip=2001:db8::1, session="))

    async def test_ipv4_mapped_client(self, server: Factory, caplog):
        """An IPv4 client that HAProxy saw on an IPv6 socket is logged as IPv4."""
        header = build.v2_tcp("::ffff:203.0.113.9", "::ffff:192.0.2.1", 1, 110)
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, header)
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert 1 == len(logged(caplog, "rip=203.0.113.9, lip=192.0.2.1, session="))

    @pytest.mark.parametrize(
        "header",
        [build.v2(0), build.v1("UNKNOWN"), build.v2(1, 0x00)],
        ids=["local", "unknown", "unspec"],
    )
    async def test_connection_addresses_kept(self, server: Factory, caplog, header):
        """LOCAL (health checks), UNKNOWN and AF_UNSPEC keep the socket's own addresses."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, header)
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert 1 == len(logged(caplog, f"PLAIN, rip={HAPROXY}, lip=127.0.0.1, session="))

    async def test_client_bytes_after_the_header(self, server: Factory):
        """What the client sent right behind the header is its first command."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V1 + b"USER alice\r\n")

            assert (await wire.line()).startswith(b"+OK pobox ready.")
            assert b"+OK\r\n" == await wire.line()

    async def test_header_one_octet_at_a_time(self, server: Factory, caplog):
        """A header that trickles in octet by octet is still read whole."""
        async with server(haproxy_timeout=30) as srv:  # ~50 sends: seconds on a loaded machine
            wire = await connect(srv.host, srv.port, HAPROXY)
            for i in range(len(V1)):
                await wire.send(V1[i : i + 1])
                await asyncio.sleep(0.001)
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert 1 == len(logged(caplog, f"rip={CLIENT}, lip=192.0.2.1, session="))


class TestTrustedProxyWithoutHeader:
    """From a trusted network the header is mandatory (Dovecot's haproxy=yes listeners)."""

    async def test_times_out(self, server: Factory, caplog):
        """No header within haproxy_timeout: closed without a greeting, logged."""
        async with server(haproxy_timeout=0.2) as srv:
            wire = await connect(srv.host, srv.port, HAPROXY)

            assert b"" == await wire.read_all()

        assert [f"pop3-login: haproxy: Client timed out (rip={HAPROXY})"] == logged(
            caplog, "timed out"
        )

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"USER alice\r\n", "haproxy: Client disconnected: No valid proxy header found"),
            (build.v2(2), "haproxy(v2): Client disconnected: Invalid command (cmd=02)"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "haproxy(v1): Client disconnected: Header"),
        ],
    )
    async def test_invalid(self, server: Factory, caplog, data, reason):
        """Anything but a valid header: closed without a greeting, logged with the reason."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, data)

            assert b"" == await wire.read_all()

        assert 1 == len(logged(caplog, f"pop3-login: {reason}"))
        assert [] == logged(caplog, "Disconnected (no auth")  # no session was started

    async def test_closed_before_header(self, server: Factory, caplog):
        """A peer that closes before its header ends is logged as disconnected."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V1[:10])
            await wire.close()
            lines = await until_logged(caplog, "haproxy: Client disconnected")

        assert [f"pop3-login: haproxy: Client disconnected (rip={HAPROXY})"] == lines


class TestRealAddressEverywhere:
    """The caps, the throttle and the plaintext policy see the client, not HAProxy."""

    async def test_caps_per_real_address(self, server: Factory, caplog):
        """max_connections_per_ip counts each client behind HAProxy on its own."""
        async with server(max_connections_per_ip=1) as srv:
            first = await connect(srv.host, srv.port, HAPROXY, V2)
            assert (await first.line()).startswith(b"+OK")
            other = await connect(
                srv.host, srv.port, HAPROXY, build.v2_tcp("203.0.113.8", "192.0.2.1", 1, 110)
            )
            same = await connect(srv.host, srv.port, HAPROXY, V2)

            assert (await other.line()).startswith(b"+OK")
            assert b"-ERR [SYS/TEMP] Too many connections, try later.\r\n" == await same.line()

        expected = f"master: Too many connections from {CLIENT}, refusing rip={CLIENT}"
        assert [expected] == logged(caplog, "Too many connections")

    async def test_throttle_per_real_address(self, server: Factory):
        """Failed logins slow down the client that failed, not all of HAProxy's clients."""
        async with server(auth_failures_per_ip=1) as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V2)
            assert (await wire.line()).startswith(b"+OK")
            await wire.command(b"USER alice")
            assert b"-ERR [AUTH] Authentication failed.\r\n" == await wire.command(b"PASS wrong")
            await wire.command(b"USER alice")

            assert (await wire.command(b"PASS secret")).startswith(b"-ERR [LOGIN-DELAY]")
            other = await connect(
                srv.host, srv.port, HAPROXY, build.v2_tcp("203.0.113.8", "192.0.2.1", 1, 110)
            )
            assert b"+OK Logged in.\r\n" == await login(other)

    @pytest.mark.parametrize(
        ("source", "expected"),
        [(CLIENT, b"-ERR [AUTH] Plaintext authentication disallowed"), ("127.0.0.9", b"+OK\r\n")],
    )
    async def test_plaintext_policy(self, server: Factory, source, expected):
        """disable_plaintext_auth = loopback judges the client's address, never HAProxy's."""
        header = build.v2_tcp(source, "192.0.2.1", 1, 110)
        async with server(disable_plaintext_auth="loopback") as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, header)
            await wire.line()

            assert (await wire.command(b"USER alice")).startswith(expected)


class TestTlsAtHaproxy:
    """send-proxy-v2-ssl(-cn): HAProxy did the TLS and says so in its header."""

    async def test_secure(self, server: Factory):
        """A client that reached HAProxy over TLS may log in in plaintext; no STLS offered."""
        async with server(disable_plaintext_auth="yes") as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, v2_ssl(build.CLIENT_SSL))
            await wire.line()
            await wire.send(b"CAPA\r\n")
            capa = await wire.multiline()

            assert (b"USER" in capa.split(b"\r\n"), b"STLS" in capa.split(b"\r\n")) == (True, False)
            assert b"-ERR Already using TLS.\r\n" == await wire.command(b"STLS")
            assert b"+OK\r\n" == await wire.command(b"USER alice")

    @pytest.mark.parametrize(
        ("header", "element"),
        [
            (v2_ssl(build.CLIENT_SSL), "TLS (haproxy, TLSv1.3), "),
            (build.v2_tcp(CLIENT, "192.0.2.1", 50123, 995, build.ssl_tlv(1)), "TLS (haproxy), "),
            (v2_ssl(0), ""),
        ],
        ids=["version", "no-version", "no-tls"],
    )
    async def test_login_line_says_tls(self, server: Factory, caplog, header, element):
        """The Login line says HAProxy's TLS and its version, and nothing without the flag."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, header)
            assert b"+OK Logged in.\r\n" == await login(wire)

        assert [f"rip={CLIENT}, lip=192.0.2.1, {element}session=<"] == [
            line[line.index("rip=") : line.index("session=<") + 9]
            for line in logged(caplog, "Login: ")
        ]

    async def test_not_secure_without_the_flag(self, server: Factory):
        """An SSL TLV without PP2_CLIENT_SSL is no TLS: STLS offered, plaintext refused."""
        async with server(disable_plaintext_auth="yes") as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, v2_ssl(0))
            await wire.line()
            await wire.send(b"CAPA\r\n")
            capa = await wire.multiline()

            assert (b"USER" in capa.split(b"\r\n"), b"STLS" in capa.split(b"\r\n")) == (False, True)

    async def test_external_with_verified_cn(self, server: Factory, caplog):
        """SASL EXTERNAL logs in as the CN HAProxy verified."""
        flags = build.CLIENT_SSL | build.CERT_CONN | build.CERT_SESS
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, v2_ssl(flags))
            await wire.line()

            assert b"+OK Logged in.\r\n" == await wire.command(b"AUTH EXTERNAL =")
        assert 1 == len(logged(caplog, f"Login: user=<alice>, method=EXTERNAL, rip={CLIENT},"))

    @pytest.mark.parametrize(
        ("flags", "verify"),
        [(build.CLIENT_SSL, 0), (build.CLIENT_SSL | build.CERT_CONN, 20), (build.CERT_CONN, 0)],
        ids=["no-certificate", "not-verified", "not-tls"],
    )
    async def test_external_refused(self, server: Factory, flags, verify):
        """No certificate, a failed verification, or no TLS: EXTERNAL names no one."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, v2_ssl(flags, verify))
            await wire.line()

            assert (await wire.command(b"AUTH EXTERNAL =")).startswith(b"-ERR")

    async def test_external_own_certificate_ignored(self, server: Factory, pki: Pki, tmp_path):
        """When HAProxy did the TLS, a certificate on pobox's own TLS hop does not count."""
        client_cert = pki.ca.issue_cert("bob", common_name="bob")
        client_pem = tmp_path / "bob.pem"
        client_cert.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
        ctx = pki.client_context()
        ctx.load_cert_chain(str(client_pem))
        async with server(ssl_client_ca=str(pki.ca_pem)) as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await tls_connect(srv.host, port, HAPROXY, v2_ssl(build.CLIENT_SSL), ctx)
            await wire.line()

            assert (await wire.command(b"AUTH EXTERNAL =")).startswith(b"-ERR")


async def tls_connect(
    host: str, port: int, source: str, header: bytes, ctx: ssl.SSLContext
) -> Wire:
    """Connect from ``source``, send ``header``, then start TLS on the same connection.

    The header goes with MSG_MORE, so the kernel sends it in one segment with the
    ClientHello, as HAProxy does: a server that read past the header would break TLS.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    if header:
        sock.send(header, socket.MSG_MORE)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
    return Wire(reader, writer)


class TestImplicitTls:
    """ssl_listen behind HAProxy in TCP mode: the header, then TLS with the client."""

    @pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
    async def test_header_then_tls(self, server: Factory, pki: Pki, caplog, header):
        """The header is read, never a byte of the ClientHello, and TLS starts after it."""
        async with server() as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await tls_connect(srv.host, port, HAPROXY, header, pki.client_context())

            assert b"+OK Logged in.\r\n" == await login(wire)
        logins = logged(caplog, f"method=PLAIN, rip={CLIENT}, lip=192.0.2.1, TLS (TLSv1.")
        assert 1 == len(logins)

    async def test_stranger_without_header(self, server: Factory, pki: Pki, caplog):
        """A client not behind HAProxy speaks TLS at once, as always."""
        async with server() as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await tls_connect(srv.host, port, STRANGER, b"", pki.client_context())

            assert b"+OK Logged in.\r\n" == await login(wire)
        assert 1 == len(logged(caplog, f"method=PLAIN, rip={STRANGER}, lip=127.0.0.1, TLS (TLSv1."))

    async def test_stranger_with_header(self, server: Factory, caplog):
        """A stranger's header before TLS fails the handshake: refused, logged, never believed."""
        async with server() as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await connect(srv.host, port, STRANGER, V1)

            assert b"" == await wire.read_all()
            lines = await until_logged(caplog, "TLS handshaking failed")

        assert 1 == len([ln for ln in lines if f"rip={STRANGER}, lip=127.0.0.1, session=<" in ln])
        assert [] == logged(caplog, CLIENT)

    async def test_times_out(self, server: Factory, caplog):
        """A trusted peer that sends no header is closed after haproxy_timeout."""
        async with server(haproxy_timeout=0.2) as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await connect(srv.host, port, HAPROXY)

            assert b"" == await wire.read_all()
        assert [f"pop3-login: haproxy: Client timed out (rip={HAPROXY})"] == logged(
            caplog, "timed out"
        )

    async def test_shutdown_while_waiting(self, server: Factory):
        """Stopping the server does not wait for a header that is not coming."""
        async with server(haproxy_timeout=30) as srv:
            port = srv.server.ssl_addresses[0][1]
            wire = await connect(srv.host, port, HAPROXY)
            await asyncio.sleep(0.05)
            async with asyncio.timeout(5):
                await srv.server.aclose()

            assert b"" == await wire.read_all()


class TestStranger:
    """A connection from outside haproxy_trusted_networks."""

    @pytest.mark.parametrize("header", [V1, V2, v2_ssl(7)], ids=["v1", "v2", "v2-ssl"])
    async def test_header_refused(self, server: Factory, caplog, header):
        """A stranger's header is refused and logged, and no line names its claimed client."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, STRANGER, header + b"USER alice\r\n")
            assert (await wire.line()).startswith(b"+OK")

            assert b"-ERR PROXY protocol header refused.\r\n" == await wire.read_all()
        expected = f"PROXY header refused (rip={STRANGER}, lip=127.0.0.1)"
        lines = logged(caplog, "trusted")
        assert [f"pop3-login: haproxy: Client not trusted, {expected}, session=<"] == [
            line[: line.index("session=<") + 9] for line in lines
        ]
        assert [] == logged(caplog, CLIENT)

    async def test_served_without_header(self, server: Factory, caplog):
        """A stranger that sends no header is served as always, under its own address."""
        async with server() as srv:
            wire = await connect(srv.host, srv.port, STRANGER)

            assert b"+OK Logged in.\r\n" == await login(wire)
        assert 1 == len(logged(caplog, f"rip={STRANGER}, lip=127.0.0.1, session="))

    async def test_nobody_trusted_by_default(self, server: Factory, caplog):
        """With haproxy_trusted_networks empty, even loopback's header is refused."""
        async with server(haproxy_trusted_networks=[]) as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V2)
            assert (await wire.line()).startswith(b"+OK")

            assert b"-ERR PROXY protocol header refused.\r\n" == await wire.read_all()
        assert 1 == len(logged(caplog, f"PROXY header refused (rip={HAPROXY}"))

    async def test_second_header_from_behind_haproxy(self, server: Factory, caplog):
        """A client behind HAProxy that sends a header of its own is refused under its address."""
        forged = build.v1("TCP4", "198.51.100.1", "192.0.2.1", 1, 110)
        async with server() as srv:
            wire = await connect(srv.host, srv.port, HAPROXY, V2 + forged)
            assert (await wire.line()).startswith(b"+OK")

            assert b"-ERR PROXY protocol header refused.\r\n" == await wire.read_all()
        assert 1 == len(logged(caplog, f"PROXY header refused (rip={CLIENT}, lip=192.0.2.1)"))
        assert [] == logged(caplog, "198.51.100.1")


class TestLmtp:
    """The LMTP listener behind HAProxy, and strangers' headers on it."""

    async def deliver(self, wire: Wire) -> list[bytes]:
        """Speak LMTP on ``wire``: one message to alice; return the replies."""
        replies = [await wire.line()]
        for line in (b"LHLO mx", b"MAIL FROM:<a@example.org>", b"RCPT TO:<alice>", b"DATA"):
            await wire.send(line + b"\r\n")
            reply = await wire.line()
            while reply[3:4] == b"-":
                reply = await wire.line()
            replies.append(reply)
        await wire.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        replies.append(await wire.line())
        return [reply[:3] for reply in replies]

    @pytest.mark.parametrize(("header", "version"), [(V1, 1), (V2, 2)], ids=["v1", "v2"])
    async def test_real_address(self, tmp_path: Path, caplog, header, version):
        """Delivered; aiosmtpd's session.peer and pobox's log name the client."""
        caplog.set_level(logging.INFO)
        async with running_pobox(
            tmp_path, haproxy_trusted_networks=[f"{HAPROXY}/32"], smtp_listen=[]
        ) as srv:
            wire = await connect(*srv.lmtp, HAPROXY, header)

            assert [b"220", b"250", b"250", b"250", b"354", b"250"] == await self.deliver(wire)
        # The Received header names the client of the PROXY header, never HAProxy.
        [stored] = [path.read_bytes() for path in maildir_files(tmp_path)]
        assert stored.startswith(b"Return-Path: <a@example.org>\nDelivered-To: alice\n")
        assert f"Received: from mx ([{CLIENT}])\n".encode() in stored
        connected = f"lmtp: haproxy: Client connected: PROXY v{version}: rip={CLIENT}, rport=50123"
        assert 1 == len(logged(caplog, connected))
        assert [f"Peer: ('{CLIENT}', 50123)"] == logged(caplog, "Peer: ")

    async def test_stranger_header_refused(self, tmp_path: Path, caplog):
        """A stranger's header on LMTP closes the connection, logged; nothing is delivered."""
        async with running_pobox(
            tmp_path, haproxy_trusted_networks=[f"{HAPROXY}/32"], smtp_listen=[]
        ) as srv:
            wire = await connect(*srv.lmtp, STRANGER)
            assert (await wire.line()).startswith(b"220")
            await wire.send(V2 + b"LHLO mx\r\n")

            assert b"" == await wire.read_all()
            lines = await until_logged(caplog, "not trusted")
        expected = f"PROXY header refused (rip={STRANGER}, lip=127.0.0.1)"
        assert [f"lmtp: haproxy: Client not trusted, {expected}"] == lines

    async def test_stranger_served(self, tmp_path: Path):
        """A stranger that sends no header delivers as always."""
        async with running_pobox(
            tmp_path, haproxy_trusted_networks=[f"{HAPROXY}/32"], smtp_listen=[]
        ) as srv:
            wire = await connect(*srv.lmtp, STRANGER)

            assert [b"220", b"250", b"250", b"250", b"354", b"250"] == await self.deliver(wire)

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (None, "lmtp: haproxy: Client timed out (rip=127.0.0.1)"),
            (b"LHLO mx\r\n", "lmtp: haproxy: Client disconnected: No valid proxy header found"),
            (b"PROXY TCP4", "lmtp: haproxy: Client disconnected (rip=127.0.0.1)"),
        ],
        ids=["timeout", "invalid", "closed"],
    )
    async def test_trusted_without_valid_header(self, tmp_path: Path, caplog, data, reason):
        """From HAProxy's address the header is mandatory: no greeting, logged."""
        caplog.set_level(logging.INFO)
        async with running_pobox(
            tmp_path,
            haproxy_trusted_networks=[f"{HAPROXY}/32"],
            haproxy_timeout=0.2,
            smtp_listen=[],
        ) as srv:
            wire = await connect(*srv.lmtp, HAPROXY)
            if data is not None:
                await wire.send(data)
            if data == b"PROXY TCP4":
                wire.writer.write_eof()

            assert b"" == await wire.read_all()
            lines = await until_logged(caplog, reason)
        assert 1 == len(lines)


class TestPolicy:
    """Who may send a header."""

    @pytest.mark.parametrize(
        ("address", "expected"),
        [
            ("10.0.0.5", True),
            ("10.0.0.6", False),
            ("::ffff:10.0.0.5", True),
            ("2001:db8::9", True),
            ("127.0.0.1", False),
            ("unknown", False),
            ("", False),
        ],
    )
    def test_trusts(self, address, expected):
        """Only the listed networks; loopback is not implied; IPv4-mapped counts as IPv4."""
        policy = ProxyPolicy(["10.0.0.5/32", "2001:db8::/64"], 3)

        assert expected == policy.trusts(address)

    def test_empty(self):
        """With no networks nobody is trusted."""
        assert not ProxyPolicy([], 3).trusts("127.0.0.1")

    def test_from_config(self):
        """haproxy_trusted_networks and haproxy_timeout (3 by default) make the policy."""
        config = build_config({"haproxy_trusted_networks": ["10.0.0.0/8"]})
        policy = ProxyPolicy.from_config(config)

        assert (3.0, True) == (policy.timeout, policy.trusts("10.1.2.3"))


class TestProxiedTransport:
    """What aiosmtpd sees of a proxied connection."""

    def origin(self) -> Origin:
        """An origin for a v2 header from 203.0.113.7."""
        header = ProxyHeaderParser().feed(V2)
        assert not isinstance(header, type(None))
        return Origin.of(header, ("127.0.0.1", 4000), ("127.0.0.1", 24))  # type: ignore[arg-type]

    async def test_names(self):
        """peername and sockname are the client's; other extras are the transport's."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        try:
            shown = ProxiedTransport(writer.transport, self.origin())  # type: ignore[arg-type]

            assert (CLIENT, 50123) == shown.get_extra_info("peername")
            assert ("192.0.2.1", 110) == shown.get_extra_info("sockname")
            assert writer.transport.get_extra_info("socket") is shown.get_extra_info("socket")
            assert (False, 0, True) == (
                shown.is_closing(),
                shown.get_write_buffer_size(),
                shown.can_write_eof(),
            )
        finally:
            writer.close()
            server.close()
            await server.wait_closed()


def test_config_keys_documented():
    """Both keys are in the key table and refuse bad values, naming the key."""
    assert {"haproxy_trusted_networks", "haproxy_timeout"} <= set(KEYS)
    with pytest.raises(ConfigError, match=r"haproxy_trusted_networks\[0\]: 'x' is not a network"):
        build_config({"haproxy_trusted_networks": ["x"]})
    with pytest.raises(ConfigError, match="haproxy_timeout: must be a positive"):
        build_config({"haproxy_timeout": 0})
