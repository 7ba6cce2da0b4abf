"""Inbound SMTP: swaks and smtplib deliver to local users; nothing is relayed."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

from tests.delivery.helpers import retrieve_all, running_pobox, split_received

MESSAGE = (
    b"From: sender@example.org\r\n"
    b"To: alice@mx.pobox.test\r\n"
    b"Subject: SMTP test\r\n"
    b"Message-ID: <smtp-1@example.org>\r\n"
    b"\r\n"
    b"Line one\r\n"
    b"..two dots, one after unstuffing\r\n"
)


def _swaks() -> str:
    """Return the path of swaks; fail (never skip) when it is missing."""
    path = shutil.which("swaks")
    assert path is not None, "swaks is not installed (Debian: apt install swaks)"
    return path


def _smtp_rcpt(host: str, port: int, rcpt: str) -> tuple[int, bytes]:
    """Return the reply to ``RCPT TO:<rcpt>``."""
    with smtplib.SMTP(host, port) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        return client.rcpt(rcpt)


class TestSmtpDelivery:
    """Mail for local users over SMTP."""

    async def test_swaks_message_comes_back_byte_identical(self, tmp_path: Path) -> None:
        """A message sent by swaks is retrieved by POP3 with only the trace headers added."""
        message_file = tmp_path / "message.eml"
        # swaks ends the DATA with CRLF . CRLF after the file: the file's last CRLF is that one.
        message_file.write_bytes(MESSAGE.removesuffix(b"\r\n"))
        async with running_pobox(tmp_path / "root") as pobox:
            host, port = pobox.smtp
            command = [
                _swaks(),
                "--server",
                f"{host}:{port}",
                "--from",
                "sender@example.org",
                "--to",
                "alice@mx.pobox.test",
                "--data",
                str(message_file),
                "--helo",
                "client.test",
            ]
            result = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, check=False, timeout=30
            )
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert 0 == result.returncode, result.stdout.decode(errors="replace")
        received, rest = split_received(messages[0])
        assert [
            b"Return-Path: <sender@example.org>\r\nDelivered-To: alice@mx.pobox.test\r\n" + MESSAGE
        ] == [rest]
        assert re.match(
            rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
            rb"\tby mx\.pobox\.test \(pobox\) with ESMTP id [0-9a-f]{16}\r\n"
            rb"\tfor <alice@mx\.pobox\.test>; ",
            received,
        ), received

    async def test_smtplib_delivers_to_a_local_domain(self, tmp_path: Path) -> None:
        """A message for user@<local_domains> reaches the user."""
        async with running_pobox(tmp_path, local_domains=["Example.NET"]) as pobox:
            host, port = pobox.smtp

            def send() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP(host, port) as client:
                    return client.sendmail("s@example.org", ["alice@example.net"], MESSAGE)

            refused = await asyncio.to_thread(send)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert {} == refused
        assert 1 == len(messages)


class TestNoOpenRelay:
    """The SMTP listener refuses what it cannot deliver locally, at RCPT."""

    async def test_foreign_domain_is_refused(self, tmp_path: Path) -> None:
        """An existing user's name at a foreign domain is not relayed."""
        async with running_pobox(tmp_path) as pobox:
            host, port = pobox.smtp
            reply = await asyncio.to_thread(_smtp_rcpt, host, port, "alice@elsewhere.example")
        assert (550, b"5.7.1 Relaying denied") == reply

    async def test_unknown_local_user_is_refused(self, tmp_path: Path) -> None:
        """A local address without a user is refused with 550 5.1.1."""
        async with running_pobox(tmp_path) as pobox:
            host, port = pobox.smtp
            reply = await asyncio.to_thread(_smtp_rcpt, host, port, "nobody@mx.pobox.test")
        assert (550, b"5.1.1 User unknown") == reply

    async def test_swaks_relay_attempt_fails(self, tmp_path: Path) -> None:
        """swaks reports failure when asked to relay to another domain."""
        async with running_pobox(tmp_path) as pobox:
            host, port = pobox.smtp
            command = [_swaks(), "--server", f"{host}:{port}", "--to", "victim@example.com"]
            result = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, check=False, timeout=30
            )
        assert 0 != result.returncode
        assert b"<** 550 5.7.1 Relaying denied" in result.stdout

    async def test_full_mailbox_is_refused_at_rcpt(self, tmp_path: Path) -> None:
        """A user at the message quota is refused at RCPT with 552 5.2.2."""
        async with running_pobox(tmp_path, quota_messages=1) as pobox:
            pobox.pop3.deliver("alice", b"Subject: old\n\nold\n")
            host, port = pobox.smtp
            reply = await asyncio.to_thread(_smtp_rcpt, host, port, "alice@mx.pobox.test")
        assert (552, b"5.2.2 Mailbox full: quota exceeded") == reply


class TestSizeLimit:
    """max_message_size on the SMTP listener."""

    async def test_oversized_data_is_refused(self, tmp_path: Path) -> None:
        """A message over the limit is refused after DATA with 552 5.3.4 and not stored."""
        async with running_pobox(tmp_path, max_message_size=64) as pobox:
            host, port = pobox.smtp

            def send() -> tuple[int, bytes]:
                with smtplib.SMTP(host, port) as client:
                    client.ehlo("client.test")
                    client.mail("s@example.org")
                    client.rcpt("alice@mx.pobox.test")
                    return client.data(MESSAGE)

            reply = await asyncio.to_thread(send)
            messages = await asyncio.to_thread(
                retrieve_all, pobox.pop3.host, pobox.pop3.port, "alice"
            )
        assert (552, b"5.3.4 Message too big for system") == reply
        assert [] == messages

    async def test_announced_size_is_refused_at_mail(self, tmp_path: Path) -> None:
        """A client announcing SIZE over the limit is refused at MAIL (RFC 1870)."""
        async with running_pobox(tmp_path, max_message_size=64) as pobox:
            host, port = pobox.smtp

            def mail() -> tuple[int, bytes]:
                with smtplib.SMTP(host, port) as client:
                    client.ehlo("client.test")
                    return client.mail("s@example.org", ["SIZE=1000"])

            reply = await asyncio.to_thread(mail)
        assert (552, b"5.3.4 Message size exceeds fixed maximum message size") == reply
