"""pobox on PostgreSQL end to end: two nodes, lost locks, the database down, crashes.

Real servers on loopback, real clients (poplib, smtplib's LMTP), the throwaway cluster
(``pg_cluster``), killed for real with SIGKILL where the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import poplib
import random
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from pobox.testing import RunningServer, running_server
from tests.delivery.helpers import running_pobox
from tests.helpers.accounts import ROOT_MAIL_SETTINGS
from tests.helpers.ports import free_port
from tests.helpers.postgres import Postgres, stored_messages
from tests.integration.wire import Wire

USERS = {"alice": "secret"}


def settings(dsn: str, **more: object) -> dict[str, object]:
    """Config keys of a node on the test database."""
    return {
        "mail_location": "postgresql",
        "postgresql_dsn": dsn,
        "postgresql_timeout": 3,
        "postgresql_pool_min": 1,
        **more,
    }


@pytest.fixture
async def nodes(tmp_path: Path, pg_dsn: str) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two pobox nodes (two servers, two stores) on one database."""
    async with running_server(tmp_path / "a", USERS, **settings(pg_dsn)) as a:
        async with running_server(tmp_path / "b", USERS, **settings(pg_dsn)) as b:
            yield a, b


def advisory_locks(dsn: str) -> list[int]:
    """Return the PIDs of the backends holding advisory locks."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory'").fetchall()
    return [int(row[0]) for row in rows]


def terminate(dsn: str, pid: int) -> None:
    """End backend ``pid`` (as a DBA, a failover or a network cut would)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


class TestTwoNodes:
    """The lock holds across nodes, and a node that loses it stops at once."""

    async def test_in_use_on_the_other_node(
        self, nodes: tuple[RunningServer, RunningServer]
    ) -> None:
        """Alice logged in on node A gets -ERR [IN-USE] on node B, and gets in once A quits."""
        a, b = nodes
        first = await Wire.connect(a.host, a.port)
        await first.login()
        second = await Wire.connect(b.host, b.port)
        refused = await second.attempt()
        assert b"+OK" == (await first.command(b"QUIT"))[:3]
        third = await Wire.connect(b.host, b.port)
        await third.login()
        assert refused.startswith(b"-ERR [IN-USE]")

    async def test_terminated_lock_connection_ends_the_session_without_update(
        self, nodes: tuple[RunningServer, RunningServer], pg_dsn: str
    ) -> None:
        """Node A's lock connection is terminated after DELE: the session ends with
        -ERR [SYS/TEMP], nothing is deleted, and node B serves alice at once."""
        a, b = nodes
        a.deliver("alice", b"Subject: keep\n\nkept\n")
        wire = await Wire.connect(a.host, a.port)
        await wire.login()
        assert (await wire.command(b"DELE 1")).startswith(b"+OK")
        [holder] = advisory_locks(pg_dsn)
        terminate(pg_dsn, holder)
        ended = await wire.read_all()
        assert ended.startswith(b"-ERR [SYS/TEMP]")
        other = await Wire.connect(b.host, b.port)
        await other.login()
        assert b"+OK 1 " == (await other.command(b"STAT"))[:6]


class TestDatabaseDown:
    """PostgreSQL stopped: temporary errors for POP3 and LMTP; back by itself after."""

    async def test_login_and_lmtp_fail_temporarily_then_recover(
        self, tmp_path: Path, pg_cluster: Postgres, pg_dsn: str
    ) -> None:
        """-ERR [SYS/TEMP] at login and 451 4.3.0 over LMTP while it is down; both work after."""
        async with running_pobox(tmp_path, **settings(pg_dsn)) as running:
            pop3 = running.pop3
            host, port = running.lmtp
            pg_cluster.stop()
            try:
                wire = await Wire.connect(pop3.host, pop3.port)
                login = await wire.attempt()
                refused = await asyncio.to_thread(_lmtp, host, port, 1)
            finally:
                pg_cluster.restart()
            accepted = await asyncio.to_thread(_lmtp, host, port, 2)
            wire = await Wire.connect(pop3.host, pop3.port)
            await wire.login()
            stat = await wire.command(b"STAT")
        assert (True, 451, 250, b"+OK 1 ") == (
            login.startswith(b"-ERR [SYS/TEMP]"),
            refused,
            accepted,
            stat[:6],
        )


def _lmtp(host: str, port: int, number: int, timeout: float = 30) -> int:
    """Deliver message ``number`` to alice over LMTP; return the reply code for her."""
    message = b"Subject: %d\r\nMessage-ID: <m%d@test>\r\n\r\nbody %d\r\n" % (number, number, number)
    try:
        with smtplib.LMTP(host, port, timeout=timeout) as client:
            client.sendmail("s@example.org", ["alice"], message)
    except smtplib.SMTPResponseException as exc:
        return int(exc.smtp_code)
    except smtplib.SMTPRecipientsRefused as exc:
        return int(exc.recipients["alice"][0])
    except (OSError, smtplib.SMTPException):
        return 0
    return 250


class TestKilledNode:
    """SIGKILL of a pobox node holding a session: its lock goes with its connections."""

    async def test_user_logs_in_again_at_once(self, tmp_path: Path, pg_dsn: str) -> None:
        """A `pobox serve` with alice logged in is SIGKILLed; alice gets in on another node."""
        add_user(tmp_path / "passwd", "alice", b"secret", scheme="PLAIN")
        port = free_port()
        config = tmp_path / "pobox.toml"
        config.write_text(
            f'listen = ["127.0.0.1:{port}"]\nworkers = 1\npasswd_file = "{tmp_path / "passwd"}"\n'
            f'mail_location = "postgresql"\npostgresql_dsn = "{pg_dsn}"\n' + ROOT_MAIL_SETTINGS
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "pobox", "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = await asyncio.to_thread(_login_when_up, port)
            assert 1 == len(advisory_locks(pg_dsn))
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = time.monotonic()
            async with running_server(tmp_path / "b", USERS, **settings(pg_dsn)) as other:
                wire = await Wire.connect(other.host, other.port)
                reply = await wire.attempt()
                while reply.startswith(b"-ERR [IN-USE]") and time.monotonic() - killed < 5:
                    await asyncio.sleep(0.01)  # the backend sees its client gone: milliseconds
                    wire = await Wire.connect(other.host, other.port)
                    reply = await wire.attempt()
            with contextlib.suppress(OSError):
                client.close()
            assert b"+OK Logged in.\r\n" == reply
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


class _ClosingPOP3(poplib.POP3):
    """poplib.POP3 that closes its socket when the greeting fails (poplib leaves it open, and
    the crash test's reader, which goes on, would leak it to the garbage collector)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            super().__init__(host, port, timeout=timeout)
        except BaseException:
            if getattr(self, "sock", None) is not None:
                self.close()
            raise


def _login_when_up(port: int) -> poplib.POP3:
    """Log alice in on ``port`` once the server listens; return the open session."""
    deadline = time.monotonic() + 30
    while True:
        try:
            client = poplib.POP3("127.0.0.1", port, timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        client.user("alice")
        client.pass_("secret")
        return client


#: How long the crash test delivers and retrieves (at least; on until it has more than
#: CRASH_ACKED acknowledged deliveries, up to CRASH_MAX_SECONDS on a slow machine), and how
#: many times it kills PostgreSQL.
CRASH_SECONDS = 8.0
CRASH_ACKED = 20
CRASH_MAX_SECONDS = 60.0
CRASH_KILLS = 3
_ID = re.compile(rb"Message-ID: <m(\d+)@test>")


class TestDatabaseKilled:
    """SIGKILL of every PostgreSQL process during deliveries and UPDATEs."""

    async def test_nothing_acknowledged_lost_nothing_duplicated(
        self, tmp_path: Path, pg_cluster: Postgres, pg_dsn: str
    ) -> None:
        """LMTP deliveries (retried on 4xx like an MTA) and POP3 sessions deleting what they
        read run while the server is killed and restarted: every acknowledged message is in
        the maildrop or was read by a session whose QUIT succeeded, and none is there twice."""
        start = time.monotonic()
        acked: set[int] = set()
        consumed: set[int] = set()
        duplicates_seen: list[int] = []

        def going() -> bool:
            elapsed = time.monotonic() - start
            enough = elapsed >= CRASH_SECONDS and len(acked) > CRASH_ACKED
            return not enough and elapsed < CRASH_MAX_SECONDS

        async with running_pobox(tmp_path, **settings(pg_dsn, postgresql_timeout=5)) as running:
            host, port = running.lmtp
            pop3 = running.pop3

            def deliverer(first: int) -> None:
                number = first
                while going():
                    code = _lmtp(host, port, number, timeout=20)
                    if code == 250:
                        acked.add(number)
                        number += 2
                    else:
                        time.sleep(0.05)  # try the same message again, as an MTA does

            def reader() -> None:
                while going():
                    client = None
                    try:
                        client = _ClosingPOP3(pop3.host, pop3.port, timeout=20)
                        client.user("alice")
                        client.pass_("secret")
                        count, _ = client.stat()
                        seen = []
                        for n in range(1, count + 1):
                            _, lines, _ = client.retr(n)
                            match = _ID.search(b"\n".join(lines))
                            assert match is not None
                            seen.append(int(match.group(1)))
                            client.dele(n)
                        if len(seen) != len(set(seen)):
                            duplicates_seen.extend(seen)
                        client.quit()
                    except (OSError, poplib.error_proto):
                        if client is not None:
                            client.close()
                        time.sleep(0.05)
                        continue
                    consumed.update(seen)

            def killer() -> None:
                rng = random.Random(11)
                for _ in range(CRASH_KILLS):
                    time.sleep(rng.uniform(0.8, 1.6))
                    pg_cluster.kill()
                    time.sleep(rng.uniform(0.1, 0.5))
                    pg_cluster.restart()

            await asyncio.gather(
                asyncio.to_thread(deliverer, 0),
                asyncio.to_thread(deliverer, 1),
                asyncio.to_thread(reader),
                asyncio.to_thread(killer),
            )
        left = []
        for data in stored_messages(pg_dsn, "alice"):
            match = _ID.search(data)
            assert match is not None
            left.append(int(match.group(1)))
        assert ([], [], set(), set()) == (
            duplicates_seen,
            sorted(n for n in left if left.count(n) > 1),
            set(left) & consumed,
            acked - set(left) - consumed,
        )
        assert len(acked) > CRASH_ACKED
