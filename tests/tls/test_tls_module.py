"""pobox.tls: the context factory, reload and SNI, and the plaintext-login policy."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from pobox.config import Config
from pobox.errors import ConfigError
from pobox.tls import ServerTls, is_trusted_address, make_server_context, plaintext_auth_allowed

from .helpers import Pki, der_of_pem


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> bytes:
    """Do a TLS handshake over a socket pair; return the DER certificate the server sent."""
    a, b = socket.socketpair()
    with a, b:
        server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        client = client_ctx.wrap_socket(b, server_hostname=name, do_handshake_on_connect=False)
        with server, client:
            client.setblocking(False)
            server.setblocking(False)
            for _ in range(100):
                done = 0
                for side in (client, server):
                    try:
                        side.do_handshake()
                        done += 1
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                if done == 2:
                    der = client.getpeercert(binary_form=True)
                    assert der is not None
                    return der
    raise AssertionError("handshake did not finish")


class TestMakeServerContext:
    """make_server_context builds a modern server context or names the bad key."""

    def test_modern_defaults(self, pki: Pki):
        """TLS 1.2 is the floor, compression and renegotiation are off."""
        ctx = make_server_context(str(pki.cert_pem), str(pki.key_pem))

        assert ssl.TLSVersion.TLSv1_2 == ctx.minimum_version
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert all("GCM" in c["name"] or "CHACHA20" in c["name"] for c in ctx.get_ciphers())

    def test_tls13_floor(self, pki: Pki):
        """ssl_min_protocol TLSv1.3 raises the floor."""
        ctx = make_server_context(str(pki.cert_pem), str(pki.key_pem), min_protocol="TLSv1.3")

        assert ssl.TLSVersion.TLSv1_3 == ctx.minimum_version

    def test_key_mismatch(self, pki: Pki, tmp_path: Path):
        """A key of another certificate is reported against ssl_key."""
        other = Pki.create(tmp_path / "other")

        with pytest.raises(ConfigError, match=r"^ssl_key: .* does not match the certificate"):
            make_server_context(str(pki.cert_pem), str(other.key_pem))

    def test_not_a_certificate(self, pki: Pki):
        """A file with no certificate is reported against ssl_cert."""
        with pytest.raises(ConfigError, match=r"^ssl_cert: .* holds no PEM certificate"):
            make_server_context(str(pki.key_pem), str(pki.key_pem))

    def test_not_a_key(self, pki: Pki):
        """A file with no key is reported against ssl_key."""
        with pytest.raises(ConfigError, match=r"^ssl_key: cannot load"):
            make_server_context(str(pki.cert_pem), str(pki.ca_pem))

    def test_missing_file(self, pki: Pki, tmp_path: Path):
        """A missing certificate is reported against ssl_cert."""
        with pytest.raises(ConfigError, match=r"^ssl_cert: cannot read"):
            make_server_context(str(tmp_path / "nope.pem"), str(pki.key_pem))

    def test_sni_key_names(self, pki: Pki, tmp_path: Path):
        """Errors of an ssl_sni entry name that entry."""
        other = Pki.create(tmp_path / "other")

        with pytest.raises(ConfigError, match=r"^ssl_sni\.mail\.test\.key: "):
            make_server_context(str(pki.cert_pem), str(other.key_pem), key_name="ssl_sni.mail.test")


class TestServerTls:
    """ServerTls reloads certificates and picks them by server name."""

    def test_reload_serves_new_certificate(self, pki: Pki):
        """After reload the next handshake gets the new certificate."""
        tls = ServerTls(Config(**pki.settings))
        first = handshake(tls.context, pki.client_context(), "localhost")
        new_pem = pki.issue("localhost")

        tls.reload()

        assert der_of_pem(new_pem) == handshake(tls.context, pki.client_context(), "localhost")
        assert first != der_of_pem(new_pem)

    def test_failed_reload_keeps_old(self, pki: Pki, tmp_path: Path):
        """A reload with a mismatched key raises and keeps serving the old certificate."""
        tls = ServerTls(Config(**pki.settings))
        before = handshake(tls.context, pki.client_context(), "localhost")
        pki.key_pem.write_bytes(Pki.create(tmp_path / "other").key_pem.read_bytes())

        with pytest.raises(ConfigError, match=r"^ssl_key: "):
            tls.reload()

        assert before == handshake(tls.context, pki.client_context(), "localhost")

    def test_sni_selects_certificate(self, pki: Pki, tmp_path: Path):
        """A client asking for an ssl_sni name gets that name's certificate."""
        other = Pki.create(tmp_path / "other", "mail.other.test")
        config = Config(
            **pki.settings,
            ssl_sni=(("mail.other.test", str(other.cert_pem), str(other.key_pem)),),
        )
        tls = ServerTls(config)

        got = handshake(tls.context, other.client_context(), "mail.other.test")
        default = handshake(tls.context, pki.client_context(), "localhost")

        assert der_of_pem(other.cert_pem.read_bytes()) == got
        assert der_of_pem(pki.cert_pem.read_bytes()) == default


class TestIsTrustedAddress:
    """is_trusted_address: loopback and login_trusted_networks are trusted."""

    @pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
    def test_loopback(self, address):
        """Every loopback form is trusted."""
        assert is_trusted_address(address)

    @pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7"])
    def test_remote(self, address):
        """Other addresses are not trusted without a network."""
        assert not is_trusted_address(address)

    @pytest.mark.parametrize("address", ["unknown", "", "/run/pobox.sock"])
    def test_not_an_address(self, address):
        """Something that is not an IP address is never trusted."""
        assert not is_trusted_address(address, ["0.0.0.0/0"])

    def test_trusted_network(self):
        """An address inside a configured network is trusted, one outside is not."""
        nets = ["10.0.0.0/8", "2001:db8::/32"]

        assert (True, True, False) == (
            is_trusted_address("10.1.2.3", nets),
            is_trusted_address("2001:db8::5", nets),
            is_trusted_address("11.1.2.3", nets),
        )


class TestPlaintextAuthAllowed:
    """plaintext_auth_allowed: Dovecot's disable_plaintext_auth, by policy and source."""

    @pytest.mark.parametrize(
        ("policy", "address", "secure", "allowed"),
        [
            ("loopback", "127.0.0.1", False, True),
            ("loopback", "192.0.2.7", False, False),
            ("loopback", "192.0.2.7", True, True),
            ("loopback", "10.0.0.9", False, True),  # in login_trusted_networks
            ("yes", "127.0.0.1", False, False),
            ("yes", "10.0.0.9", False, False),
            ("yes", "192.0.2.7", True, True),
            ("no", "192.0.2.7", False, True),
        ],
    )
    def test_table(self, policy, address, secure, allowed):
        """TLS always allows; otherwise the policy and the source decide."""
        assert allowed == plaintext_auth_allowed(policy, address, ["10.0.0.0/8"], secure=secure)
