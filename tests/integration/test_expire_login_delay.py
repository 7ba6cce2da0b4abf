"""RFC 2449 EXPIRE and LOGIN-DELAY, enforced, on a real server on loopback, with poplib.

Both stores (Maildir and PostgreSQL).  Time never passes by sleeping: the session context's
clock (retrieval times, EXPIRE) and the login times' clock (LOGIN-DELAY) are moved by hand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import poplib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.state import MemoryLoginTimes
from pobox.state.postgres import PostgresLoginTimes, PostgresState
from pobox.testing import RunningServer, running_server
from tests.integration.test_workers import connect_to, two_workers, worker_pids
from tests.integration.test_workers import login as worker_login

CLIENT_TIMEOUT = 10.0
DAY = 86_400


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["maildir", "postgresql"])
def store(request: pytest.FixtureRequest) -> dict[str, object]:
    """The settings of each store in turn."""
    if request.param == "maildir":
        return {}
    dsn = request.getfixturevalue("pg_dsn")
    return {"mail_location": "postgresql", "postgresql_dsn": dsn, "postgresql_timeout": 10}


@asynccontextmanager
async def server(
    tmp_path: Path, clock: Clock, settings: dict[str, object], **more: Any
) -> AsyncIterator[RunningServer]:
    """Run a server (users alice and bob) whose sessions and login times use ``clock``."""
    async with running_server(
        tmp_path, {"alice": "secret", "bob": "secret"}, **settings, **more
    ) as srv:
        pop3 = srv.server
        pop3.ctx = dataclasses.replace(pop3.ctx, clock=clock)
        cluster = pop3.ctx.cluster
        assert cluster is not None
        state = None
        if settings.get("shared_state") == "postgresql":
            state = PostgresState(str(settings["postgresql_dsn"]), timeout=10, clock=clock)
            cluster.logins = PostgresLoginTimes(state)
        else:
            cluster.logins = MemoryLoginTimes(clock=clock)
        try:
            yield srv
        finally:
            if state is not None:
                await state.aclose()


def login(srv: RunningServer, user: str = "alice", password: str = "secret") -> poplib.POP3:
    """Log ``user`` in by POP3."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    client.user(user)
    client.pass_(password)
    return client


def login_reply(srv: RunningServer, user: str = "alice", password: str = "secret") -> str:
    """Try to log in; return PASS's reply line (and QUIT)."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    try:
        client.user(user)
        try:
            return client.pass_(password).decode()
        except poplib.error_proto as exc:
            return bytes(exc.args[0]).decode()
    finally:
        client.quit()


def capabilities(srv: RunningServer, user: str | None) -> dict[str, list[str]]:
    """Return CAPA before login (``user`` None) or after ``user`` logged in."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    try:
        if user is not None:
            client.user(user)
            client.pass_("secret")
        return client.capa()
    finally:
        client.quit()


def session(srv: RunningServer, work: Callable[[poplib.POP3], object], user: str = "alice") -> None:
    """Log in, do ``work``, QUIT."""
    client = login(srv, user)
    work(client)
    client.quit()


def uidls(srv: RunningServer, user: str = "alice") -> list[bytes]:
    """Return the UIDLs of ``user``'s maildrop (a session that retrieves nothing)."""
    client = login(srv, user)
    try:
        return [line.split()[1] for line in client.uidl()[1]]
    finally:
        client.quit()


def deliver(srv: RunningServer, user: str, count: int) -> None:
    """Deliver ``count`` small messages to ``user``."""
    for n in range(count):
        srv.deliver(user, f"Subject: {n}\n\nmessage {n}\n".encode())


class TestCapa:
    """CAPA advertises what is enforced: the server's values before login, the user's after."""

    async def test_absent_by_default(self, tmp_path: Path) -> None:
        """Neither key set: neither capability, before or after login."""
        async with server(tmp_path, Clock(), {}) as srv:
            before = await asyncio.to_thread(capabilities, srv, None)
            after = await asyncio.to_thread(capabilities, srv, "alice")
        assert not {"EXPIRE", "LOGIN-DELAY"} & (set(before) | set(after))

    async def test_global_and_per_user(self, tmp_path: Path) -> None:
        """``USER`` before login; after it, the user's own values (userdb fields) or the global."""
        async with server(tmp_path, Clock(), {}, pop3_expire_days=30, pop3_login_delay=900) as srv:
            add_user(
                srv.config.passwd_file,
                "carol",
                b"secret",
                "PLAIN",
                extra=["pop3_expire_days=never", "pop3_login_delay=0"],
            )
            srv.maildir("carol").mkdir(parents=True)
            before = await asyncio.to_thread(capabilities, srv, None)
            alice = await asyncio.to_thread(capabilities, srv, "alice")
            carol = await asyncio.to_thread(capabilities, srv, "carol")
        assert (["30", "USER"], ["900", "USER"]) == (before["EXPIRE"], before["LOGIN-DELAY"])
        assert (["30"], ["900"]) == (alice["EXPIRE"], alice["LOGIN-DELAY"])
        assert (["NEVER"], ["0"]) == (carol["EXPIRE"], carol["LOGIN-DELAY"])

    @pytest.mark.parametrize("value", ["-1", "soon", "3.5", True])
    def test_bad_expire_refused(self, value: object) -> None:
        """A value that is neither days nor ``never`` is a config error naming the key."""
        with pytest.raises(ConfigError, match="pop3_expire_days"):
            build_config({"pop3_expire_days": value})

    @pytest.mark.parametrize(("value", "expected"), [(7, "7"), ("never", "NEVER"), ("", "")])
    def test_expire_forms(self, value: object, expected: str) -> None:
        """A TOML number or string of days, ``never`` or empty."""
        assert expected == build_config({"pop3_expire_days": value}).pop3_expire_days


class TestExpireZero:
    """EXPIRE 0: messages RETR'd in a session are deleted at its QUIT, without DELE."""

    async def test_retr_deleted_top_kept(self, tmp_path: Path, store: dict[str, object]) -> None:
        """RETR'd messages go at QUIT; TOP'd and untouched ones stay; DELE still works."""
        async with server(tmp_path, Clock(), store, pop3_expire_days=0) as srv:
            deliver(srv, "alice", 4)
            before = await asyncio.to_thread(uidls, srv)

            def work(client: poplib.POP3) -> None:
                client.retr(1)
                client.top(2, 0)
                client.retr(3)
                client.retr(3)
                client.dele(4)

            await asyncio.to_thread(session, srv, work)
            after = await asyncio.to_thread(uidls, srv)
        assert [before[1]] == after

    async def test_no_quit_no_deletion(self, tmp_path: Path, store: dict[str, object]) -> None:
        """A session that ends without QUIT never enters UPDATE: nothing is deleted."""
        async with server(tmp_path, Clock(), store, pop3_expire_days=0) as srv:
            deliver(srv, "alice", 2)

            def dropped() -> None:
                client = login(srv)
                client.retr(1)
                client.close()

            await asyncio.to_thread(dropped)
            count = len(await asyncio.to_thread(uidls, srv))
        assert 2 == count

    async def test_never_deletes_nothing(self, tmp_path: Path, store: dict[str, object]) -> None:
        """``never``: RETR'd messages stay."""
        async with server(tmp_path, Clock(), store, pop3_expire_days="never") as srv:
            deliver(srv, "alice", 1)
            await asyncio.to_thread(session, srv, lambda c: c.retr(1))
            count = len(await asyncio.to_thread(uidls, srv))
        assert 1 == count


class TestExpireDays:
    """EXPIRE n: a message goes at the first UPDATE n days or more after its first RETR."""

    async def test_one_day(self, tmp_path: Path, store: dict[str, object]) -> None:
        """Retrieved a day ago: deleted at the next QUIT; retrieved later, or never: kept."""
        clock = Clock()
        async with server(tmp_path, clock, store, pop3_expire_days=1) as srv:
            deliver(srv, "alice", 3)
            first = await asyncio.to_thread(uidls, srv)
            await asyncio.to_thread(session, srv, lambda c: c.retr(1))
            clock.now += 3600
            await asyncio.to_thread(session, srv, lambda c: (c.retr(2), c.retr(1)))
            clock.now += DAY - 3600 - 1  # a second short of a day after message 1's RETR
            await asyncio.to_thread(session, srv, lambda c: c.noop())
            early = await asyncio.to_thread(uidls, srv)
            clock.now += 1  # the day is up for message 1 (its later RETR does not count)
            await asyncio.to_thread(session, srv, lambda c: c.noop())
            late = await asyncio.to_thread(uidls, srv)
        assert (first, first[1:]) == (early, late)

    async def test_listing_unchanged_until_update(
        self, tmp_path: Path, store: dict[str, object]
    ) -> None:
        """An expired message is listed (and retrievable) in the session that deletes it."""
        clock = Clock()
        async with server(tmp_path, clock, store, pop3_expire_days=2) as srv:
            deliver(srv, "alice", 2)
            await asyncio.to_thread(session, srv, lambda c: c.retr(2))
            clock.now += 3 * DAY
            client = await asyncio.to_thread(login, srv)
            stat = await asyncio.to_thread(client.stat)
            body = (await asyncio.to_thread(client.retr, 2))[1]
            await asyncio.to_thread(client.quit)
            left = await asyncio.to_thread(uidls, srv)
        assert (2, [b"Subject: 1", b"", b"message 1"], 1) == (stat[0], body, len(left))


class TestPerUser:
    """The userdb fields of the same names override the global values."""

    async def test_expire_field(self, tmp_path: Path, store: dict[str, object]) -> None:
        """carol's ``pop3_expire_days=0`` deletes her RETR'd mail; alice's global never."""
        async with server(tmp_path, Clock(), store, pop3_expire_days="never") as srv:
            add_user(
                srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=["pop3_expire_days=0"]
            )
            srv.maildir("carol").mkdir(parents=True)
            deliver(srv, "carol", 1)
            deliver(srv, "alice", 1)
            await asyncio.to_thread(session, srv, lambda c: c.retr(1), "carol")
            await asyncio.to_thread(session, srv, lambda c: c.retr(1), "alice")
            carol = await asyncio.to_thread(uidls, srv, "carol")
            alice = await asyncio.to_thread(uidls, srv, "alice")
        assert (0, 1) == (len(carol), len(alice))

    async def test_bad_fields_ignored(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Bad values are logged and the global ones apply."""
        async with server(tmp_path, Clock(), {}, pop3_expire_days=0, pop3_login_delay=60) as srv:
            add_user(
                srv.config.passwd_file,
                "carol",
                b"secret",
                "PLAIN",
                extra=["pop3_expire_days=soon", "pop3_login_delay=-3"],
            )
            srv.maildir("carol").mkdir(parents=True)
            with caplog.at_level("WARNING", logger="pobox"):
                caps = await asyncio.to_thread(capabilities, srv, "carol")
        assert (["0"], ["60"]) == (caps["EXPIRE"], caps["LOGIN-DELAY"])
        bad = [r.getMessage() for r in caplog.records if "bad pop3_" in r.getMessage()]
        assert 2 == len(bad), bad

    async def test_login_delay_field(self, tmp_path: Path) -> None:
        """carol's ``pop3_login_delay=600`` applies to her alone (no global delay)."""
        clock = Clock()
        async with server(tmp_path, clock, {}) as srv:
            add_user(
                srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=["pop3_login_delay=600"]
            )
            srv.maildir("carol").mkdir(parents=True)
            replies = [await asyncio.to_thread(login_reply, srv, user) for user in ("carol",) * 2]
            alice = [await asyncio.to_thread(login_reply, srv, "alice") for _ in range(2)]
        assert replies[0].startswith("+OK")
        assert replies[1].startswith("-ERR [LOGIN-DELAY] ")
        assert all(reply.startswith("+OK") for reply in alice)


class TestLoginDelay:
    """LOGIN-DELAY n: a login under n seconds after the last gets -ERR [LOGIN-DELAY]."""

    @pytest.mark.parametrize("shared", ["memory", "postgresql"])
    async def test_refused_then_admitted(
        self, tmp_path: Path, shared: str, request: pytest.FixtureRequest
    ) -> None:
        """Second login refused; a wrong password still gets [AUTH]; after n s, admitted."""
        settings: dict[str, object] = {}
        if shared == "postgresql":
            dsn = request.getfixturevalue("pg_dsn")
            settings = {
                "mail_location": "postgresql",
                "postgresql_dsn": dsn,
                "postgresql_timeout": 10,
                "shared_state": "postgresql",
                "shared_state_timeout": 10,
            }
        clock = Clock()
        async with server(tmp_path, clock, settings, pop3_login_delay=600) as srv:
            first = await asyncio.to_thread(login_reply, srv)
            clock.now += 599
            early = await asyncio.to_thread(login_reply, srv)
            wrong = await asyncio.to_thread(login_reply, srv, "alice", "wrong")
            other = await asyncio.to_thread(login_reply, srv, "bob")
            clock.now += 1
            late = await asyncio.to_thread(login_reply, srv)
        assert first.startswith("+OK")
        assert "-ERR [LOGIN-DELAY] Wait 600 seconds between logins, try later." == early
        assert wrong.startswith("-ERR [AUTH] ")
        assert other.startswith("+OK")
        assert late.startswith("+OK")


class TestPostgresUsers:
    """The users table's columns are the per-user values with userdb = "postgresql"."""

    async def test_columns(self, tmp_path: Path, pg_dsn: str) -> None:
        """``pop3_expire_days = '0'`` deletes RETR'd mail; ``pop3_login_delay`` refuses."""
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO pobox.users (username, password, pop3_expire_days,"
                " pop3_login_delay) VALUES ('dave', '{PLAIN}secret', '0', 60)"
            )
        settings = {
            "userdb": "postgresql",
            "mail_location": "postgresql",
            "postgresql_dsn": pg_dsn,
            "postgresql_timeout": 10,
        }
        clock = Clock()
        async with server(tmp_path, clock, settings) as srv:
            deliver(srv, "dave", 2)
            caps = await asyncio.to_thread(capabilities, srv, "dave")
            early = await asyncio.to_thread(login_reply, srv, "dave")
            clock.now += 60
            await asyncio.to_thread(session, srv, lambda c: c.retr(2), "dave")
            clock.now += 60
            left = len(await asyncio.to_thread(uidls, srv, "dave"))
        assert (["0"], ["60"]) == (caps["EXPIRE"], caps["LOGIN-DELAY"])
        assert early.startswith("-ERR [LOGIN-DELAY] ")
        assert 1 == left


class TestWorkers:
    """``workers = 2``: login times are the master's, so a delay holds across workers."""

    async def test_delay_across_workers(self, tmp_path: Path) -> None:
        """A login on one worker makes the next, on the other, wait (no clock needed: 600 s)."""
        async with two_workers(tmp_path, pop3_login_delay=600) as proc:
            first, second = worker_pids(proc)
            wire = await connect_to(proc, first)
            assert b"+OK Logged in.\r\n" == await worker_login(wire, b"alice", b"secret")
            assert b"+OK" == (await wire.command(b"QUIT"))[:3]
            wire = await connect_to(proc, second)
            refused = await worker_login(wire, b"alice", b"secret")
            wire = await connect_to(proc, second)
            bob = await worker_login(wire, b"bob", b"hunter2")
        assert b"-ERR [LOGIN-DELAY] Wait 600 seconds between logins, try later.\r\n" == refused
        assert b"+OK Logged in.\r\n" == bob
