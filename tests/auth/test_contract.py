"""The contract every user database keeps: passwd-file, PostgreSQL, PostgreSQL with custom queries.

Each backend is filled with the same users (:class:`Spec`) the way that backend holds them: a
passwd-file's lines, rows of pobox's ``users`` table, or rows of an admin's own table read with
``postgresql_password_query`` (columns renamed, ``nologin`` from an ``active`` flag, a quota
rule). Then the same questions must get the same answers.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pobox.auth import _check
from pobox.auth.base import Authenticator, User
from pobox.auth.passwdfile import PasswdFileAuthenticator
from pobox.auth.postgres import CustomQueries, PostgresAuthenticator
from pobox.auth.schemes import DUMMY_HASH
from pobox.records import Quota

#: doveadm pw -s SHA512-CRYPT -p secret
SHA512_CRYPT = (
    "{SHA512-CRYPT}$6$EPUu0eMBnOfDs3Zf$UowAOl64XvvZdUHm/bOU1AQ7S8IHb5gLRzaWuhjXe.ml6mCWO6CYESTmP"
    "ekUl6.IJTrKXHjnzzaNvtvmM3MgF0"
)
#: Another SHA512-CRYPT entry of the same cost: the commonest scheme below.
SHA512_CRYPT_2 = SHA512_CRYPT.replace("Zf$", "Zg$")

#: The admin's own table, and the queries that read it (tests of custom queries).
CUSTOM_TABLE = """
DROP SCHEMA IF EXISTS mailsite CASCADE;
CREATE SCHEMA mailsite;
CREATE TABLE mailsite.accounts (
    login text PRIMARY KEY, pw text, owner_uid int, owner_gid int, homedir text,
    maildir text, storage_limit text, message_limit int, active boolean NOT NULL DEFAULT true
);
"""
PASSWORD_QUERY = (
    "SELECT pw AS password, owner_uid AS uid, owner_gid AS gid, homedir AS home,"
    " maildir AS userdb_mail,"
    " CASE WHEN storage_limit IS NOT NULL THEN '*:storage=' || storage_limit END AS quota_rule,"
    " message_limit AS quota_messages, CASE WHEN NOT active THEN 'Y' END AS nologin"
    " FROM mailsite.accounts WHERE login = %(user)s"
)
ITERATE_QUERY = "SELECT login AS username FROM mailsite.accounts"


@dataclass(frozen=True)
class Spec:
    """A user as the test wants it, whatever the backend."""

    name: str
    password: str = ""
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    mail: str | None = None
    quota_bytes: int | None = None
    quota_messages: int | None = None
    nologin: bool = False


def _passwd_line(spec: Spec) -> str:
    extras = []
    if spec.mail:
        extras.append(f"userdb_mail={spec.mail}")
    if spec.quota_bytes is not None:
        extras.append(f"quota_bytes={spec.quota_bytes}")
    if spec.quota_messages is not None:
        extras.append(f"quota_messages={spec.quota_messages}")
    if spec.nologin:
        extras.append("nologin")
    ids = ["" if v is None else str(v) for v in (spec.uid, spec.gid)]
    return ":".join([spec.name, spec.password, *ids, "", spec.home or "", "", " ".join(extras)])


@dataclass
class Backend:
    """A user database under test and how to fill it."""

    name: str
    make: Callable[[list[Spec]], Authenticator]


@pytest.fixture(params=["passwd-file", "postgresql", "postgresql-custom"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each user database in turn, empty until ``make`` fills it."""
    made: list[PostgresAuthenticator] = []
    if request.param == "passwd-file":

        def make_file(specs: list[Spec]) -> Authenticator:
            path = tmp_path / "passwd"
            path.write_text("".join(_passwd_line(spec) + "\n" for spec in specs))
            return PasswdFileAuthenticator(path, check_interval=0)

        yield Backend("passwd-file", make_file)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    custom = request.param == "postgresql-custom"

    def make_pg(specs: list[Spec]) -> Authenticator:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if custom:
                conn.execute(CUSTOM_TABLE)
            for spec in specs:
                if custom:
                    conn.execute(
                        "INSERT INTO mailsite.accounts VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            spec.name,
                            spec.password or None,
                            spec.uid,
                            spec.gid,
                            spec.home,
                            spec.mail,
                            None if spec.quota_bytes is None else str(spec.quota_bytes),
                            spec.quota_messages,
                            not spec.nologin,
                        ),
                    )
                else:
                    conn.execute(
                        "INSERT INTO pobox.users (username, password, uid, gid, home, mail,"
                        " quota_bytes, quota_messages, nologin)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            spec.name,
                            spec.password,
                            spec.uid,
                            spec.gid,
                            spec.home,
                            spec.mail,
                            spec.quota_bytes,
                            spec.quota_messages,
                            spec.nologin,
                        ),
                    )
        queries = CustomQueries(PASSWORD_QUERY, iterate=ITERATE_QUERY) if custom else None
        db = PostgresAuthenticator(dsn, queries=queries, cache_ttl=0, timeout=5, listen=False)
        made.append(db)
        return db

    yield Backend(request.param, make_pg)
    for db in made:
        await db.aclose()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes, bool]]:
    """Record each password check: (stored hash, password given, ran in the event loop)."""
    calls: list[tuple[str, bytes, bool]] = []
    real_verify = _check.verify

    def recording_verify(stored: str, password: bytes, **kwargs: object) -> bool:
        calls.append((stored, password, threading.current_thread() is threading.main_thread()))
        return bool(real_verify(stored, password, **kwargs))

    monkeypatch.setattr(_check, "verify", recording_verify)
    return calls


ALICE = Spec(
    "alice",
    SHA512_CRYPT,
    uid=1000,
    gid=100,
    home="/home/alice",
    mail="maildir:/srv/mail/alice",
    quota_bytes=1048576,
    quota_messages=50,
)


class TestAuthenticate:
    """authenticate() answers the user for the right password, None otherwise."""

    async def test_right_password_gives_the_whole_record(self, backend: Backend) -> None:
        """The right password gives the user with uid, gid, home, mail and quota."""
        db = backend.make([ALICE])
        user = await db.authenticate("alice", b"secret")
        assert (
            "alice",
            1000,
            100,
            "/home/alice",
            "maildir:/srv/mail/alice",
            Quota(max_bytes=1048576, max_messages=50),
            True,
        ) == (
            getattr(user, "name", None),
            getattr(user, "uid", None),
            getattr(user, "gid", None),
            getattr(user, "home", None),
            getattr(user, "mail", None),
            user.quota(Quota()) if isinstance(user, User) else None,
            getattr(user, "may_login", None),
        )

    async def test_wrong_password(self, backend: Backend) -> None:
        """A wrong password gives None."""
        assert None is await backend.make([ALICE]).authenticate("alice", b"Secret")

    async def test_unknown_user(self, backend: Backend) -> None:
        """An unknown user gives None, for authenticate, lookup and credentials alike."""
        db = backend.make([ALICE])
        assert (None, None, None) == (
            await db.authenticate("mallory", b"secret"),
            await db.lookup("mallory"),
            await db.credentials("mallory"),
        )

    async def test_hostile_names_are_just_unknown(self, backend: Backend) -> None:
        """Names with quotes, NUL, undecodable bytes or 300 octets are unknown, never errors."""
        db = backend.make([ALICE, Spec("bob", "{PLAIN}pw")])
        names = ["alice' OR '1'='1", "alice\x00", "al\udcffice", "a" * 300, "%(user)s"]
        assert [None] * len(names) == [await db.authenticate(name, b"pw") for name in names]

    async def test_nologin_refuses_the_right_password(self, backend: Backend) -> None:
        """A nologin user is refused with the right password; lookup still finds them."""
        db = backend.make([Spec("alice", "{PLAIN}pw", nologin=True)])
        found = await db.lookup("alice")
        assert (None, "alice", False, None) == (
            await db.authenticate("alice", b"pw"),
            getattr(found, "name", None),
            getattr(found, "may_login", None),
            await db.credentials("alice"),
        )

    async def test_nul_in_password_is_refused(self, backend: Backend) -> None:
        """A password with NUL does not match a PLAIN password that is its prefix."""
        db = backend.make([Spec("alice", "{PLAIN}pw")])
        assert None is await db.authenticate("alice", b"pw\0x")

    async def test_default_quota_when_unset(self, backend: Backend) -> None:
        """A user without quota fields gets the configured default."""
        user = await backend.make([Spec("bob", "{PLAIN}pw")]).lookup("bob")
        assert Quota(7, 8) == (user.quota(Quota(7, 8)) if user else None)


class TestCredentials:
    """credentials() gives the stored form to challenge-response logins."""

    async def test_stored_password(self, backend: Backend) -> None:
        """The stored {SCHEME}data comes back as it is."""
        db = backend.make([Spec("bob", "{PLAIN}pw")])
        assert "{PLAIN}pw" == await db.credentials("bob")

    async def test_no_password_no_credentials(self, backend: Backend) -> None:
        """A user without a password has no credentials (and cannot log in)."""
        db = backend.make([Spec("bob", "")])
        assert (None, None) == (await db.credentials("bob"), await db.authenticate("bob", b""))


class TestSamePath:
    """Known and unknown users cost the same: one check of the client's password, one path."""

    async def test_unknown_user_checks_a_real_hash_of_the_commonest_scheme(
        self, backend: Backend, checks: list[tuple[str, bytes, bool]]
    ) -> None:
        """An unknown user's password is checked, in a worker, against the commonest scheme."""
        db = backend.make(
            [Spec("a", SHA512_CRYPT), Spec("b", SHA512_CRYPT_2), Spec("p", "{PLAIN}x")]
        )
        assert None is await db.authenticate("mallory", b"a rather long guess" * 4)
        assert [(SHA512_CRYPT, b"a rather long guess" * 4, False)] == checks

    async def test_known_and_unknown_alike(
        self, backend: Backend, checks: list[tuple[str, bytes, bool]]
    ) -> None:
        """A wrong password for a known user and any for an unknown one: the same check."""
        db = backend.make([Spec("a", SHA512_CRYPT), Spec("b", SHA512_CRYPT_2)])
        assert [None, None] == [
            await db.authenticate("b", b"guess"),
            await db.authenticate("mallory", b"guess"),
        ]
        assert [(SHA512_CRYPT_2, b"guess", False), (SHA512_CRYPT, b"guess", False)] == checks

    async def test_cheap_scheme_in_the_loop_for_both(
        self, backend: Backend, checks: list[tuple[str, bytes, bool]]
    ) -> None:
        """With single-digest passwords both are checked in the event loop, no thread hop."""
        db = backend.make([Spec("a", "{PLAIN}one"), Spec("b", "{PLAIN}two")])
        await db.authenticate("a", b"guess")
        await db.authenticate("mallory", b"guess")
        assert [("{PLAIN}one", b"guess", True), ("{PLAIN}one", b"guess", True)] == checks

    async def test_refused_user_checked_too(
        self, backend: Backend, checks: list[tuple[str, bytes, bool]]
    ) -> None:
        """A nologin user's own hash is checked like anyone's, and the login still refused."""
        db = backend.make([Spec("a", SHA512_CRYPT, nologin=True)])
        assert None is await db.authenticate("a", b"secret")
        assert [(SHA512_CRYPT, b"secret", False)] == checks

    async def test_empty_database_uses_the_dummy_hash(
        self, backend: Backend, checks: list[tuple[str, bytes, bool]]
    ) -> None:
        """Without any password stored, the built-in ARGON2ID dummy is checked."""
        await backend.make([]).authenticate("mallory", b"x")
        assert [(DUMMY_HASH, b"x", False)] == checks
