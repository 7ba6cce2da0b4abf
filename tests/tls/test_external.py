"""SASL EXTERNAL (RFC 4422 App. A) with a verified TLS client certificate, end to end."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.testing import running_server
from tests.integration.wire import Wire

from .helpers import Pki, ssl_port


def client_context(pki: Pki, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting ``cert`` if given."""
    ctx = pki.client_context()
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def tls_wire(port: int, ctx: ssl.SSLContext) -> Wire:
    """An implicit-TLS connection to ``port``."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    return Wire(reader, writer)


class TestExternal:
    """AUTH EXTERNAL logs in as the user named by a client certificate the CA signed."""

    @pytest.fixture
    def settings(self, pki: Pki) -> dict[str, object]:
        """Implicit TLS, client certificates from the test CA, EXTERNAL offered."""
        return {
            **pki.settings,
            "ssl_listen": ["127.0.0.1:0"],
            "ssl_client_ca": str(pki.ca_pem),
            "auth_mechanisms": "PLAIN LOGIN EXTERNAL",
        }

    async def test_certificate_logs_in(
        self, tmp_path: Path, pki: Pki, settings: dict[str, object]
    ) -> None:
        """A certificate with CN=alice logs in as alice with AUTH EXTERNAL and no password."""
        cert = pki.ca.issue_cert("alice.client.test", common_name="alice")
        async with running_server(tmp_path / "srv", {"alice": "secret"}, **settings) as srv:
            srv.deliver("alice", b"Subject: x\n\nhi\n")
            w = await tls_wire(ssl_port(srv), client_context(pki, cert))
            assert (await w.line()).startswith(b"+OK")
            assert b"+OK Logged in.\r\n" == await w.command(b"AUTH EXTERNAL =")
            assert b"+OK 1 18\r\n" == await w.command(b"STAT")

    async def test_no_certificate_fails(
        self, tmp_path: Path, pki: Pki, settings: dict[str, object]
    ) -> None:
        """Without a client certificate, AUTH EXTERNAL is refused."""
        async with running_server(tmp_path / "srv", {"alice": "secret"}, **settings) as srv:
            w = await tls_wire(ssl_port(srv), client_context(pki, None))
            await w.line()
            assert (await w.command(b"AUTH EXTERNAL =")).startswith(b"-ERR")

    async def test_certificate_from_another_ca_is_rejected(
        self, tmp_path: Path, pki: Pki, settings: dict[str, object]
    ) -> None:
        """A client certificate the configured CA did not sign fails the handshake."""
        stranger = trustme.CA().issue_cert("mallory.test", common_name="alice")
        async with running_server(tmp_path / "srv", {"alice": "secret"}, **settings) as srv:
            try:
                w = await tls_wire(ssl_port(srv), client_context(pki, stranger))
                # TLS 1.3 finishes the client's handshake first; the server then aborts.
                greeting = await w.line()
            except (ssl.SSLError, ConnectionError):
                greeting = b""
            assert b"" == greeting

    def test_client_ca_needs_a_server_certificate(self, tmp_path: Path, pki: Pki) -> None:
        """ssl_client_ca without ssl_cert is a configuration error naming the key."""
        with pytest.raises(ConfigError, match=r"^ssl_client_ca: "):
            build_config({"ssl_client_ca": str(pki.ca_pem)})
