"""The security settings of pobox.config: defaults, parsing, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pobox.cli import build_context
from pobox.config import Config, Listen, build_config
from pobox.errors import ConfigError
from pobox.server import Pop3Server

from .helpers import Pki


class TestDefaults:
    """Out of the box: no TLS, plaintext logins from loopback only, capped connections."""

    def test_defaults(self):
        """The defaults are the documented ones."""
        config = Config()

        assert ("", "", (), "TLSv1.2") == (
            config.ssl_cert,
            config.ssl_key,
            config.ssl_listen,
            config.ssl_min_protocol,
        )
        assert ("loopback", ()) == (config.disable_plaintext_auth, config.login_trusted_networks)
        assert (1000, 50) == (config.max_connections, config.max_connections_per_ip)
        assert ("", "") == (config.user, config.group)


class TestParsing:
    """TOML values become typed settings."""

    def test_tls_settings(self, pki: Pki):
        """Certificate paths, implicit-TLS addresses and SNI entries are read."""
        config = build_config(
            {
                **pki.settings,
                "ssl_listen": ["127.0.0.1:995", "[::1]:995"],
                "ssl_min_protocol": "TLSv1.3",
                "ssl_sni": {
                    "Mail.Example.Test.": {
                        "cert": pki.settings["ssl_cert"],
                        "key": pki.settings["ssl_key"],
                    }
                },
            }
        )

        assert (Listen("127.0.0.1", 995), Listen("::1", 995)) == config.ssl_listen
        assert "TLSv1.3" == config.ssl_min_protocol
        assert (("mail.example.test", str(pki.cert_pem), str(pki.key_pem)),) == config.ssl_sni

    def test_trusted_networks_normalised(self):
        """Networks are stored in canonical CIDR form, host bits cleared."""
        config = build_config({"login_trusted_networks": ["10.1.2.3/8", "2001:db8::/32"]})

        assert ("10.0.0.0/8", "2001:db8::/32") == config.login_trusted_networks


class TestErrors:
    """A bad security setting is a start-up error that names its key."""

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"ssl_cert": "/nonexistent/cert.pem"}, "ssl_cert, ssl_key: set both or neither"),
            ({"ssl_listen": ["127.0.0.1:995"]}, "ssl_listen: needs ssl_cert and ssl_key"),
            ({"ssl_listen": ["nope"]}, "ssl_listen[0]: 'nope' has no valid port"),
            (
                {"ssl_min_protocol": "TLSv1.1"},
                "ssl_min_protocol: 'TLSv1.1' is not TLSv1.2 or TLSv1.3",
            ),
            ({"disable_plaintext_auth": "maybe"}, "disable_plaintext_auth: 'maybe' is not"),
            ({"login_trusted_networks": ["10.0.0.0/33"]}, "login_trusted_networks[0]: "),
            ({"login_trusted_networks": [8]}, "login_trusted_networks[0]: expected a CIDR"),
            ({"max_connections": 0}, "max_connections: must be at least 1"),
            ({"max_connections_per_ip": 0}, "max_connections_per_ip: must be at least 1"),
            ({"group": "nogroup"}, "group: needs user"),
            ({"ssl_sni": {"a.test": {"cert": "x"}}}, "ssl_sni.a.test: expected a table"),
        ],
    )
    def test_invalid(self, values, message):
        """Each invalid value is refused with the key in the message."""
        with pytest.raises(ConfigError) as info:
            build_config(values)

        assert str(info.value).startswith(message)

    def test_unreadable_files(self, tmp_path: Path):
        """Certificate files that do not exist are named by key at start-up."""
        with pytest.raises(ConfigError, match=r"^ssl_cert: .* does not exist"):
            build_config({"ssl_cert": str(tmp_path / "c.pem"), "ssl_key": str(tmp_path / "k.pem")})

    def test_key_mismatch_at_start(self, pki: Pki, tmp_path: Path):
        """A key that does not match its certificate stops the server from starting."""
        other = Pki.create(tmp_path / "other")
        config = build_config({"ssl_cert": str(pki.cert_pem), "ssl_key": str(other.key_pem)})

        with pytest.raises(ConfigError, match=r"^ssl_key: .* does not match"):
            Pop3Server(build_context(config))
