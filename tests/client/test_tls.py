"""TLS in ``pobox fetch``: verified by default, refused with a wrong CA, STLS or implicit.

The servers get trustme certificates for 127.0.0.1: pobox (STLS and implicit TLS on an
``ssl_listen`` port) and Dovecot with ``ssl = required`` (STLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from pobox.client import Status, fetch_account
from pobox.testing import running_server
from tests.client.conftest import PASSWORD, Peer, dovecot_peer, lf, local_messages, make_account

MESSAGE = b"From: tls@example.test\nSubject: over TLS\n\nsecret contents\n"


def write_pems(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    """Write a server certificate and key for 127.0.0.1 signed by ``ca``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = folder / "cert.pem", folder / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(params=["pobox-stls", "pobox-implicit", "dovecot-stls"])
async def tls_peer(
    request: pytest.FixtureRequest, tmp_path: Path, ca: trustme.CA
) -> AsyncIterator[tuple[Peer, str]]:
    """A TLS-capable server with a certificate from ``ca``, and the TLS mode to use."""
    kind, mode = str(request.param).split("-")
    tls_mode = "implicit" if mode == "implicit" else "starttls"
    if kind == "pobox":
        cert, key = write_pems(ca, tmp_path / "pems")
        async with running_server(
            tmp_path / "server",
            {"alice": PASSWORD},
            ssl_cert=str(cert),
            ssl_key=str(key),
            ssl_listen=["127.0.0.1:0"],
        ) as srv:
            port = srv.server.ssl_addresses[0][1] if mode == "implicit" else srv.port
            yield Peer("pobox", srv.host, port, srv.maildir("alice")), tls_mode
    else:
        cert, key = write_pems(ca, tmp_path / "pems")  # Dovecot's master reads them
        extra = f"ssl = required\nssl_cert = <{cert}\nssl_key = <{key}\n"
        with dovecot_peer(extra) as peer:
            yield peer, tls_mode


def ca_file(ca: trustme.CA, tmp_path: Path, name: str) -> str:
    """Write ``ca``'s certificate to a PEM file; return its path."""
    path = tmp_path / name
    ca.cert_pem.write_to_path(str(path))
    return str(path)


class TestVerifiedTls:
    """Certificate verification is on: the right CA works, another CA is refused."""

    async def test_right_ca_fetches(
        self, tls_peer: tuple[Peer, str], tmp_path: Path, ca: trustme.CA
    ) -> None:
        """With the server's CA the message arrives intact and is deleted on the server."""
        peer, mode = tls_peer
        peer.deliver(MESSAGE)
        account = make_account(
            peer, tmp_path, tls=mode, insecure=False, cafile=ca_file(ca, tmp_path, "ca.pem")
        )
        result = await asyncio.to_thread(fetch_account, account)
        assert (Status.OK, None, 1) == (result.status, result.error, result.fetched)
        assert [lf(MESSAGE)] == local_messages(tmp_path / "local")
        assert 0 == peer.remaining()

    async def test_wrong_ca_is_refused(self, tls_peer: tuple[Peer, str], tmp_path: Path) -> None:
        """With another CA the run fails before logging in and nothing is touched."""
        peer, mode = tls_peer
        peer.deliver(MESSAGE)
        other = ca_file(trustme.CA(), tmp_path, "other-ca.pem")
        account = make_account(peer, tmp_path, tls=mode, insecure=False, cafile=other)
        result = await asyncio.to_thread(fetch_account, account)
        assert Status.FAILED == result.status
        assert "TLS certificate verification failed" in (result.error or "")
        assert not (tmp_path / "local").exists()
        assert 1 == peer.remaining()


class TestStlsRequired:
    """``starttls`` never falls back to plaintext."""

    async def test_server_without_stls_is_refused(self, peer: Peer, tmp_path: Path) -> None:
        """A server that does not offer STLS gets no password."""
        peer.deliver(MESSAGE)
        account = make_account(peer, tmp_path, tls="starttls", insecure=False)
        result = await asyncio.to_thread(fetch_account, account)
        assert Status.FAILED == result.status
        assert "does not offer STLS" in (result.error or "")
        assert 1 == peer.remaining()
