"""Brute-force defence and the failed-login log line, against a real pobox on loopback.

The log line is checked with the real ``fail2ban-regex`` against Debian's stock ``dovecot``
filter and pobox's own ``contrib/fail2ban`` filter, on the log the running server wrote.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pobox.auth.base import Authenticator, User
from pobox.log import setup_logging
from pobox.testing import RunningServer, running_server
from tests.integration.wire import Wire

ROOT = Path(__file__).resolve().parents[2]
DOVECOT_FILTER = Path("/etc/fail2ban/filter.d/dovecot.conf")
POBOX_FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "pobox.conf"


async def fail_once(srv: RunningServer, user: bytes = b"alice") -> bytes:
    """Open a connection, fail one USER/PASS login, quit; return the PASS reply."""
    w = await Wire.connect(srv.host, srv.port)
    await w.line()
    await w.command(b"USER " + user)
    reply = await w.command(b"PASS wrong")
    await w.command(b"QUIT")
    await w.close()
    return reply


class TestThrottle:
    """Failures per address and per connection."""

    async def test_login_delay_after_too_many_failures(self, tmp_path: Path) -> None:
        """After auth_failures_per_ip failures even the right password gets [LOGIN-DELAY]."""
        async with running_server(tmp_path, auth_failures_per_ip=3) as srv:
            replies = [await fail_once(srv) for _ in range(3)]
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            await w.command(b"USER alice")
            blocked = await w.command(b"PASS secret")

        assert [b"-ERR [AUTH] Authentication failed.\r\n"] * 3 == replies
        assert b"-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n" == blocked

    async def test_sasl_is_throttled_too(self, tmp_path: Path) -> None:
        """AUTH PLAIN is refused the same way once the address is blocked."""
        async with running_server(tmp_path, auth_failures_per_ip=1) as srv:
            await fail_once(srv)
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            reply = await w.command(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"))

        assert reply.startswith(b"-ERR [LOGIN-DELAY] ")

    async def test_connection_closed_after_max_auth_failures(self, tmp_path: Path) -> None:
        """The connection is closed after max_auth_failures failed logins in it."""
        async with running_server(tmp_path, max_auth_failures=2) as srv:
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            await w.send(b"USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nNOOP\r\n")
            out = await w.read_all()

        assert b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n" * 2 == out

    async def test_success_resets_the_count(self, tmp_path: Path) -> None:
        """A successful login from the address forgets its earlier failures."""
        async with running_server(tmp_path, auth_failures_per_ip=2) as srv:
            await fail_once(srv)
            w = await Wire.connect(srv.host, srv.port)
            await w.login()
            await w.command(b"QUIT")
            await fail_once(srv)
            reply = await fail_once(srv)

        assert b"-ERR [AUTH] Authentication failed.\r\n" == reply


async def from_address(srv: RunningServer, ip: str) -> Wire:
    """Connect from the loopback address ``ip`` (any of 127.0.0.0/8) and read the greeting."""
    reader, writer = await asyncio.open_connection(srv.host, srv.port, local_addr=(ip, 0))
    w = Wire(reader, writer)
    await w.line()
    return w


async def login_from(srv: RunningServer, ip: str, password: bytes) -> bytes:
    """Try alice's login with ``password`` from ``ip``; return the PASS reply."""
    w = await from_address(srv, ip)
    await w.command(b"USER alice")
    reply = await w.command(b"PASS " + password)
    await w.close()
    return reply


class TestNoLockout:
    """Failures refuse the failing address, never a user logging in from elsewhere."""

    async def test_stranger_cannot_lock_a_user_out(self, tmp_path: Path) -> None:
        """20 wrong passwords for alice from five addresses; alice gets in from a clean one."""
        async with running_server(
            tmp_path, auth_failures_per_ip=4, auth_failures_per_user=3
        ) as srv:
            stranger = [
                await login_from(srv, f"127.0.0.{i}", b"guess") for i in range(2, 7) for _ in "1234"
            ]
            from_stranger = await login_from(srv, "127.0.0.2", b"secret")
            from_alice = await login_from(srv, "127.0.0.1", b"secret")

        assert [b"-ERR [AUTH] Authentication failed.\r\n"] * 20 == stranger
        assert b"-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n" == from_stranger
        assert b"+OK Logged in.\r\n" == from_alice


class SlowAuthenticator:
    """The server's authenticator, with each password check taking ``seconds`` longer."""

    def __init__(self, inner: Authenticator, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    async def authenticate(self, username: str, password: bytes) -> User | None:
        """Wait, then check."""
        await asyncio.sleep(self.seconds)
        return await self.inner.authenticate(username, password)

    async def lookup(self, username: str) -> User | None:
        """Look the user up."""
        return await self.inner.lookup(username)

    async def credentials(self, username: str) -> str | None:
        """Return the stored password."""
        return await self.inner.credentials(username)


class TestFailureTiming:
    """A failure is answered the failure delay after it arrived, however long the check took."""

    async def test_check_time_absorbed(self, tmp_path: Path, failure_waits: list[float]) -> None:
        """A 0.4 s check leaves at most 0.6 s of a 1 s delay to wait, and 1 s passes in all."""
        async with running_server(tmp_path, auth_failure_delay=1.0) as srv:
            ctx = srv.server.ctx
            srv.server.ctx = dataclasses.replace(
                ctx, authenticator=SlowAuthenticator(ctx.authenticator, 0.4)
            )
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            await w.command(b"USER alice")
            loop = asyncio.get_running_loop()
            sent = loop.time()
            reply = await w.command(b"PASS wrong")
            answered = loop.time() - sent

        assert b"-ERR [AUTH] Authentication failed.\r\n" == reply
        assert [] == [w for w in failure_waits if w > 0.6]
        assert answered >= 0.99  # the delay itself is kept (a lower bound, not a speed)


def fail2ban_regex(log: Path, filter_path: Path) -> tuple[int, int]:
    """Run fail2ban-regex; return (lines, matched)."""
    tool = shutil.which("fail2ban-regex")
    if tool is None:
        pytest.fail("fail2ban is not installed: run scripts/install-deps --test")
    out = subprocess.run(
        [tool, str(log), str(filter_path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    found = re.search(r"Lines: (\d+) lines, \d+ ignored, (\d+) matched", out)
    assert found is not None, out
    return int(found.group(1)), int(found.group(2))


async def write_log(tmp_path: Path, log_format: str) -> Path:
    """Run a server logging to a file: 3 failed connections, 1 of 2 failures, 2 good logins."""
    log = tmp_path / "pobox.log"
    root = logging.getLogger("pobox")
    saved = (root.handlers[:], root.level, root.propagate)
    foreign = logging.getLogger()  # setup_logging sends other libraries' warnings there too
    saved_foreign = (foreign.handlers[:], foreign.level)
    try:
        async with running_server(
            tmp_path / "srv", log_path=str(log), log_format=log_format
        ) as srv:
            setup_logging(srv.config)
            for user in (b"alice", b"nobody", b"alice"):
                await fail_once(srv, user)
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            await w.send(b"USER alice\r\nPASS x\r\nUSER alice\r\nPASS y\r\nQUIT\r\n")
            await w.read_all()
            for _ in range(2):
                w = await Wire.connect(srv.host, srv.port)
                await w.login()
                await w.command(b"QUIT")
                await w.close()
            await asyncio.sleep(0.2)  # let the sessions write their Disconnected lines
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level, root.propagate = saved
        foreign.handlers[:], foreign.level = saved_foreign
    return log


@pytest.mark.external
class TestFail2ban:
    """The failed-login line as admins' tooling sees it."""

    @pytest.mark.parametrize("log_format", ["dovecot", "pobox"])
    async def test_stock_dovecot_filter(self, tmp_path: Path, log_format: str) -> None:
        """Debian's dovecot filter matches each connection with failed logins, nothing else."""
        log = await write_log(tmp_path, log_format)
        text = log.read_text()
        assert 2 == text.count("Login: user=<alice>")

        lines, matched = fail2ban_regex(log, DOVECOT_FILTER)

        assert 4 == matched
        assert 4 == text.count("Disconnected (auth failed")
        assert lines > matched

    @pytest.mark.parametrize("log_format", ["dovecot", "pobox"])
    async def test_pobox_filter(self, tmp_path: Path, log_format: str) -> None:
        """pobox's own filter matches each failed attempt, nothing else."""
        log = await write_log(tmp_path, log_format)

        # Installed as the README says: next to the stock common.conf it includes.
        installed = tmp_path / "fail2ban" / "filter.d"
        installed.mkdir(parents=True)
        (installed / "common.conf").symlink_to(DOVECOT_FILTER.parent / "common.conf")
        shutil.copy(POBOX_FILTER, installed / "pobox.conf")

        _, matched = fail2ban_regex(log, installed / "pobox.conf")

        assert 5 == matched
        assert 5 == log.read_text().count("Authentication failed:")

    async def test_dovecot_format_line(self, tmp_path: Path) -> None:
        """With log_format = "dovecot" the line is shaped as Dovecot's, syslog prefix included."""
        log = await write_log(tmp_path, "dovecot")

        pattern = re.compile(
            r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ dovecot: pop3-login: Disconnected "
            r"\(auth failed, 1 attempts in \d+ secs\): user=<nobody>, method=PLAIN, "
            r"rip=127\.0\.0\.1, lip=127\.0\.0\.1, session=<[\w-]+>$",
            re.MULTILINE,
        )
        assert 1 == len(pattern.findall(log.read_text()))
