"""Mail and users in PostgreSQL, end to end: a real ``pobox serve`` process, users made with
``pobox user``, mail delivered over LMTP, read over POP3; the database stopped and started.
"""

from __future__ import annotations

import asyncio
import poplib
import re
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.ports import free_port
from tests.helpers.postgres import Postgres
from tests.helpers.process import ServeProcess, serve_config


def pobox_user(config: Path, *args: str, password: str = "") -> int:
    """Run ``pobox user ARGS -c CONFIG`` with ``password`` on standard input."""
    done = subprocess.run(
        [sys.executable, "-m", "pobox", "user", *args, "-c", str(config)],
        input=(password + "\n").encode(),
        capture_output=True,
        check=False,
    )
    return done.returncode


def lmtp(port: int, recipient: str, body: bytes) -> int:
    """Deliver ``body`` to ``recipient`` over LMTP; return the reply code for them."""
    with smtplib.LMTP("127.0.0.1", port, timeout=30) as client:
        refused = client.sendmail("sender@example.test", [recipient], body)
    return refused.get(recipient, (250, b""))[0]


def lmtp_code(port: int, recipient: str, body: bytes) -> int:
    """As :func:`lmtp`, with a refusal's code returned instead of raised."""
    try:
        return lmtp(port, recipient, body)
    except smtplib.SMTPRecipientsRefused as exc:
        return int(exc.recipients[recipient][0])
    except smtplib.SMTPDataError as exc:
        return int(exc.smtp_code)


def pop3_login(port: int, user: str, password: str) -> tuple[str, list[bytes]]:
    """Log in; return the answer to PASS (or the -ERR line) and the messages."""
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        client.user(user)
        try:
            answer = client.pass_(password).decode()
        except poplib.error_proto as exc:
            return str(exc.args[0].decode()), []
        count, _ = client.stat()
        messages = [b"\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
        client.quit()
        return answer, messages
    finally:
        client.close()


@pytest.fixture
async def serving(tmp_path: Path, pg_dsn: str) -> AsyncIterator[tuple[ServeProcess, Path, int]]:
    """``pobox serve`` with userdb and mail_location "postgresql"; (process, config, LMTP port)."""
    lmtp_port = free_port()
    config = tmp_path / "pobox.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\nworkers = 1\n'
        f'lmtp_listen = ["127.0.0.1:{lmtp_port}"]\n'
        'userdb = "postgresql"\nmail_location = "postgresql"\n'
        f'postgresql_dsn = "{pg_dsn}"\npostgresql_timeout = 2\npostgresql_pool_min = 1\n'
        "postgresql_user_cache_ttl = 3600\nauth_failure_delay = 0\n"
        f'log_path = "{tmp_path / "pobox.log"}"\n'
        f'passwd_file = "{tmp_path / "no-such-passwd"}"\n'
    )
    assert 0 == pobox_user(config, "add", "alice", "--scheme", "PLAIN", password="secret")
    async with serve_config(config) as proc:
        started = ServeProcess(proc, tmp_path / "pobox.log")
        line = await started.wait_log(r"started, listening on")
        started.port = int(re.findall(r"127\.0\.0\.1:(\d+)", line)[0])
        yield started, config, lmtp_port


class TestEndToEnd:
    """LMTP in, POP3 out, users only in the database."""

    async def test_deliver_and_retrieve(self, serving: tuple[ServeProcess, Path, int]) -> None:
        """LMTP accepts for alice, refuses an unknown user; POP3 gives alice her mail."""
        server, _, lmtp_port = serving
        codes = [
            await asyncio.to_thread(lmtp, lmtp_port, "alice", b"Subject: one\r\n\r\nfirst\r\n"),
            await asyncio.to_thread(lmtp, lmtp_port, "alice", b"Subject: two\r\n\r\nsecond\r\n"),
            await asyncio.to_thread(lmtp_code, lmtp_port, "mallory", b"Subject: x\r\n\r\nx\r\n"),
        ]
        answer, messages = await asyncio.to_thread(pop3_login, server.port, "alice", "secret")
        refused, _ = await asyncio.to_thread(pop3_login, server.port, "alice", "wrong")
        assert ([250, 250, 550], True, [b"first", b"second"], "-ERR [AUTH]") == (
            codes,
            answer.startswith("+OK"),
            [message.split(b"\n")[-1] for message in messages],
            refused[:11],
        )

    async def test_user_commands_reach_the_server_at_once(
        self, serving: tuple[ServeProcess, Path, int]
    ) -> None:
        """pobox user passwd/add/del while serving: seen at once despite an hour's cache TTL."""
        server, config, lmtp_port = serving
        before, _ = await asyncio.to_thread(pop3_login, server.port, "alice", "secret")
        assert 0 == pobox_user(config, "passwd", "alice", "--scheme", "PLAIN", password="new")
        assert 0 == pobox_user(
            config, "add", "bob", "--scheme", "PLAIN", "--nologin", password="pw"
        )
        after, _ = await _eventually(server.port, "alice", "new")
        old, _ = await asyncio.to_thread(pop3_login, server.port, "alice", "secret")
        bob_mail = await asyncio.to_thread(lmtp, lmtp_port, "bob", b"Subject: b\r\n\r\nb\r\n")
        bob_login, _ = await asyncio.to_thread(pop3_login, server.port, "bob", "pw")
        assert 0 == pobox_user(config, "del", "alice")
        gone = await _eventually_refused(server.port, "alice", "new")
        assert (True, True, "-ERR", 250, "-ERR", "-ERR") == (
            before.startswith("+OK"),
            after.startswith("+OK"),
            old[:4],
            bob_mail,
            bob_login[:4],
            gone[:4],
        )

    async def test_database_down(
        self, serving: tuple[ServeProcess, Path, int], pg_cluster: Postgres
    ) -> None:
        """Database stopped: -ERR [SYS/TEMP] at login, LMTP 451; started again: both work."""
        server, _, lmtp_port = serving
        await asyncio.to_thread(pg_cluster.stop)
        try:
            down, _ = await asyncio.to_thread(pop3_login, server.port, "alice", "secret")
            code = await asyncio.to_thread(
                lmtp_code, lmtp_port, "alice", b"Subject: d\r\n\r\nd\r\n"
            )
        finally:
            await asyncio.to_thread(pg_cluster.restart)
        up, _ = await _eventually(server.port, "alice", "secret")
        delivered = await asyncio.to_thread(lmtp, lmtp_port, "alice", b"Subject: u\r\n\r\nu\r\n")
        assert ("-ERR [SYS/TEMP]", 451, True, 250) == (
            down[:15],
            code,
            up.startswith("+OK"),
            delivered,
        )


async def _eventually(
    port: int, user: str, password: str, tries: int = 50
) -> tuple[str, list[bytes]]:
    """Log in until it succeeds (a bounded number of tries); return the last answer."""
    result = ("", [])
    for _ in range(tries):
        result = await asyncio.to_thread(pop3_login, port, user, password)
        if result[0].startswith("+OK"):
            break
        await asyncio.sleep(0.1)
    return result


async def _eventually_refused(port: int, user: str, password: str, tries: int = 50) -> str:
    """Log in until it is refused (a bounded number of tries); return the last answer."""
    answer = ""
    for _ in range(tries):
        answer, _ = await asyncio.to_thread(pop3_login, port, user, password)
        if answer.startswith("-ERR"):
            break
        await asyncio.sleep(0.1)
    return answer
