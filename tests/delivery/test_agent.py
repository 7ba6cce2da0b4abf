"""The delivery agent: sizes, quotas, recipient resolution; and the delivery config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from pobox.auth.base import User
from pobox.auth.passwdfile import PasswdFileAuthenticator, add_user
from pobox.config import build_config
from pobox.delivery import DeliveryAgent, Outcome, Recipient, parse_size
from pobox.delivery._agent import Received, received_header, trace_headers
from pobox.delivery.lmtp import LmtpHandler
from pobox.errors import ConfigError
from pobox.names import parse_format
from pobox.records import Quota, quota_from_fields
from pobox.storage.base import IncomingMessage, MailUser
from pobox.storage.maildir import MaildirStore
from pobox.storage.memory import MemoryStore
from pobox.storage.spool import Spool


class TestParseSize:
    """parse_size()."""

    def test_units(self) -> None:
        """Bare digits are octets; k, M, G and T are powers of 1024."""
        assert [10, 10, 2048, 3 * 1024**2, 1024**3] == [
            parse_size(text) for text in ("10", "10b", "2k", "3M", "1G")
        ]

    def test_garbage(self) -> None:
        """Anything else is refused."""
        with pytest.raises(ValueError, match="is not a size"):
            parse_size("10 apples")


class TestUserQuota:
    """User.quota() with the limits quota_from_fields() reads from userdb fields."""

    @staticmethod
    def user(**fields: str) -> User:
        """Return alice with the quota limits ``fields`` set."""
        quota_bytes, quota_messages, _ = quota_from_fields(fields)
        return User("alice", quota_bytes=quota_bytes, quota_messages=quota_messages)

    def test_default(self) -> None:
        """A user without quota fields gets the configured default."""
        assert Quota(5, 6) == self.user().quota(Quota(5, 6))

    def test_dovecot_quota_rule(self) -> None:
        """Dovecot's quota_rule extra field sets both limits."""
        user = self.user(quota_rule="*:storage=1M:messages=10")
        assert Quota(1024**2, 10) == user.quota(Quota())

    def test_simple_fields_win(self) -> None:
        """quota_bytes and quota_messages override the rule."""
        user = self.user(quota_rule="*:storage=1M", quota_bytes="2k", quota_messages="3")
        assert Quota(2048, 3) == user.quota(Quota())

    def test_one_limit_keeps_the_other_default(self) -> None:
        """A user who sets only a message count keeps the default byte limit."""
        assert Quota(7, 3) == self.user(quota_messages="3").quota(Quota(7, 9))

    def test_malformed_field_is_ignored(self) -> None:
        """A malformed value leaves the default in place and is reported."""
        assert Quota(7, 0) == self.user(quota_bytes="lots").quota(Quota(7, 0))
        assert ["quota_bytes: 'lots' is not a size (digits with an optional b, k, M, G or T)"] == (
            quota_from_fields({"quota_bytes": "lots"})[2]
        )


class TestTraceHeaders:
    """trace_headers()."""

    def test_headers(self) -> None:
        """Return-Path carries the sender in brackets, Delivered-To the recipient."""
        assert b"Return-Path: <s@x.test>\nDelivered-To: a@y.test\n" == trace_headers(
            "s@x.test", "a@y.test"
        )

    def test_no_header_injection(self) -> None:
        """Line breaks in addresses cannot start a new header."""
        assert b"Return-Path: <sX-Evil: 1>\nDelivered-To: a\n" == trace_headers(
            "s\r\nX-Evil: 1", "a"
        )


class TestReceivedHeader:
    """received_header(): RFC 5321 §4.4 trace, nothing a client sends can add a header."""

    DATE = "Mon, 07 Dec 2026 12:00:00 +0000"

    def test_lmtp_shape(self) -> None:
        """from HELO ([IP]) by host (pobox) with LMTP id ID for <rcpt>; date, folded."""
        received = Received("LMTP", helo="mx.example.org", address="192.0.2.7", id="abc123")
        assert (
            "Received: from mx.example.org ([192.0.2.7])\n"
            "\tby pop.example.net (pobox) with LMTP id abc123\n"
            f"\tfor <alice@example.net>; {self.DATE}\n"
        ) == received_header(received, "pop.example.net", "alice@example.net", date=self.DATE)

    def test_no_for_with_several_recipients(self) -> None:
        """A transaction with two recipients names none of them."""
        received = Received("ESMTP", helo="h", address="::1", recipients=2, id="i")
        assert (
            f"Received: from h ([::1])\n\tby me (pobox) with ESMTP id i; {self.DATE}\n"
        ) == received_header(received, "me", "alice@me", date=self.DATE)

    def test_local(self) -> None:
        """pobox deliver has no client: by ... with local."""
        assert (
            f"Received: by me (pobox) with local id i\n\tfor <bob>; {self.DATE}\n"
        ) == received_header(Received("local", id="i"), "me", "bob", date=self.DATE)

    @pytest.mark.parametrize(
        "helo",
        [
            "evil\r\nX-Injected: 1",
            "evil\nX-Injected: 1",
            "evil\rX-Injected: 1",
            "evil\x00\x0bX-Injected: 1",
            "evil (forged [10.0.0.1])",
            "évil\u2028X-Injected: 1",
        ],
    )
    def test_helo_cannot_inject(self, helo: str) -> None:
        """CR, LF, controls, parentheses and non-ASCII in HELO become ?: still one header."""
        text = received_header(Received("LMTP", helo=helo, address="192.0.2.7", id="i"), "me", "a")
        lines = text.split("\n")
        assert 4 == len(lines)
        assert "" == lines[3]
        assert all(line.startswith("\tby ") or line.startswith("\tfor ") for line in lines[1:3])
        first = lines[0]
        assert first.startswith("Received: from ")
        assert first.endswith(" ([192.0.2.7])")
        assert "(" not in first[len("Received: from ") : -len(" ([192.0.2.7])")]
        assert all(c.isprintable() and c.isascii() for c in "".join(lines).replace("\t", ""))

    def test_recipient_cannot_inject(self) -> None:
        """A recipient with line breaks, brackets or ; stays inside its for <...>."""
        text = received_header(
            Received("local", id="i"), "me", "a>\r\nX-Injected: <b;c", date=self.DATE
        )
        assert [
            "Received: by me (pobox) with local id i",
            f"\tfor <a???X-Injected: ?b?c>; {self.DATE}",
            "",
        ] == text.split("\n")


class TestResolve:
    """DeliveryAgent.resolve()."""

    @pytest.fixture
    def agent(self, tmp_path: Path) -> DeliveryAgent:
        """An agent with users alice and bob@example.net, local domain mx.test."""
        add_user(tmp_path / "passwd", "alice", b"x", scheme="PLAIN")
        add_user(tmp_path / "passwd", "bob@example.net", b"x", scheme="PLAIN")
        return DeliveryAgent(
            PasswdFileAuthenticator(tmp_path / "passwd"),
            MaildirStore(f"maildir:{tmp_path}/%u"),
            local_domains=("mx.test",),
        )

    async def test_local_part_at_local_domain(self, agent: DeliveryAgent) -> None:
        """alice@<local domain> is the user alice."""
        resolved = await agent.resolve("alice@MX.test", any_domain=False)
        assert isinstance(resolved, Recipient)
        assert "alice" == resolved.user.name

    async def test_full_address_user(self, agent: DeliveryAgent) -> None:
        """A user named by a whole address is found at any domain."""
        resolved = await agent.resolve("bob@example.net", any_domain=False)
        assert isinstance(resolved, Recipient)
        assert "bob@example.net" == resolved.user.name

    async def test_foreign_domain_is_relay(self, agent: DeliveryAgent) -> None:
        """A user's local part at a foreign domain is a relay attempt for SMTP."""
        assert Outcome.RELAY_DENIED is await agent.resolve("alice@other.test", any_domain=False)

    async def test_lmtp_takes_any_domain(self, agent: DeliveryAgent) -> None:
        """For LMTP, the MTA has routed the mail: the local part names the user."""
        assert isinstance(await agent.resolve("alice@other.test", any_domain=True), Recipient)

    async def test_mixed_case_address_is_the_lowercase_user(self, agent: DeliveryAgent) -> None:
        """ALICE@MX.test is alice with the default auth_username_format %Lu."""
        resolved = await agent.resolve("ALICE@MX.test", any_domain=False)
        assert isinstance(resolved, Recipient)
        assert "alice" == resolved.user.name

    async def test_percent_u_keeps_case(self, tmp_path: Path) -> None:
        """With %u, ALICE is nobody."""
        add_user(tmp_path / "passwd", "alice", b"x", scheme="PLAIN")
        agent = DeliveryAgent(
            PasswdFileAuthenticator(tmp_path / "passwd"),
            MaildirStore(f"maildir:{tmp_path}/%u"),
            username_format=parse_format("%u"),
        )
        assert Outcome.UNKNOWN_USER is await agent.resolve("ALICE", any_domain=True)

    async def test_unknown_user(self, agent: DeliveryAgent) -> None:
        """An unknown local user is 550 5.1.1."""
        assert Outcome.UNKNOWN_USER is await agent.resolve("carol@mx.test", any_domain=False)


class TestDeliveryConfig:
    """The delivery keys of the configuration."""

    def test_listen_addresses(self) -> None:
        """TCP and Unix socket addresses are accepted."""
        config = build_config({"lmtp_listen": ["127.0.0.1:24", "unix:/run/pobox/lmtp"]})
        assert ("127.0.0.1:24", "unix:/run/pobox/lmtp") == config.lmtp_listen

    def test_relative_socket_path(self) -> None:
        """A Unix socket path must be absolute."""
        with pytest.raises(ConfigError, match=r"lmtp_listen\[0\]"):
            build_config({"lmtp_listen": ["unix:lmtp"]})

    def test_bad_port(self) -> None:
        """A malformed TCP address names the key."""
        with pytest.raises(ConfigError, match=r"smtp_listen\[0\]"):
            build_config({"smtp_listen": ["127.0.0.1:http"]})

    def test_negative_quota(self) -> None:
        """Quotas cannot be negative."""
        with pytest.raises(ConfigError, match="quota_bytes"):
            build_config({"quota_bytes": -1})


class _FailingForBob(MemoryStore):
    """The memory store with a bug that shows for one user: a non-storage exception."""

    async def deliver(
        self, user: MailUser, message: IncomingMessage, *, quota: Quota | None = None
    ) -> str:
        """Raise for bob; store for the others."""
        if user.name == "bob":
            msg = "a bug in the store"
            raise RuntimeError(msg)
        return await super().deliver(user, message, quota=quota)


class TestUnexpectedFailure:
    """An unforeseen failure for one recipient is that recipient's 451, nothing more."""

    async def test_lmtp_replies_once_per_recipient(self, tmp_path: Path) -> None:
        """LMTP DATA to alice, bob (whose store raises), carol: 250, 451, 250; two stored."""
        for name in ("alice", "bob", "carol"):
            add_user(tmp_path / "passwd", name, b"x", scheme="PLAIN")
        store = _FailingForBob()
        handler = LmtpHandler(DeliveryAgent(PasswdFileAuthenticator(tmp_path / "passwd"), store))
        envelope = Envelope()
        envelope.mail_from = "s@example.org"
        envelope.rcpt_tos = ["alice", "bob", "carol"]
        with Spool.from_bytes(b"Subject: hi\n\nhello\n") as body:
            reply = await handler.handle_DATA(SMTP(handler), Session(None), envelope, body)
        assert [
            "250 2.0.0 Ok: delivered",
            "451 4.3.0 Temporary failure, try again later",
            "250 2.0.0 Ok: delivered",
        ] == reply.split("\r\n")
        assert (1, 0, 1) == tuple(len(store.stored(n)) for n in ("alice", "bob", "carol"))
