"""Tests for pobox.auth.passwdfile: reading and editing Dovecot's passwd-file."""

# House style puts the expected value first (STYLE.md §3.11), which SIM300 calls Yoda.

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pobox.auth import _check
from pobox.auth.base import AuthTemporaryError, User
from pobox.auth.passwdfile import (
    PasswdFileAuthenticator,
    PasswdFileError,
    UserExists,
    add_user,
    set_password,
    validate_username,
)
from pobox.auth.schemes import DUMMY_HASH, SchemeError, UnknownScheme
from pobox.errors import PoboxError

#: doveadm pw -s SHA512-CRYPT -p secret
SHA512_CRYPT = (
    "{SHA512-CRYPT}$6$EPUu0eMBnOfDs3Zf$UowAOl64XvvZdUHm/bOU1AQ7S8IHb5gLRzaWuhjXe.ml6mCWO6CYESTmP"
    "ekUl6.IJTrKXHjnzzaNvtvmM3MgF0"
)


@pytest.fixture
def users(tmp_path):
    """Return a function writing a passwd-file and returning an authenticator for it."""
    path = tmp_path / "users"

    def make(text, **kwargs):
        path.write_text(text)
        return PasswdFileAuthenticator(path, check_interval=0, **kwargs)

    return make


@pytest.fixture
def checks(monkeypatch):
    """Record each password check: (stored hash, password given, ran in the event loop)."""
    calls = []
    real_verify = _check.verify

    def recording_verify(stored, password, **kwargs):
        calls.append((stored, password, threading.current_thread() is threading.main_thread()))
        return real_verify(stored, password, **kwargs)

    monkeypatch.setattr(_check, "verify", recording_verify)
    return calls


def rewrite(path, text):
    """Replace the file's content and push its mtime forward, as a later edit would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


class TestParsing:
    """Each line shape becomes the right User."""

    async def test_all_fields(self, users):
        """uid, gid, home and extra fields are read; gecos and shell are ignored."""
        db = users(
            "alice:{PLAIN}pw:1000:1001:Alice A:/home/alice:/bin/false:"
            "userdb_mail=maildir:~/Maildir userdb_quota_rule=*:storage=1G  flag\n"
        )
        assert User(
            name="alice",
            uid=1000,
            gid=1001,
            home="/home/alice",
            mail="maildir:~/Maildir",
            quota_bytes=1024**3,
            extra={"quota_rule": "*:storage=1G", "flag": ""},
        ) == await db.lookup("alice")

    async def test_user_and_password_only(self, users):
        """The fields after the password may be left off."""
        assert User(name="bob") == await users("bob:{PLAIN}pw\n").lookup("bob")

    async def test_empty_fields(self, users):
        """Empty uid, gid and home fields are None."""
        assert User(name="dave") == await users("dave:{PLAIN}pw:::::\n").lookup("dave")

    async def test_username_only(self, users):
        """A line with just a name is a user without a password, who cannot log in."""
        db = users("carol\n")
        assert (User(name="carol"), None) == (
            await db.lookup("carol"),
            await db.authenticate("carol", b""),
        )

    async def test_unprefixed_mail_field(self, users):
        """mail= without the userdb_ prefix is the mail location too."""
        user = await users("e:{PLAIN}pw::::::mail=mbox:~/mail\n").lookup("e")
        assert "mbox:~/mail" == (user.mail if user else None)

    async def test_old_format_mail_field(self, users):
        """An empty eighth field followed by a location is Dovecot's old mail field."""
        db = users("eve:{PLAIN}pw:1:1::/home/eve:::maildir:/var/mail/eve\n")
        assert User(name="eve", uid=1, gid=1, home="/home/eve", mail="maildir:/var/mail/eve") == (
            await db.lookup("eve")
        )

    async def test_comments_blank_lines_and_crlf(self, users):
        """Comments, blank lines and lines starting with ':' are skipped; CR is dropped."""
        db = users("# alice:{PLAIN}pw\r\n\r\n:{PLAIN}pw\r\nbob:{PLAIN}pw:7\r\n")
        assert (None, None, User(name="bob", uid=7), User(name="bob", uid=7)) == (
            await db.lookup("# alice"),
            await db.lookup(""),
            await db.lookup("bob"),
            await db.authenticate("bob", b"pw"),
        )

    async def test_ids_by_name(self, users):
        """uid and gid names are looked up; unknown names give None."""
        db = users("a:{PLAIN}pw:root:root\nb:{PLAIN}pw:no-such-user-x:no-such-group-x\n")
        assert ((0, 0), (None, None)) == tuple(
            (u.uid, u.gid) if u else None for u in [await db.lookup("a"), await db.lookup("b")]
        )

    async def test_first_duplicate_wins(self, users):
        """When a user appears twice, the first line counts, as in Dovecot."""
        db = users("alice:{PLAIN}one:1\nalice:{PLAIN}two:2\n")
        assert (User(name="alice", uid=1), None) == (
            await db.authenticate("alice", b"one"),
            await db.authenticate("alice", b"two"),
        )

    @pytest.mark.parametrize(
        ("password", "line"),
        [
            (b"secret", "frank:L5cgLz8pwXVFE[13]"),
            (b"secret", "frank:5ebe2294ecd0e0f08eab7690d2a6ee69[34]"),
        ],
    )
    async def test_libpam_pwdfile_suffix(self, users, password, line):
        """libpam-pwdfile's data[13] (DES crypt) and data[34] (MD5) are understood."""
        assert User(name="frank") == await users(line + "\n").authenticate("frank", password)

    async def test_default_scheme(self, users):
        """Bare passwords are read in the default scheme (CRYPT unless told)."""
        crypt_db = users("a:" + SHA512_CRYPT.removeprefix("{SHA512-CRYPT}") + "\n")
        assert User(name="a") == await crypt_db.authenticate("a", b"secret")
        plain_db = users("a:secret\n", default_scheme="plain")
        assert User(name="a") == await plain_db.authenticate("a", b"secret")

    def test_unknown_default_scheme(self, tmp_path):
        """An unknown default scheme is refused at construction."""
        with pytest.raises(UnknownScheme):
            PasswdFileAuthenticator(tmp_path / "users", default_scheme="ROT13")


class TestAuthenticate:
    """authenticate() answers a user for the right password, None otherwise."""

    async def test_right_and_wrong_password(self, users):
        """The right password gives the user; a wrong one gives None."""
        db = users(f"alice:{SHA512_CRYPT}:1000:1000\n")
        assert (User(name="alice", uid=1000, gid=1000), None) == (
            await db.authenticate("alice", b"secret"),
            await db.authenticate("alice", b"Secret"),
        )

    async def test_costly_checks_run_one_per_cpu_at_a_time(self, users, monkeypatch):
        """Concurrent SHA512-CRYPT checks run at most one per usable CPU at a time."""
        running, most = [0], [0]
        lock = threading.Lock()
        real_verify = _check.verify

        def counting_verify(*args, **kwargs):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.02)  # long enough for the other logins to pile up
                return real_verify(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1

        monkeypatch.setattr(_check, "verify", counting_verify)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        db = users(f"alice:{SHA512_CRYPT}\nbob:{{PLAIN}}pw\n")
        results = await asyncio.gather(*(db.authenticate("alice", b"secret") for _ in range(6)))
        assert [User(name="alice")] * 6 == results
        assert 2 == most[0]

    async def test_empty_password_is_refused(self, users, checks):
        """An empty password field, without nopassword, lets nobody in (checked as unknown)."""
        db = users("alice::1\n")
        assert None is await db.authenticate("alice", b"")
        assert [(DUMMY_HASH, b"", False)] == checks

    @pytest.mark.parametrize("flag", ["nologin", "nologin=y", "noauthenticate", "nologin=yes"])
    async def test_nologin_refuses_the_right_password(self, users, flag):
        """nologin and noauthenticate refuse the login; lookup still finds the user."""
        db = users(f"alice:{{PLAIN}}pw:::::: {flag} reason=gone\n")
        found = await db.lookup("alice")
        assert (None, "alice", False) == (
            await db.authenticate("alice", b"pw"),
            getattr(found, "name", None),
            getattr(found, "may_login", None),
        )

    async def test_nologin_no_is_off(self, users):
        """nologin=no does not refuse the login."""
        user = await users("alice:{PLAIN}pw::::::nologin=no\n").authenticate("alice", b"pw")
        assert "alice" == getattr(user, "name", None)

    async def test_userdb_nologin_is_not_the_passdb_flag(self, users):
        """userdb_nologin is a userdb field, not the passdb flag that refuses logins."""
        user = await users("alice:{PLAIN}pw::::::userdb_nologin\n").authenticate("alice", b"pw")
        assert "alice" == getattr(user, "name", None)

    async def test_nopassword_with_empty_password(self, users):
        """nopassword with an empty password field accepts any password."""
        user = await users("alice::::::: nopassword=y\n").authenticate("alice", b"anything")
        assert "alice" == getattr(user, "name", None)

    async def test_nopassword_with_a_password_is_ignored(self, users):
        """nopassword next to a real password is ignored, as Dovecot does."""
        db = users("alice:{PLAIN}pw::::::nopassword\n")
        assert (None, "alice") == (
            await db.authenticate("alice", b"anything"),
            getattr(await db.authenticate("alice", b"pw"), "name", None),
        )

    async def test_nul_in_password_is_refused(self, users):
        """A password with NUL does not match a PLAIN password that is its prefix."""
        assert None is await users("alice:{PLAIN}pw\n").authenticate("alice", b"pw\0x")


class TestHashThreads:
    """Password checks have threads of their own, apart from the maildir work's."""

    async def test_login_while_the_default_executor_is_busy(self, users):
        """With every default worker thread held (listings, fsyncs), a check still answers."""
        db = users(f"alice:{SHA512_CRYPT}:1000:1000\n")
        assert await db.authenticate("alice", b"secret") is not None  # the file is read
        loop = asyncio.get_running_loop()
        busy = ThreadPoolExecutor(1)
        loop.set_default_executor(busy)
        release = threading.Event()
        held = asyncio.ensure_future(asyncio.to_thread(release.wait))
        try:
            # Generous: only a check queued behind the held thread takes that long.
            answer = await asyncio.wait_for(db.authenticate("alice", b"secret"), 60)
            still_held = not held.done()
        finally:
            release.set()
            await held
        assert (User(name="alice", uid=1000, gid=1000), True) == (answer, still_held)


class TestReload:
    """The file is read again when it changes, and only then."""

    async def test_change_is_seen(self, users, tmp_path):
        """After the file changes, the next lookup sees the new users."""
        db = users("alice:{PLAIN}pw\n")
        assert await db.lookup("alice") is not None
        rewrite(tmp_path / "users", "bob:{PLAIN}pw\n")
        assert (None, User(name="bob")) == (await db.lookup("alice"), await db.lookup("bob"))

    async def test_same_size_change_is_seen(self, users, tmp_path):
        """A change that keeps the size (a new password) is seen through the mtime."""
        db = users("alice:{PLAIN}aa\n")
        assert await db.authenticate("alice", b"aa") is not None
        rewrite(tmp_path / "users", "alice:{PLAIN}bb\n")
        assert User(name="alice") == await db.authenticate("alice", b"bb")

    async def test_not_checked_within_interval(self, tmp_path):
        """Within check_interval the cached users are used without looking at the file."""
        path = tmp_path / "users"
        path.write_text("alice:{PLAIN}pw\n")
        db = PasswdFileAuthenticator(path, check_interval=3600)
        await db.lookup("alice")
        rewrite(path, "bob:{PLAIN}pw\n")
        assert (User(name="alice"), None) == (await db.lookup("alice"), await db.lookup("bob"))

    async def test_missing_file(self, tmp_path):
        """A missing file is a temporary error naming the file."""
        db = PasswdFileAuthenticator(tmp_path / "nope")
        with pytest.raises(AuthTemporaryError, match="nope"):
            await db.authenticate("alice", b"pw")

    async def test_unreadable_file(self, tmp_path):
        """A path that cannot be read as a file is a temporary error."""
        db = PasswdFileAuthenticator(tmp_path)
        with pytest.raises(AuthTemporaryError, match="cannot read"):
            await db.lookup("alice")

    async def test_file_removed_after_load(self, users, tmp_path):
        """A file that disappears is an error, not a silently empty user list."""
        db = users("alice:{PLAIN}pw\n")
        await db.lookup("alice")
        (tmp_path / "users").unlink()
        with pytest.raises(AuthTemporaryError):
            await db.lookup("alice")


class TestValidateUsername:
    """validate_username() refuses names a passwd-file cannot hold."""

    @pytest.mark.parametrize(
        "name", ["", "a:b", "a b", "a\tb", "a\nb", "a\rb", "\0a", "a\x7f", "#a", "a\u2028b"]
    )
    def test_invalid(self, name):
        """Empty, ':', whitespace, control characters and a leading '#' are refused."""
        with pytest.raises(PasswdFileError, match="invalid username"):
            validate_username(name)

    @pytest.mark.parametrize("name", ["alice", "alice@example.com", "a#b", "jürgen", "x.y-z_1"])
    def test_valid(self, name):
        """Ordinary names, addresses and non-ASCII letters are fine."""
        assert None is validate_username(name)


class TestSetPassword:
    """set_password() replaces one field or adds a line, atomically."""

    def test_creates_file_with_mode_0600(self, tmp_path):
        """A missing file is created, private to its owner, with the new user."""
        path = tmp_path / "users"
        assert (False, "alice:{PLAIN}pw\n", 0o600) == (
            set_password(path, "alice", b"pw", "PLAIN"),
            path.read_text(),
            stat.S_IMODE(path.stat().st_mode),
        )

    def test_replaces_only_the_password(self, tmp_path):
        """Every other field, line and comment is kept as it was."""
        path = tmp_path / "users"
        rest = ":1000:1000:A:/home/a:/bin/sh:userdb_mail=maildir:~/M nologin\n"
        path.write_text(f"# users\nalice:{{PLAIN}}old{rest}bob:{{PLAIN}}b\n")
        assert (True, f"# users\nalice:{{PLAIN}}new{rest}bob:{{PLAIN}}b\n") == (
            set_password(path, "alice", b"new", "PLAIN"),
            path.read_text(),
        )

    def test_username_only_line_gets_a_password(self, tmp_path):
        """A line holding only the name gets the password field added."""
        path = tmp_path / "users"
        path.write_text("carol\n")
        set_password(path, "carol", b"pw", "PLAIN")
        assert "carol:{PLAIN}pw\n" == path.read_text()

    def test_first_duplicate_is_changed(self, tmp_path):
        """Of two lines for a user, the one that counts (the first) is changed."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\na:{PLAIN}2\n")
        set_password(path, "a", b"3", "PLAIN")
        assert "a:{PLAIN}3\na:{PLAIN}2\n" == path.read_text()

    def test_appends_after_missing_final_newline(self, tmp_path):
        """A new line is appended on its own line even if the file lacks a final LF."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1")
        set_password(path, "b", b"2", "PLAIN")
        assert "a:{PLAIN}1\nb:{PLAIN}2\n" == path.read_text()

    def test_keeps_crlf(self, tmp_path):
        """A CRLF line stays CRLF."""
        path = tmp_path / "users"
        path.write_bytes(b"a:{PLAIN}1:5\r\nb:{PLAIN}2\r\n")
        set_password(path, "a", b"9", "PLAIN")
        assert b"a:{PLAIN}9:5\r\nb:{PLAIN}2\r\n" == path.read_bytes()

    def test_keeps_mode(self, tmp_path):
        """An existing file keeps its permissions."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\n")
        path.chmod(0o640)
        set_password(path, "a", b"2", "PLAIN")
        assert 0o640 == stat.S_IMODE(path.stat().st_mode)

    def test_keeps_owner(self, tmp_path):
        """An existing file keeps its owner and group (when we may set them)."""
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\n")
        os.chown(path, 4321, 4322)
        set_password(path, "a", b"2", "PLAIN")
        assert (4321, 4322) == (path.stat().st_uid, path.stat().st_gid)

    def test_replaces_by_rename(self, tmp_path):
        """The file is replaced by a new inode and no temporary file is left behind."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\n")
        before = path.stat().st_ino
        set_password(path, "a", b"2", "PLAIN")
        assert (True, ["users", "users.lock"]) == (
            path.stat().st_ino != before,
            sorted(os.listdir(tmp_path)),
        )

    def test_follows_symlink(self, tmp_path):
        """A symlinked passwd-file has its target rewritten and stays a symlink."""
        target = tmp_path / "real"
        target.write_text("a:{PLAIN}1\n")
        link = tmp_path / "users"
        link.symlink_to(target)
        set_password(link, "a", b"2", "PLAIN")
        assert (True, "a:{PLAIN}2\n") == (link.is_symlink(), target.read_text())

    def test_no_such_user(self, tmp_path):
        """With create=False an unknown user gives False and the file is not rewritten."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\n")
        before = path.stat().st_ino
        assert (False, "a:{PLAIN}1\n", before) == (
            set_password(path, "b", b"2", "PLAIN", create=False),
            path.read_text(),
            path.stat().st_ino,
        )

    def test_existing_user_without_create(self, tmp_path):
        """With create=False a known user's password is still changed."""
        path = tmp_path / "users"
        path.write_text("a:{PLAIN}1\n")
        assert (True, "a:{PLAIN}2\n") == (
            set_password(path, "a", b"2", "PLAIN", create=False),
            path.read_text(),
        )

    def test_no_file_without_create(self, tmp_path):
        """With create=False a missing file gives False and nothing is created."""
        assert (False, []) == (
            set_password(tmp_path / "users", "a", b"1", "PLAIN", create=False),
            os.listdir(tmp_path),
        )

    @pytest.mark.parametrize("name", ["", "a:b", "a b", "#a"])
    def test_invalid_username(self, tmp_path, name):
        """An invalid username is refused before the file is touched."""
        with pytest.raises(PasswdFileError, match="invalid username"):
            set_password(tmp_path / "users", name, b"pw", "PLAIN")
        assert [] == os.listdir(tmp_path)

    def test_plain_password_with_colon(self, tmp_path):
        """A PLAIN password with ':' would split the line, so it is refused; PLAIN.B64 works."""
        path = tmp_path / "users"
        with pytest.raises(PasswdFileError, match="cannot be stored") as caught:
            set_password(path, "a", b"p:w", "PLAIN")
        assert "p:w" not in str(caught.value)  # the message may be logged
        set_password(path, "a", b"p:w", "PLAIN.B64")
        assert "a:{PLAIN.B64}cDp3\n" == path.read_text()

    async def test_new_password_authenticates(self, tmp_path):
        """The default scheme (ARGON2ID) written here is what the authenticator accepts."""
        path = tmp_path / "users"
        set_password(path, "alice", b"s\xc3\xa9cret")
        db = PasswdFileAuthenticator(path)
        assert (True, User(name="alice"), None) == (
            path.read_text().startswith("alice:{ARGON2ID}$argon2id$"),
            await db.authenticate("alice", b"s\xc3\xa9cret"),
            await db.authenticate("alice", b"secret"),
        )

    def test_concurrent_edits_lose_nothing(self, tmp_path):
        """Parallel additions all end up in the file (the lock serialises them)."""
        path = tmp_path / "users"
        names = [f"user{i}" for i in range(16)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: set_password(path, name, b"pw", "PLAIN"), names))
        assert sorted(names) == sorted(line.split(":")[0] for line in path.read_text().split())


class TestErrors:
    """Refused edits raise errors the CLI reports without a traceback."""

    @pytest.mark.parametrize(
        ("call", "error"),
        [
            (lambda p: add_user(p, "a b", b"pw", "PLAIN"), PasswdFileError),
            (lambda p: add_user(p, "a", b"pw", "NOPE"), UnknownScheme),
            (lambda p: set_password(p, "a", b"x" * 73, "BLF-CRYPT"), SchemeError),
            (lambda p: set_password(p, "a", b"p\0w", "PLAIN"), SchemeError),
        ],
    )
    def test_errors_are_pobox_errors(self, tmp_path, call, error):
        """Every refusal is a PoboxError (and a ValueError), with the specific class."""
        with pytest.raises(error) as caught:
            call(tmp_path / "users")
        assert (True, True) == (
            isinstance(caught.value, PoboxError),
            isinstance(caught.value, ValueError),
        )


class TestAddUser:
    """add_user() adds a full line and refuses duplicates."""

    async def test_all_fields(self, tmp_path):
        """home, uid, gid and mail go to their fields and read back."""
        path = tmp_path / "users"
        add_user(
            path, "alice", b"pw", "PLAIN", home="/home/a", mail="maildir:~/M", uid=1000, gid="root"
        )
        db = PasswdFileAuthenticator(path)
        assert (
            "alice:{PLAIN}pw:1000:root::/home/a::userdb_mail=maildir:~/M\n",
            User(name="alice", uid=1000, gid=0, home="/home/a", mail="maildir:~/M"),
        ) == (path.read_text(), await db.authenticate("alice", b"pw"))

    def test_minimal_line(self, tmp_path):
        """Without optional fields the line stops after the password."""
        path = tmp_path / "users"
        add_user(path, "bob", b"pw", "PLAIN")
        assert "bob:{PLAIN}pw\n" == path.read_text()

    def test_home_only(self, tmp_path):
        """Empty fields before a given one are kept, empty ones after it dropped."""
        path = tmp_path / "users"
        add_user(path, "bob", b"pw", "PLAIN", home="/h")
        assert "bob:{PLAIN}pw::::/h\n" == path.read_text()

    def test_existing_user(self, tmp_path):
        """Adding a user twice raises UserExists and leaves the file alone."""
        path = tmp_path / "users"
        path.write_text("bob:{PLAIN}pw\n")
        before = path.stat().st_ino
        with pytest.raises(UserExists, match="'bob'"):
            add_user(path, "bob", b"other", "PLAIN")
        assert ("bob:{PLAIN}pw\n", before) == (path.read_text(), path.stat().st_ino)

    @pytest.mark.parametrize(
        "kwargs",
        [{"home": "/a:b"}, {"mail": "maildir:~/My Mail"}, {"uid": "a b"}, {"gid": -1}],
    )
    def test_unstorable_fields(self, tmp_path, kwargs):
        """A field that would break the line is refused and nothing is written."""
        with pytest.raises(PasswdFileError, match="cannot be"):
            add_user(tmp_path / "users", "bob", b"pw", "PLAIN", **kwargs)
        assert [] == os.listdir(tmp_path)
