"""Client workarounds and per-user limits against a real server on loopback, with poplib."""

from __future__ import annotations

import asyncio
import poplib
from pathlib import Path

import psycopg
import pytest

from pobox.auth.passwdfile import add_user
from pobox.config import build_config
from pobox.errors import ConfigError
from pobox.testing import RunningServer, deliver_to_maildir, running_server

CLIENT_TIMEOUT = 10.0

#: A header without the empty line that ends it, a NUL in it, and a normal message.
HEADER_ONLY = b"Subject: no body\nX-Nul: a\0b\n"
NORMAL = b"Subject: hi\n\n.dot\nbody\0\n"


def login(srv: RunningServer, user: str = "alice", password: str = "secret") -> poplib.POP3:
    """Log ``user`` in by POP3."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    client.user(user)
    client.pass_(password)
    return client


def listing(srv: RunningServer) -> list[bytes]:
    """Return LIST's lines in one session."""
    client = login(srv)
    try:
        return client.list()[1]
    finally:
        client.quit()


def sizes_and_messages(srv: RunningServer) -> tuple[bytes, list[bytes], list[tuple[bytes, int]]]:
    """Return STAT, LIST, and each RETR's (status line, octets read) in one session."""
    client = login(srv)
    try:
        stat = client.stat()
        listing = client.list()[1]
        retrieved = []
        for number in (1, 2):
            resp, lines, octets = client.retr(number)
            retrieved.append((resp, octets, b"\r\n".join(lines)))
        return (
            f"{stat[0]} {stat[1]}".encode(),
            listing,
            [(resp, octets) for resp, octets, _ in retrieved],
        ), [body for _, _, body in retrieved]
    finally:
        client.quit()


class TestClientWorkarounds:
    """pop3_client_workarounds on a real server: what is sent and the sizes announced."""

    async def test_both_workarounds(self, tmp_path: Path) -> None:
        """NULs arrive as 0x80; a header-only message gets its header end, counted in sizes."""
        async with running_server(
            tmp_path, pop3_client_workarounds="outlook-no-nuls oe-ns-eoh"
        ) as srv:
            deliver_to_maildir(srv.maildir("alice"), HEADER_ONLY)
            deliver_to_maildir(srv.maildir("alice"), NORMAL)
            (stat, listing, retrs), bodies = await asyncio.to_thread(sizes_and_messages, srv)
        # Wire sizes: 30 + 2 for the added header end; 28 for the normal message.
        assert (b"2 60", [b"1 32", b"2 28"]) == (stat, listing)
        assert [b"+OK 32 octets", b"+OK 28 octets"] == [r for r, _ in retrs]
        assert [b"Subject: no body", b"X-Nul: a\x80b", b""] == bodies[0].split(b"\r\n")
        assert b"Subject: hi\r\n\r\n.dot\r\nbody\x80" == bodies[1]
        # poplib counts each line and its CRLF (less the stuffed dot): the announced sizes.
        assert [32, 28] == [octets for _, octets in retrs]

    async def test_header_end_cached_in_the_index(self, tmp_path: Path) -> None:
        """The first login finds the header end and the index keeps it; the next reads none.

        The message is changed behind pobox's back (same name, header end added): a login
        that read it again would announce 30 octets, not the cached 32.
        """
        async with running_server(tmp_path, pop3_client_workarounds="oe-ns-eoh") as srv:
            maildir = srv.maildir("alice")
            path = deliver_to_maildir(maildir, HEADER_ONLY)
            first = await asyncio.to_thread(listing, srv)
            index = (maildir / "pobox-uidlist").read_text()
            path.write_bytes(b"\n" + HEADER_ONLY[:-1])
            second = await asyncio.to_thread(listing, srv)
        assert ([b"1 32"], [b"1 32"]) == (first, second)
        assert f" H0 :{path.name}" in index

    async def test_off_by_default(self, tmp_path: Path) -> None:
        """Without workarounds, sizes are the wire sizes and the bytes go as stored."""
        async with running_server(tmp_path) as srv:
            deliver_to_maildir(srv.maildir("alice"), HEADER_ONLY)
            deliver_to_maildir(srv.maildir("alice"), NORMAL)
            (stat, listing, retrs), bodies = await asyncio.to_thread(sizes_and_messages, srv)
        assert (b"2 58", [b"1 30", b"2 28"]) == (stat, listing)
        assert [b"Subject: no body", b"X-Nul: a\0b"] == bodies[0].split(b"\r\n")
        assert [30, 28] == [octets for _, octets in retrs]

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("", ()),
            ("oe-ns-eoh  Outlook-No-Nuls", ("oe-ns-eoh", "outlook-no-nuls")),
            (["outlook-no-nuls", "outlook-no-nuls"], ("outlook-no-nuls",)),
        ],
    )
    async def test_config_forms(self, tmp_path: Path, value: object, expected: tuple) -> None:
        """Dovecot's space-separated string and a TOML list are both read."""
        async with running_server(tmp_path, pop3_client_workarounds=value) as srv:
            assert expected == srv.config.pop3_client_workarounds

    @pytest.mark.parametrize("value", ["oe-ns-eoh no-such-thing", [3], 7])
    def test_config_refuses_unknown(self, value: object) -> None:
        """An unknown name or a wrong type is a config error naming the key."""
        with pytest.raises(ConfigError, match="pop3_client_workarounds"):
            build_config({"pop3_client_workarounds": value})


def refused(srv: RunningServer, user: str) -> str:
    """Try to log ``user`` in (password ``secret``); return the server's refusal."""
    client = poplib.POP3(srv.host, srv.port, timeout=CLIENT_TIMEOUT)
    try:
        client.user(user)
        with pytest.raises(poplib.error_proto) as caught:
            client.pass_("secret")
        return caught.value.args[0].decode()
    finally:
        client.quit()


class TestNoPop3:
    """The userdb field ``nopop3`` refuses the login with ``[SYS/PERM]``, and logs it."""

    @pytest.mark.parametrize("field", ["nopop3", "nopop3=yes", "userdb_nopop3=y"])
    async def test_refused(
        self, tmp_path: Path, field: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A user with the field set gets -ERR [SYS/PERM]; the log line names the user."""
        async with running_server(tmp_path) as srv:
            add_user(srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=[field])
            (srv.maildir("carol")).mkdir(parents=True)
            with caplog.at_level("INFO", logger="pobox"):
                reply = await asyncio.to_thread(refused, srv, "carol")
        assert "-ERR [SYS/PERM] POP3 access is disabled for this account." == reply
        assert any(
            "Login refused, POP3 disabled for the user: user=<carol>" in r.getMessage()
            for r in caplog.records
        )

    @pytest.mark.parametrize("field", ["nopop3=no", "nopop3=0", "pop3=no"])
    async def test_not_set(self, tmp_path: Path, field: str) -> None:
        """``nopop3=no`` (or another field) leaves POP3 on."""
        async with running_server(tmp_path) as srv:
            add_user(srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=[field])
            (srv.maildir("carol")).mkdir(parents=True)
            client = await asyncio.to_thread(login, srv, "carol")
            assert b"+OK" == (await asyncio.to_thread(client.noop))[:3]
            await asyncio.to_thread(client.quit)


def try_retr(client: poplib.POP3, number: int, top: int | None = None) -> str:
    """RETR (or TOP) ``number``; return ``"+OK"`` or the server's -ERR line."""
    try:
        if top is None:
            client.retr(number)
        else:
            client.top(number, top)
    except poplib.error_proto as exc:
        return exc.args[0].decode()
    return "+OK"


def session(srv: RunningServer, user: str, commands: list[tuple[int, int | None]]) -> list[str]:
    """Log in, run RETR (top None) / TOP commands, QUIT; return each answer."""
    client = login(srv, user)
    try:
        return [try_retr(client, number, top) for number, top in commands]
    finally:
        client.quit()


LIMIT_REACHED = "-ERR [SYS/TEMP] daily download limit reached"


class TestDailyDownloadCap:
    """pop3_daily_download_bytes: RETR/TOP that would pass it get -ERR [SYS/TEMP]."""

    async def test_cap_survives_reconnects(self, tmp_path: Path) -> None:
        """Two RETRs of 28 octets fit in 60; the third, and one in a new session, do not."""
        async with running_server(tmp_path, pop3_daily_download_bytes=60) as srv:
            deliver_to_maildir(srv.maildir("alice"), NORMAL)
            first = await asyncio.to_thread(session, srv, "alice", [(1, None)] * 3)
            second = await asyncio.to_thread(session, srv, "alice", [(1, None)])
            used = await srv.server.ctx.cluster.downloads.used("alice")  # type: ignore[union-attr]
        assert (["+OK", "+OK", LIMIT_REACHED], [LIMIT_REACHED], 56) == (first, second, used)

    async def test_top_charged_what_it_sends(self, tmp_path: Path) -> None:
        """TOP 1 0 sends 18 octets of a 28-octet message: three fit in 64, then RETR does not.

        Each TOP needs room for the whole message (28) and is then refunded the 10 it did
        not send: 36 after two, 64 then 54 after the third; charged 28 each, the third
        would not fit.
        """
        async with running_server(tmp_path, pop3_daily_download_bytes=64) as srv:
            deliver_to_maildir(srv.maildir("alice"), NORMAL)
            answers = await asyncio.to_thread(
                session, srv, "alice", [(1, 0), (1, 0), (1, 0), (1, None)]
            )
        assert ["+OK", "+OK", "+OK", LIMIT_REACHED] == answers

    @pytest.mark.parametrize(
        ("field", "default", "expected"),
        [
            ("pop3_daily_download_bytes=30", 0, ["+OK", LIMIT_REACHED]),
            ("pop3_daily_download_bytes=0", 30, ["+OK", "+OK"]),
            ("pop3_daily_download_bytes=1k", 30, ["+OK", "+OK"]),
            ("pop3_daily_download_bytes=lots", 30, ["+OK", LIMIT_REACHED]),
        ],
    )
    async def test_per_user_field(
        self, tmp_path: Path, field: str, default: int, expected: list[str]
    ) -> None:
        """The userdb field overrides the global cap (0: none); a bad one is ignored."""
        async with running_server(tmp_path, pop3_daily_download_bytes=default) as srv:
            add_user(srv.config.passwd_file, "carol", b"secret", "PLAIN", extra=[field])
            srv.maildir("carol").mkdir(parents=True)
            deliver_to_maildir(srv.maildir("carol"), NORMAL)
            answers = await asyncio.to_thread(session, srv, "carol", [(1, None), (1, None)])
        assert expected == answers

    async def test_session_goes_on_after_refusal(self, tmp_path: Path) -> None:
        """After the refusal, other commands work and QUIT deletes as asked."""
        async with running_server(tmp_path, pop3_daily_download_bytes=10) as srv:
            deliver_to_maildir(srv.maildir("alice"), NORMAL)

            def run() -> tuple[str, bytes]:
                client = login(srv)
                answer = try_retr(client, 1)
                client.dele(1)
                return answer, client.quit()

            answer, bye = await asyncio.to_thread(run)
            left = list((srv.maildir("alice") / "new").iterdir()) + list(
                (srv.maildir("alice") / "cur").iterdir()
            )
        assert (LIMIT_REACHED, b"+OK", []) == (answer, bye[:3], left)


class TestPostgresUsersAndState:
    """userdb and shared state in PostgreSQL: the users table's columns, the shared count."""

    async def test_columns_and_shared_count(self, tmp_path: Path, pg_dsn: str) -> None:
        """nopop3 refuses; the cap column holds across two servers sharing the database."""
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM pobox.download_counter")
            for name, nopop3, cap in (("lim_off", True, None), ("lim_cap", False, 40)):
                conn.execute(
                    "INSERT INTO pobox.users (username, password, nopop3,"
                    " pop3_daily_download_bytes) VALUES (%s, '{PLAIN}secret', %s, %s)"
                    " ON CONFLICT (username) DO NOTHING",
                    (name, nopop3, cap),
                )
        settings = {
            "userdb": "postgresql",
            "postgresql_dsn": pg_dsn,
            "shared_state": "postgresql",
            "postgresql_timeout": 10,
            "shared_state_timeout": 10,
        }
        async with (
            running_server(tmp_path / "a", {}, **settings) as one,
            running_server(tmp_path / "b", {}, **settings) as two,
        ):
            for srv in (one, two):
                srv.maildir("lim_cap").mkdir(parents=True)
                deliver_to_maildir(srv.maildir("lim_cap"), NORMAL)
            off = await asyncio.to_thread(refused, one, "lim_off")
            first = await asyncio.to_thread(session, one, "lim_cap", [(1, None)])
            second = await asyncio.to_thread(session, two, "lim_cap", [(1, None)])
        assert "-ERR [SYS/PERM] POP3 access is disabled for this account." == off
        assert (["+OK"], [LIMIT_REACHED]) == (first, second)
