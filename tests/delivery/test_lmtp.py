"""End-to-end LMTP delivery (RFC 2033): smtplib.LMTP in, POP3 RETR out."""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
from pathlib import Path

from tests.delivery.helpers import retrieve_all, running_pobox, split_received

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: alice@mx.pobox.test\r\n"
    b"Subject: LMTP test\r\n"
    b"Message-ID: <lmtp-1@example.org>\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".a line starting with a dot\r\n"
    b"\r\n"
    b"-- \r\n"
    b"bye\r\n"
)


class _Lmtp(smtplib.LMTP):
    """smtplib's LMTP client that keeps every per-recipient reply after DATA."""

    def data_replies(self, message: bytes, count: int) -> list[tuple[int, bytes]]:
        """Send DATA and read ``count`` replies (RFC 2033 §4.2), one per accepted recipient."""
        self.putcmd("data")
        code, _ = self.getreply()
        assert code == 354
        self.send(smtplib.quotedata(message.decode("ascii")).encode("ascii") + b".\r\n")
        return [self.getreply() for _ in range(count)]


def _send_lmtp(host: str, port: int, rcpts: list[str]) -> tuple[list[tuple[int, bytes]], list]:
    """Deliver MESSAGE to ``rcpts``; return the RCPT replies and the DATA replies."""
    with _Lmtp(host, port) as client:
        client.ehlo_or_helo_if_needed()
        client.mail("sender@example.org")
        rcpt_replies = [client.rcpt(rcpt) for rcpt in rcpts]
        accepted = sum(1 for code, _ in rcpt_replies if code == 250)
        data_replies = client.data_replies(MESSAGE, accepted)
    return rcpt_replies, data_replies


class TestLmtpOverTcp:
    """LMTP on a loopback TCP port."""

    async def test_message_comes_back_byte_identical(self, tmp_path: Path) -> None:
        """A message delivered over LMTP is retrieved by POP3 with only the trace headers added."""
        async with running_pobox(tmp_path) as pobox:
            host, port = pobox.lmtp
            rcpt, data = await asyncio.to_thread(_send_lmtp, host, port, ["alice@mx.pobox.test"])
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert [(250, b"2.1.5 Ok")] == rcpt
        assert [(250, b"2.0.0 Ok: delivered")] == data
        received, rest = split_received(messages[0])
        assert [
            b"Return-Path: <sender@example.org>\r\nDelivered-To: alice@mx.pobox.test\r\n" + MESSAGE
        ] == [rest]
        assert re.fullmatch(
            rb"Received: from \S+ \(\[127\.0\.0\.1\]\)\r\n"
            rb"\tby mx\.pobox\.test \(pobox\) with LMTP id [0-9a-f]{16}\r\n"
            rb"\tfor <alice@mx\.pobox\.test>; \w{3}, \d\d? \w{3} \d{4} [\d:]{8} [+-]\d{4}\r\n",
            received,
        ), received

    async def test_one_reply_per_recipient(self, tmp_path: Path) -> None:
        """After DATA each accepted recipient gets its own reply: delivered, over quota."""
        async with running_pobox(
            tmp_path, ("alice", "bob"), extra_fields={"bob": "userdb_quota_rule=*:storage=10"}
        ) as pobox:
            host, port = pobox.lmtp
            rcpt, data = await asyncio.to_thread(
                _send_lmtp, host, port, ["alice@x.test", "nobody@x.test", "bob@x.test"]
            )
            alice = await asyncio.to_thread(retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice")
            bob = await asyncio.to_thread(retrieve_all, pobox.pop3.host, pobox.pop3.port, "bob")
        assert [(250, b"2.1.5 Ok"), (550, b"5.1.1 User unknown"), (250, b"2.1.5 Ok")] == rcpt
        assert [
            (250, b"2.0.0 Ok: delivered"),
            (552, b"5.2.2 Mailbox full: quota exceeded"),
        ] == data
        assert (1, 0) == (len(alice), len(bob))

    async def test_storage_failure_of_one_recipient_is_its_own_451(self, tmp_path: Path) -> None:
        """bob's maildir with tmp/ swapped for a link: bob gets 451, the others 250, once each."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        async with running_pobox(tmp_path / "srv", ("alice", "bob", "carol")) as pobox:
            bob = tmp_path / "srv" / "mail" / "bob"
            for sub in ("cur", "new"):
                (bob / sub).mkdir(parents=True, exist_ok=True)
            (bob / "tmp").symlink_to(elsewhere)
            host, port = pobox.lmtp
            _, data = await asyncio.to_thread(
                _send_lmtp, host, port, ["alice@x.test", "bob@x.test", "carol@x.test"]
            )
            carol = await asyncio.to_thread(retrieve_all, pobox.pop3.host, pobox.pop3.port, "carol")
        assert [
            (250, b"2.0.0 Ok: delivered"),
            (451, b"4.3.0 Mailbox unavailable, try again later"),
            (250, b"2.0.0 Ok: delivered"),
        ] == data
        assert (1, []) == (len(carol), list(elsewhere.iterdir()))

    async def test_helo_is_refused(self, tmp_path: Path) -> None:
        """LMTP has LHLO, not HELO (RFC 2033 §4.1)."""
        async with running_pobox(tmp_path) as pobox:
            host, port = pobox.lmtp

            def helo() -> tuple[int, bytes]:
                with smtplib.SMTP(host, port) as client:
                    return client.helo("client.test")

            reply = await asyncio.to_thread(helo)
        assert (500, b'5.5.1 Error: command "HELO" not recognized') == reply

    async def test_oversized_message_gets_one_reply_per_recipient(self, tmp_path: Path) -> None:
        """A message over max_message_size is refused once per recipient with 552 5.3.4."""
        async with running_pobox(tmp_path, ("alice", "bob"), max_message_size=100) as pobox:
            host, port = pobox.lmtp

            def send() -> list[tuple[int, bytes]]:
                with _Lmtp(host, port) as client:
                    client.ehlo_or_helo_if_needed()
                    client.mail("s@example.org")
                    client.rcpt("alice")
                    client.rcpt("bob")
                    return client.data_replies(MESSAGE * 2, 2)

            replies = await asyncio.to_thread(send)
        assert [(552, b"5.3.4 Message too big for system")] * 2 == replies


class TestLmtpOverUnixSocket:
    """LMTP on a Unix socket, as Postfix's ``lmtp:unix:`` uses it."""

    async def test_delivery_over_unix_socket(self, tmp_path: Path) -> None:
        """A message sent over the Unix socket lands in the maildrop."""
        path = tmp_path / "lmtp.sock"
        async with running_pobox(tmp_path / "root", lmtp_listen=[f"unix:{path}"]) as pobox:

            def send() -> tuple[int, bytes]:
                client = smtplib.LMTP(str(path))
                try:
                    client.ehlo_or_helo_if_needed()
                    refused = client.sendmail("sender@example.org", ["alice"], MESSAGE)
                finally:
                    client.quit()
                return len(refused), b""

            sent = await asyncio.to_thread(send)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert (0, b"") == sent
        received, rest = split_received(messages[0])
        assert [b"Return-Path: <sender@example.org>\r\nDelivered-To: alice\r\n" + MESSAGE] == [rest]
        # A Unix socket has no client address: the HELO name only.
        assert re.match(
            rb"Received: from \S+\r\n\tby mx\.pobox\.test \(pobox\) with LMTP ", received
        )
        assert not path.exists()

    async def test_stale_socket_is_replaced(self, tmp_path: Path) -> None:
        """A socket file left by a crashed server does not stop the listener from starting."""
        path = tmp_path / "lmtp.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()
        async with running_pobox(tmp_path / "root", lmtp_listen=[f"unix:{path}"]) as pobox:
            addresses = pobox.delivery.addresses
        assert ("lmtp", str(path)) in addresses
