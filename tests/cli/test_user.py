"""``pobox user add/passwd/list/del -c CONFIG`` on both user databases, run as the command."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import psycopg
import pytest

from pobox.auth.base import Authenticator
from pobox.cli import build_authenticator, close_authenticator, main
from pobox.config import load_config
from tests.auth.test_contract import CUSTOM_TABLE, ITERATE_QUERY, PASSWORD_QUERY
from tests.helpers.accounts import ROOT_MAIL_SETTINGS
from tests.helpers.maildir import User
from tests.helpers.postgres import StoreThread, stored_messages


def toml(**keys: object) -> str:
    """TOML lines for string, number and boolean keys."""
    out = []
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else repr(value)
        if isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key} = {text}\n")
    return "".join(out)


@pytest.fixture(params=["passwd-file", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A configuration naming each userdb in turn (mail in PostgreSQL for the latter)."""
    path = tmp_path / "pobox.toml"
    if request.param == "passwd-file":
        (tmp_path / "passwd").write_text("")
        path.write_text(
            toml(passwd_file=str(tmp_path / "passwd"), mail_location=f"maildir:{tmp_path}/%u")
        )
    else:
        dsn = request.getfixturevalue("pg_dsn")
        path.write_text(
            toml(
                userdb="postgresql",
                mail_location="postgresql",
                postgresql_dsn=dsn,
                postgresql_timeout=5,
            )
        )
    return path


def check_login(config: Path, name: str, password: bytes) -> tuple[str | None, bool | None]:
    """Log in through the userdb the config names; return (name, may_login of lookup)."""

    async def run() -> tuple[str | None, bool | None]:
        db: Authenticator = build_authenticator(load_config(config), listen=False)
        try:
            user = await db.authenticate(name, password)
            found = await db.lookup(name)
            return getattr(user, "name", None), getattr(found, "may_login", None)
        finally:
            await close_authenticator(db)

    return asyncio.run(run())


def run(argv: list[str], stdin: bytes = b"", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    """Run ``pobox ARGV`` with ``stdin`` as standard input."""
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return main(argv)


class TestUserOnEitherUserdb:
    """The same commands work on the userdb the configuration names."""

    def test_add_and_login(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """add with --password-stdin creates a user who logs in with that password."""
        code = run(
            ["user", "add", "alice", "-c", str(config), "--password-stdin", "--scheme", "PLAIN"],
            b"s3cret\n",
            monkeypatch,
        )
        assert (0, ("alice", True), (None, True)) == (
            code,
            check_login(config, "alice", b"s3cret"),
            check_login(config, "alice", b"wrong"),
        )

    def test_passwd(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """passwd replaces the password: the new one works, the old one no longer."""
        run(["user", "add", "bob", "-c", str(config), "--password-stdin"], b"one\n", monkeypatch)
        code = run(["user", "passwd", "bob", "-c", str(config)], b"two\n", monkeypatch)
        assert (0, "bob", None) == (
            code,
            check_login(config, "bob", b"two")[0],
            check_login(config, "bob", b"one")[0],
        )

    def test_list_sorted(
        self, config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """list prints one name per line in code-point order; a pattern filters."""
        for name in ("zoe", "Bob", "amy", "émile"):
            run(["user", "add", name, "-c", str(config), "--scheme", "PLAIN"], b"pw\n", monkeypatch)
        capsys.readouterr()
        main(["user", "list", "-c", str(config)])
        everyone = capsys.readouterr().out
        main(["user", "list", "-c", str(config), "[a-m]*"])
        assert ("Bob\namy\nzoe\némile\n", "amy\n") == (everyone, capsys.readouterr().out)

    def test_del(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """del removes the user (login refused, lookup empty); again: exit 65."""
        run(["user", "add", "carl", "-c", str(config), "--scheme", "PLAIN"], b"pw\n", monkeypatch)
        first = main(["user", "del", "carl", "-c", str(config)])
        assert (0, (None, None), 65) == (
            first,
            check_login(config, "carl", b"pw"),
            main(["user", "del", "carl", "-c", str(config)]),
        )

    def test_nologin_and_fields(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """--nologin and the quota options are stored: the user gets mail, may not log in."""
        code = run(
            [
                "user", "add", "dora", "-c", str(config), "--scheme", "PLAIN", "--nologin",
                "--quota-bytes", "2M", "--quota-messages", "7", "--home", "/home/dora",
            ],
            b"pw\n",
            monkeypatch,
        )  # fmt: skip

        async def lookup() -> tuple[object, ...]:
            db = build_authenticator(load_config(config), listen=False)
            try:
                user = await db.lookup("dora")
                assert user is not None
                return user.home, user.quota_bytes, user.quota_messages, user.may_login
            finally:
                await close_authenticator(db)

        assert (0, ("/home/dora", 2 * 1024 * 1024, 7, False), None) == (
            code,
            asyncio.run(lookup()),
            check_login(config, "dora", b"pw")[0],
        )

    def test_empty_password_refused(self, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty password is refused with exit 65 and no user is added."""
        code = run(["user", "add", "eve", "-c", str(config)], b"\n", monkeypatch)
        assert (65, (None, None)) == (code, check_login(config, "eve", b""))


class TestPurge:
    """del --purge removes the mail too; plain del leaves it."""

    def test_postgresql(self, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Mail in PostgreSQL: del keeps it, del --purge of another user removes theirs."""
        config = tmp_path / "pobox.toml"
        config.write_text(
            toml(userdb="postgresql", mail_location="postgresql", postgresql_dsn=pg_dsn)
        )
        for name in ("keep", "gone"):
            run(["user", "add", name, "-c", str(config), "--scheme", "PLAIN"], b"p\n", monkeypatch)
        mta = StoreThread(pg_dsn)
        try:
            for name in ("keep", "gone", "gone"):
                mta.append(name, b"Subject: hi\n\nbody\n")
        finally:
            mta.close()
        codes = (
            main(["user", "del", "keep", "-c", str(config)]),
            main(["user", "del", "gone", "-c", str(config), "--purge"]),
        )
        assert ((0, 0), 1, 0) == (
            codes,
            len(stored_messages(pg_dsn, "keep")),
            len(stored_messages(pg_dsn, "gone")),
        )

    def test_postgresql_with_retention_keeps_nothing(
        self, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With pop3_delete_retention, --purge leaves nothing kept either: neither what the
        user deleted before nor what the purge itself deleted."""
        config = tmp_path / "pobox.toml"
        config.write_text(
            toml(userdb="postgresql", mail_location="postgresql", postgresql_dsn=pg_dsn)
            + 'pop3_delete_retention = "7d"\n'
        )
        run(["user", "add", "gone", "-c", str(config), "--scheme", "PLAIN"], b"p\n", monkeypatch)
        mta = StoreThread(pg_dsn, retention=7 * 86400)
        try:
            for text in (b"deleted before\n", b"still there\n"):
                mta.append("gone", text)

            async def delete_first() -> None:
                maildrop = await mta.store.open(User("gone"))
                await maildrop.delete([maildrop.messages[0].key])
                await maildrop.close()

            mta.call(delete_first())
        finally:
            mta.close()
        code = main(["user", "del", "gone", "-c", str(config), "--purge"])
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM pobox.message), "
                "(SELECT count(*) FROM pobox.deleted_message), (SELECT count(*) FROM pobox.body)"
            ).fetchone()
        assert (0, (0, 0, 0)) == (code, counts)

    def test_maildir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Mail in a Maildir: --purge empties the maildir of the removed user."""
        config = tmp_path / "pobox.toml"
        config.write_text(
            toml(passwd_file=str(tmp_path / "passwd"), mail_location=f"maildir:{tmp_path}/m/%u")
            + ROOT_MAIL_SETTINGS  # as root: the root-owned maildir of this test may be purged
        )
        run(["user", "add", "x", "-c", str(config), "--scheme", "PLAIN"], b"p\n", monkeypatch)
        new = tmp_path / "m" / "x" / "new"
        new.mkdir(parents=True)
        (new / "1.M1P1.host,S=5").write_bytes(b"a\n\nb\n")
        code = main(["user", "del", "x", "-c", str(config), "--purge"])
        assert (0, []) == (code, sorted(p.name for p in new.iterdir()))

    def test_purge_needs_config(self, tmp_path: Path) -> None:
        """--purge with -f cannot know where the mail is: exit 65, user kept."""
        passwd = tmp_path / "passwd"
        passwd.write_text("a:{PLAIN}x\n")
        assert (65, "a:{PLAIN}x\n") == (
            main(["user", "del", "a", "-f", str(passwd), "--purge"]),
            passwd.read_text(),
        )


class TestPasswdFileForm:
    """The -f PASSWD_FILE form keeps working for list and del."""

    def test_list_and_del(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """list reads the file; del removes only that user's first line."""
        passwd = tmp_path / "passwd"
        passwd.write_text("# users\nb:{PLAIN}x\na:{PLAIN}y\nb:{PLAIN}shadowed\n")
        main(["user", "list", "-f", str(passwd)])
        listed = capsys.readouterr().out
        code = main(["user", "del", "b", "-f", str(passwd)])
        assert ("a\nb\n", 0, "# users\na:{PLAIN}y\nb:{PLAIN}shadowed\n") == (
            listed,
            code,
            passwd.read_text(),
        )


class TestCustomQueries:
    """With the admin's own tables, pobox lists users but does not edit them."""

    def test_list_and_refuse_edits(
        self,
        pg_dsn: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """list runs the iterate query (sorted); add is refused with a clear message."""
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(CUSTOM_TABLE)
            conn.execute(
                "INSERT INTO mailsite.accounts (login, pw) VALUES ('z', '{PLAIN}1'), ('b', NULL)"
            )
        config = tmp_path / "pobox.toml"
        config.write_text(
            toml(
                userdb="postgresql",
                postgresql_dsn=pg_dsn,
                postgresql_password_query=PASSWORD_QUERY,
                postgresql_iterate_query=ITERATE_QUERY,
            )
        )
        main(["user", "list", "-c", str(config)])
        listed = capsys.readouterr().out
        code = run(["user", "add", "c", "-c", str(config)], b"pw\n", monkeypatch)
        assert ("b\nz\n", 65, "your own tables") == (
            listed,
            code,
            "your own tables" if "your own tables" in capsys.readouterr().err else "",
        )


class TestDatabaseDown:
    """A PostgreSQL userdb that cannot be reached: exit 75 (try again)."""

    def test_exit_tempfail(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """user add with nothing listening at the DSN exits 75."""
        config = tmp_path / "pobox.toml"
        config.write_text(
            toml(
                userdb="postgresql",
                postgresql_dsn="host=127.0.0.1 port=1 dbname=x user=x",
                postgresql_timeout=1,
            )
        )
        assert 75 == run(["user", "add", "a", "-c", str(config)], b"pw\n", monkeypatch)
