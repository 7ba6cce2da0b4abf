"""A real pobox server on loopback, driven with raw bytes: the seeds' sessions and RFC 1939."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from pobox.testing import RunningServer, running_server

from .wire import Wire

SEED_3 = (
    b"Return-path: <user@client.thm>\n"
    b"From: user@client.thm\n"
    b"To: strategos@server.thm\n"
    b"Subject: Telnet email\n"
    b"\n"
    b"Hello. I am using telnet to send you an email!\n"
)


def files(maildir: Path) -> list[str]:
    """Names of the messages in a Maildir (new and cur)."""
    return sorted(p.name for sub in ("new", "cur") for p in (maildir / sub).iterdir())


class TestSeedSession:
    """The session of the seeds, typed as in telnet, byte for byte."""

    async def test_telnet_session(self, srv: RunningServer) -> None:
        """USER, PASS, STAT, LIST, RETR, DELE, QUIT behave like the seeds' Dovecot session."""
        srv.deliver("alice", b"Subject: one\n\nfirst\n")
        srv.deliver("alice", b"Subject: two\n\nsecond\n")
        srv.deliver("alice", SEED_3)
        size3 = len(SEED_3) + SEED_3.count(b"\n")
        total = 23 + 24 + size3
        w = await Wire.connect(srv.host, srv.port)
        assert b"+OK pobox ready.\r\n" == await w.line()
        assert b"+OK\r\n" == await w.command(b"USER alice")
        assert b"+OK Logged in.\r\n" == await w.command(b"PASS secret")
        assert b"+OK 3 %d\r\n" % total == await w.command(b"STAT")
        await w.send(b"LIST\r\n")
        assert (
            b"+OK 3 messages (%d octets)\r\n1 23\r\n2 24\r\n3 %d\r\n.\r\n" % (total, size3)
            == await w.multiline()
        )
        await w.send(b"RETR 3\r\n")
        assert (
            b"+OK %d octets\r\n" % size3 + SEED_3.replace(b"\n", b"\r\n") + b".\r\n"
            == await w.multiline()
        )
        assert b"+OK Message 3 marked to be deleted.\r\n" == await w.command(b"DELE 3")
        assert b"+OK Logging out.\r\n" == await w.command(b"QUIT")
        assert b"" == await w.read_all()
        assert 2 == len(files(srv.maildir("alice")))

    async def test_lowercase_and_bare_lf(self, srv: RunningServer) -> None:
        """Commands typed in lower case with bare LF line ends work like the RFC form."""
        srv.deliver("alice", b"x\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.line()
        await w.send(b"user alice\npass secret\nstat\nquit\n")
        assert b"+OK\r\n" == await w.line()
        assert b"+OK Logged in.\r\n" == await w.line()
        assert b"+OK 1 3\r\n" == await w.line()
        assert b"+OK Logging out.\r\n" == await w.line()


class TestUpdateState:
    """Deletion happens only in UPDATE, after QUIT (RFC 1939 §6)."""

    async def test_drop_without_quit_deletes_nothing(self, srv: RunningServer) -> None:
        """A connection that drops after DELE leaves every message in place."""
        srv.deliver("alice", b"a\n")
        srv.deliver("alice", b"b\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        assert (await w.command(b"DELE 1")).startswith(b"+OK")
        assert (await w.command(b"DELE 2")).startswith(b"+OK")
        await w.close()
        await asyncio.sleep(0.2)
        assert 2 == len(files(srv.maildir("alice")))

    async def test_rset_then_quit_keeps_messages(self, srv: RunningServer) -> None:
        """RSET unmarks, so QUIT removes nothing."""
        srv.deliver("alice", b"a\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        await w.command(b"DELE 1")
        assert b"+OK maildrop has 1 messages (3 octets)\r\n" == await w.command(b"RSET")
        assert b"+OK Logging out.\r\n" == await w.command(b"QUIT")
        assert 1 == len(files(srv.maildir("alice")))

    async def test_next_session_sees_deletions(self, srv: RunningServer) -> None:
        """After QUIT, the next session sees the remaining messages renumbered."""
        srv.deliver("alice", b"a\n")
        srv.deliver("alice", b"bb\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        await w.command(b"DELE 1")
        await w.command(b"QUIT")
        w2 = await Wire.connect(srv.host, srv.port)
        await w2.login()
        assert b"+OK 1 4\r\n" == await w2.command(b"STAT")
        assert b"+OK 1 4\r\n" == await w2.command(b"LIST 1")


class TestAuthentication:
    """Logins: right, wrong, unknown, locked."""

    async def test_wrong_password_and_unknown_user_look_the_same(self, srv: RunningServer) -> None:
        """A wrong password and an unknown user get the same -ERR [AUTH] reply."""
        replies = []
        for user, password in ((b"alice", b"wrong"), (b"nobody", b"secret")):
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            await w.command(b"USER " + user)
            replies.append(await w.command(b"PASS " + password))
            await w.close()
        assert [b"-ERR [AUTH] Authentication failed.\r\n"] * 2 == replies

    async def test_name_formatted_before_the_check(
        self, srv: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``USER ALICE`` is alice (auth_username_format %Lu): her maildrop, her log line."""
        caplog.set_level(logging.INFO, logger="pobox")
        srv.deliver("alice", b"a\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.line()
        await w.command(b"USER ALICE")
        assert b"+OK Logged in.\r\n" == await w.command(b"PASS secret")
        assert b"+OK 1 3\r\n" == await w.command(b"STAT")
        await w.command(b"QUIT")
        lines = [r.getMessage() for r in caplog.records]
        assert any(line.startswith("pop3-login: Login: user=<alice>, ") for line in lines), lines

    async def test_second_login_gets_in_use(self, srv: RunningServer) -> None:
        """A second session for a locked maildrop gets -ERR [IN-USE]; after QUIT it works."""
        w1 = await Wire.connect(srv.host, srv.port)
        await w1.login()
        w2 = await Wire.connect(srv.host, srv.port)
        await w2.line()
        await w2.command(b"USER alice")
        reply = await w2.command(b"PASS secret")
        assert reply.startswith(b"-ERR [IN-USE] ")
        await w1.command(b"QUIT")
        await w2.command(b"USER alice")
        assert b"+OK Logged in.\r\n" == await w2.command(b"PASS secret")

    async def test_lock_released_when_client_vanishes(self, srv: RunningServer) -> None:
        """A dropped connection releases the maildrop lock."""
        w1 = await Wire.connect(srv.host, srv.port)
        await w1.login()
        await w1.close()
        await asyncio.sleep(0.2)
        w2 = await Wire.connect(srv.host, srv.port)
        await w2.login()

    async def test_failure_delay_applies_to_unknown_users_too(self, tmp_path: Path) -> None:
        """With auth_failure_delay set, both failure kinds wait at least that long."""
        async with running_server(tmp_path, auth_failure_delay=0.3) as srv:
            loop = asyncio.get_running_loop()
            for user in (b"alice", b"nobody"):
                w = await Wire.connect(srv.host, srv.port)
                await w.line()
                await w.command(b"USER " + user)
                start = loop.time()
                reply = await w.command(b"PASS wrong")
                assert loop.time() - start >= 0.3
                assert reply.startswith(b"-ERR [AUTH]")
                await w.close()


class TestTimeouts:
    """The autologout timer (RFC 1939 §3) and the pre-login timeout."""

    async def test_idle_session_closed_without_update(self, tmp_path: Path) -> None:
        """On autologout the server closes silently, deletes nothing and frees the lock."""
        async with running_server(tmp_path, idle_timeout=0.5) as srv:
            srv.deliver("alice", b"a\n")
            w = await Wire.connect(srv.host, srv.port)
            await w.login()
            assert (await w.command(b"DELE 1")).startswith(b"+OK")
            assert b"" == await w.read_all(timeout=5)
            assert 1 == len(files(srv.maildir("alice")))
            w2 = await Wire.connect(srv.host, srv.port)
            await w2.login()

    async def test_silent_client_before_login_is_dropped(self, tmp_path: Path) -> None:
        """A client that never logs in is disconnected after login_timeout."""
        async with running_server(tmp_path, login_timeout=0.3) as srv:
            w = await Wire.connect(srv.host, srv.port)
            assert b"+OK pobox ready.\r\n" == await w.line()
            assert b"" == await w.read_all(timeout=5)

    async def test_activity_keeps_a_slow_login_alive(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each command restarts login_timeout, and idle_timeout takes over after login."""
        caplog.set_level(logging.INFO, logger="pobox")
        async with running_server(tmp_path, login_timeout=0.4, idle_timeout=0.6) as srv:
            w = await Wire.connect(srv.host, srv.port)
            assert b"+OK pobox ready.\r\n" == await w.line()
            for _ in range(5):  # 1.25 s in all, each wait shorter than login_timeout
                await asyncio.sleep(0.25)
                await w.send(b"CAPA\r\n")
                assert (await w.multiline()).startswith(b"+OK Capability list follows\r\n")
            assert b"+OK\r\n" == await w.command(b"USER alice")
            assert b"+OK Logged in.\r\n" == await w.command(b"PASS secret")
            assert b"" == await w.read_all(timeout=5)
        lines = [r.getMessage() for r in caplog.records]
        assert any("Disconnected: Inactivity - no input for 0.6 secs" in line for line in lines)

    async def test_login_deadline_ends_a_busy_unauthenticated_client(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A CAPA every 0.2 s does not keep a connection open past login_deadline."""
        caplog.set_level(logging.INFO, logger="pobox")
        async with running_server(tmp_path, login_deadline=1.0) as srv:
            w = await Wire.connect(srv.host, srv.port)
            await w.line()
            capas = 0
            with contextlib.suppress(ConnectionError):
                while capas < 50:  # 10 s of activity, far beyond the deadline
                    await asyncio.sleep(0.2)
                    await w.send(b"CAPA\r\n")
                    if not (await w.multiline()).startswith(b"+OK"):
                        break
                    capas += 1
            await asyncio.sleep(0.1)
        lines = [r.getMessage() for r in caplog.records]

        assert capas < 50
        assert any(
            "Disconnected (no auth attempts in 1 secs): Login time limit - not logged in after "
            "1 secs, rip=127.0.0.1" in line
            for line in lines
        ), lines

    async def test_login_deadline_logged_with_its_age_when_the_loop_clock_lags(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A loop clock behind time.monotonic at connect does not log a younger session.

        uvloop's clock is cached per loop iteration: at a connection it may be behind by what
        the iteration has run so far. Here it is 0.5 s behind until the greeting, then exact;
        the session ends at its deadline and its last line says so in the same seconds.
        """
        caplog.set_level(logging.INFO, logger="pobox")
        loop = asyncio.get_running_loop()
        lag = [0.0]
        monotonic = loop.time
        loop.time = lambda: monotonic() - lag[0]  # type: ignore[method-assign]
        try:
            async with running_server(tmp_path, login_deadline=1.0) as srv:
                lag[0] = 0.5
                w = await Wire.connect(srv.host, srv.port)
                await w.line()
                lag[0] = 0.0
                with contextlib.suppress(ConnectionError):
                    while await w.line(timeout=5):
                        pass
                await asyncio.sleep(0.1)
        finally:
            del loop.time
        lines = [r.getMessage() for r in caplog.records]
        assert any(
            "Disconnected (no auth attempts in 1 secs): Login time limit - not logged in after "
            "1 secs, rip=127.0.0.1" in line
            for line in lines
        ), lines

    async def test_login_deadline_ends_at_login(self, tmp_path: Path) -> None:
        """Once logged in, the deadline no longer applies: idle_timeout does."""
        async with running_server(tmp_path, login_deadline=0.6) as srv:
            w = await Wire.connect(srv.host, srv.port)
            await w.login()
            for _ in range(6):  # 1.2 s in all
                await asyncio.sleep(0.2)
                assert b"+OK\r\n" == await w.command(b"NOOP")

    async def test_client_that_stops_reading_is_dropped(self, tmp_path: Path) -> None:
        """A client that stops reading in the middle of a RETR is cut off after idle_timeout."""
        async with running_server(tmp_path, idle_timeout=0.5) as srv:
            srv.deliver("alice", b"Subject: big\n\n" + (b"y" * 999 + b"\n") * 30_000)
            w = await Wire.connect(srv.host, srv.port)
            await w.login()
            await w.send(b"RETR 1\r\n")
            await asyncio.sleep(2)  # the client reads nothing: the server's writes back up
            out = await w.read_all(timeout=10)
            assert out.startswith(b"+OK ")
            assert not out.endswith(b"\r\n.\r\n")


class TestPipelining:
    """PIPELINING (RFC 2449 §6.6): many commands in one write, answered in order."""

    async def test_one_write_many_commands(self, srv: RunningServer) -> None:
        """A whole session sent in one TCP write gets every reply, in order."""
        srv.deliver("alice", b"Subject: a\n\n.dot\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.line()
        await w.send(
            b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nUIDL 1\r\nTOP 1 0\r\n"
            b"RETR 1\r\nDELE 1\r\nSTAT\r\nQUIT\r\n"
        )
        out = await w.read_all()
        uidl = out.split(b"+OK 1 ", 2)[2].split(b"\r\n")[0]
        assert (
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\nUTF8 USER\r\nLANG\r\n"
            b"IMPLEMENTATION pobox\r\n.\r\n"
            b"+OK\r\n+OK Logged in.\r\n+OK 1 20\r\n+OK 1 " + uidl + b"\r\n"
            b"+OK\r\nSubject: a\r\n\r\n.\r\n"
            b"+OK 20 octets\r\nSubject: a\r\n\r\n..dot\r\n.\r\n"
            b"+OK Message 1 marked to be deleted.\r\n+OK 0 0\r\n+OK Logging out.\r\n" == out
        )


class TestRobustness:
    """Bad input gets -ERR, never a traceback, never a crash."""

    async def test_garbage_then_normal_session(self, srv: RunningServer) -> None:
        """Binary garbage and over-long lines get -ERR; the server keeps serving."""
        w = await Wire.connect(srv.host, srv.port)
        await w.line()
        await w.send(b"\x00\xff\xfe garbage\r\n" + b"A" * 100_000 + b"\r\nNOOP\r\n")
        assert b"-ERR Invalid characters in command.\r\n" == await w.line()
        assert b"-ERR Line too long.\r\n" == await w.line()
        assert b"-ERR Not logged in.\r\n" == await w.line()
        w2 = await Wire.connect(srv.host, srv.port)
        await w2.login()

    async def test_too_many_bad_commands_close(self, srv: RunningServer) -> None:
        """Ten bad commands in a row end the session."""
        w = await Wire.connect(srv.host, srv.port)
        await w.line()
        await w.send(b"BOGUS\r\n" * 12)
        out = await w.read_all()
        assert b"-ERR Unknown command.\r\n" * 9 + b"-ERR Too many bad commands.\r\n" == out

    async def test_bad_arguments(self, srv: RunningServer) -> None:
        """Invalid message numbers get -ERR and the session goes on."""
        srv.deliver("alice", b"a\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        for arg, reply in (
            (b"RETR 0", b"-ERR There's no message 0.\r\n"),
            (b"RETR -1", b"-ERR Invalid message number: -1\r\n"),
            (b"RETR x", b"-ERR Invalid message number: x\r\n"),
            (b"RETR 99999999999999999999", b"-ERR There's no message 99999999999999999999.\r\n"),
            (b"RETR 1 2", b"-ERR RETR takes one argument: a message number.\r\n"),
        ):
            assert reply == await w.command(arg)
        assert b"+OK 1 3\r\n" == await w.command(b"STAT")


class TestSnapshot:
    """A session sees the maildrop as it was at login."""

    async def test_mail_delivered_during_session_shows_next_time(self, srv: RunningServer) -> None:
        """New mail is not in the open session's listing, but is in the next session's."""
        srv.deliver("alice", b"a\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        srv.deliver("alice", b"bb\n")
        assert b"+OK 1 3\r\n" == await w.command(b"STAT")
        await w.command(b"QUIT")
        w2 = await Wire.connect(srv.host, srv.port)
        await w2.login()
        assert b"+OK 2 7\r\n" == await w2.command(b"STAT")


class TestLogging:
    """The log tells an admin what happened, the way Dovecot's does, without passwords."""

    async def test_logout_line_has_counters(
        self, srv: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The session-end line carries top/retr/del/size counters."""
        caplog.set_level(logging.INFO, logger="pobox")
        srv.deliver("alice", b"a\n")
        srv.deliver("alice", b"bb\n")
        w = await Wire.connect(srv.host, srv.port)
        await w.login()
        await w.send(b"RETR 1\r\n")
        await w.multiline()
        await w.command(b"DELE 2")
        await w.command(b"QUIT")
        await w.read_all()
        await asyncio.sleep(0.1)
        lines = [r.getMessage() for r in caplog.records]
        assert any(
            line.startswith("pop3(alice)<")
            and line.endswith(": Disconnected: Logged out top=0/0, retr=1/6, del=1/2, size=7")
            for line in lines
        ), lines

    async def test_trace_masks_password(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """--trace logs C:/S: lines, and the password never appears in the log."""
        caplog.set_level(logging.INFO, logger="pobox")
        async with running_server(tmp_path, trace=True) as srv:
            w = await Wire.connect(srv.host, srv.port)
            await w.login()
            await w.command(b"QUIT")
            await w.read_all()
            await asyncio.sleep(0.1)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "C: USER alice" in text
        assert "C: PASS ***" in text
        assert "S: +OK Logged in." in text
        assert "secret" not in text
