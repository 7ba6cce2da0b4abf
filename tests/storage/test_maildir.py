"""Behaviour of the Maildir backend beyond the storage contract.

Mail location templates, the layout on disk, the ``pobox-uidlist`` index and its import from
Dovecot's ``dovecot-uidlist``, locking across processes, and failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.errors import ConfigError
from pobox.storage._safefs import storage_error
from pobox.storage.base import (
    Maildrop,
    MaildropLocked,
    StoragePermanentError,
    StorageTemporaryError,
)
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir import _store as store_module
from pobox.storage.maildir._access import MaildirAccess
from pobox.storage.maildir._store import CHUNK_SIZE
from tests.helpers.maildir import User, deliver, index_lock_held, set_flags

ALICE = User("alice")


def put(maildir: Path, directory: str, name: str, data: bytes) -> Path:
    """Write a message file with exactly this name (creating the maildir)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    path = maildir / directory / name
    path.write_bytes(data)
    return path


async def read_all(maildrop: Maildrop, key: str) -> bytes:
    """Return the whole stored message ``key``."""
    return b"".join([chunk async for chunk in maildrop.read_message(key)])


async def snapshot(store: MaildirStore, user: User = ALICE) -> list[tuple[str, int, str]]:
    """Open, list (key, size, uidl) of every message, close."""
    maildrop = await store.open(user)
    try:
        return [(info.key, info.size, info.uidl) for info in maildrop.messages]
    finally:
        await maildrop.close()


class TestLocation:
    """``MaildirStore.maildir_path`` expands Dovecot-style mail locations."""

    @pytest.mark.parametrize(
        ("location", "user", "expected"),
        [
            ("maildir:~/Maildir", User("alice", home="/home/alice"), "/home/alice/Maildir"),
            ("maildir:~", User("alice", home="/home/alice/"), "/home/alice"),
            ("maildir:%h/mail", User("alice", home="/home/alice"), "/home/alice/mail"),
            ("maildir:/var/mail/%u", User("alice@example.org"), "/var/mail/alice@example.org"),
            ("maildir:/var/mail/%d/%n", User("alice@example.org"), "/var/mail/example.org/alice"),
            ("maildir:/var/mail/%d/%n", User("alice"), "/var/mail/alice"),
            ("maildir:/srv/%{domain}/%{username}", User("bo@x.net"), "/srv/x.net/bo"),
            ("maildir:/srv/%{user}", User("bo@x.net"), "/srv/bo@x.net"),
            ("maildir:%{home}/M", User("bo", home="/h/bo"), "/h/bo/M"),
            ("maildir:/srv/100%%/%n", User("alice"), "/srv/100%/alice"),
            ("maildir:/srv/%Ld/%Ln", User("Alice@Example.ORG"), "/srv/example.org/alice"),
            ("maildir:/srv/%Un", User("alice"), "/srv/ALICE"),
            ("maildir:/srv/%1Ln/%Ln", User("Alice"), "/srv/a/alice"),
            ("maildir:/srv/%1.2n", User("alice"), "/srv/li"),
            ("maildir:/srv/%-2.2n", User("alice"), "/srv/ce"),
            ("maildir:/srv/%05n", User("bob"), "/srv/00bob"),
            (
                "maildir:~/Maildir:INDEX=/var/index/%u:LAYOUT=fs",
                User("a", home="/h/a"),
                "/h/a/Maildir",
            ),
            ("maildir:/srv/a::b/%n", User("alice"), "/srv/a:b/alice"),
            ("maildir:/srv/%n:", User("alice"), "/srv/alice"),
            ("/srv/mail/%n", User("alice"), "/srv/mail/alice"),
        ],
    )
    def test_expands(self, location: str, user: User, expected: str) -> None:
        """Variables, modifiers, ``~`` and escapes expand as in Dovecot; options are ignored."""
        assert Path(expected) == MaildirStore(location).maildir_path(user)

    def test_user_mail_overrides_the_template(self) -> None:
        """The user's ``mail`` field (userdb_mail) wins over the store's location."""
        user = User("alice@example.org", home="/home/alice", mail="maildir:~/Other/%d")
        assert Path("/home/alice/Other/example.org") == MaildirStore().maildir_path(user)

    def test_root_remembered_per_user(self) -> None:
        """``maildir_root`` is the path as text, for each name, home and ``mail`` field."""
        access = MaildirAccess("maildir:~/Maildir")
        users = [
            User("alice", home="/home/alice"),
            User("alice", home="/home/alice2"),
            User("alice", home="/home/alice", mail="maildir:~/Other"),
            User("bob", home="/home/alice"),
            User("alice", mail="maildir:/srv/%n"),
            User("bob", mail="maildir:/srv/%n"),
        ]
        for user in [*users, *reversed(users)]:
            assert str(access.maildir_path(user)) == access.maildir_root(user)
        for _ in range(2):  # a user whose path cannot be worked out is refused each time
            with pytest.raises(StoragePermanentError, match=r"'carol'.*home"):
                access.maildir_root(User("carol"))

    @pytest.mark.parametrize("location", ["maildir:~/Maildir", "maildir:%h/Maildir"])
    def test_missing_home_is_a_permanent_error(self, location: str) -> None:
        """A template that needs the home of a user who has none raises SYS/PERM, naming why."""
        with pytest.raises(StoragePermanentError, match=r"'alice'.*home"):
            MaildirStore(location).maildir_path(User("alice"))

    @pytest.mark.parametrize("name", ["../etc", "a/b@x", "..", "x@..", "x@a/b", "nul\0"])
    def test_unsafe_user_names_are_refused(self, name: str) -> None:
        """A user name part that would leave its directory is refused."""
        with pytest.raises(StoragePermanentError, match="cannot be used in a path"):
            MaildirStore("maildir:/var/mail/%d/%n").maildir_path(User(name))

    @pytest.mark.parametrize("mail", ["maildir:Maildir", "mbox:~/mail", "maildir:/x/%z"])
    def test_bad_user_mail_is_a_permanent_error(self, mail: str) -> None:
        """A relative path, another format or an unknown variable in ``mail`` raises SYS/PERM."""
        with pytest.raises(StoragePermanentError, match="alice"):
            MaildirStore().maildir_path(User("alice", home="/home/alice", mail=mail))

    @pytest.mark.parametrize(
        ("location", "reason"),
        [
            ("mbox:~/mail:INBOX=/var/mail/%u", "only the maildir format"),
            ("sdbox:/srv/%u", "only the maildir format"),
            ("maildir:", "no path"),
            ("maildir:/srv/%z", "unknown variable"),
            ("maildir:/srv/%{service}", "unknown variable"),
            ("maildir:/srv/%Hn", "modifier H is not supported"),
            ("maildir:/srv/%", "ends inside a variable"),
            ("maildir:/srv/%{user", "unterminated"),
            ("maildir:srv/%u", "not absolute"),
        ],
    )
    def test_bad_template_is_a_config_error(self, location: str, reason: str) -> None:
        """A malformed store location is refused when the store is built."""
        with pytest.raises(ConfigError, match=reason):
            MaildirStore(location)


class TestLayout:
    """What the backend reads and creates on disk."""

    async def test_missing_maildir_is_created_private(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """Opening a maildir that does not exist creates cur, new and tmp with mode 0700."""
        assert not await snapshot(store)
        modes = {
            name: stat.S_IMODE((maildir / name).stat().st_mode) for name in ("cur", "new", "tmp")
        }
        expected = {"cur": 0o700, "new": 0o700, "tmp": 0o700}
        assert expected == modes

    async def test_new_cur_are_read_tmp_is_not(self, store: MaildirStore, maildir: Path) -> None:
        """Messages in new/ and cur/ are listed; files still being written in tmp/ are not."""
        put(maildir, "new", "1700000001.M1P1.h", b"in new\n")
        put(maildir, "cur", "1700000002.M1P1.h:2,S", b"in cur\n")
        put(maildir, "tmp", "1700000003.M1P1.h", b"in tmp\n")
        keys = [key for key, _, _ in await snapshot(store)]
        expected = ["1700000001.M1P1.h", "1700000002.M1P1.h"]
        assert expected == keys

    async def test_hidden_files_and_directories_are_ignored(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """Dot files, names without a base or with a line break, and directories are skipped."""
        put(maildir, "new", ".hidden", b"x\n")
        put(maildir, "cur", ":2,S", b"x\n")
        put(maildir, "new", "1700000002.M1P1.h\nwith a line break", b"x\n")
        (maildir / "cur" / "1700000001.M1P1.h:2,").mkdir()
        assert not await snapshot(store)

    async def test_not_a_directory_is_a_permanent_error(self, tmp_path: Path) -> None:
        """A maildir path below a regular file raises SYS/PERM naming the path."""
        (tmp_path / "home").write_bytes(b"not a directory")
        store = MaildirStore(f"maildir:{tmp_path}/home/%n")
        with pytest.raises(
            StoragePermanentError, match=re.escape(f"{tmp_path}/home/alice") + ".*ENOTDIR"
        ):
            await store.open(ALICE)


class TestIndex:
    """``pobox-uidlist`` keeps UIDs and sizes, so that messages are not read at every open."""

    async def test_file_format(self, store: MaildirStore, maildir: Path) -> None:
        """The index lists UIDVALIDITY, next UID, and UID, wire size and base name per message."""
        put(maildir, "new", "1700000001.M5P9.h,S=4,W=6", b"a\nb\n")
        put(maildir, "cur", "1700000002.M1P9.h:2,S", b"c\r\n")
        before = int(time.time())
        await snapshot(store)
        header, *lines = (maildir / "pobox-uidlist").read_text().splitlines()
        magic, version, validity, next_uid = header.split()
        expected_header = ("pobox-uidlist", "1", "N3")
        assert expected_header == (magic, version, next_uid)
        assert before <= int(validity.removeprefix("V")) <= time.time()
        expected = ["1 W6 :1700000001.M5P9.h,S=4,W=6", "2 W3 :1700000002.M1P9.h"]
        assert expected == lines

    async def test_uidl_is_dovecots_default_format(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A UIDL is the UID then the UIDVALIDITY, each as 8 lower-case hex digits."""
        put(maildir, "new", "1700000001.M1P1.h", b"x\n")
        [(_, _, uidl)] = await snapshot(store)
        validity = (maildir / "pobox-uidlist").read_text().split()[2].removeprefix("V")
        assert f"00000001{int(validity):08x}" == uidl

    async def test_size_from_w_field_without_reading(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A ``,W=`` size the file's size allows is trusted: the file is not read to size it."""
        put(maildir, "new", "1700000001.M1P1.h,S=3,W=5", b"ab\n")
        expected = [5]
        assert expected == [size for _, size, _ in await snapshot(store)]

    @pytest.mark.parametrize("claimed", [2, 7, 1234])
    async def test_impossible_w_field_is_not_trusted(
        self, store: MaildirStore, maildir: Path, claimed: int
    ) -> None:
        """A ``,W=`` below the file's size or above twice it is a lie: the file is read."""
        put(maildir, "new", f"1700000001.M1P1.h,S=3,W={claimed}", b"ab\n")
        expected = [4]
        assert expected == [size for _, size, _ in await snapshot(store)]

    async def test_s_field_is_not_a_wire_size(self, store: MaildirStore, maildir: Path) -> None:
        """With only ``,S=`` in the name the file is read: LF endings make it larger on the wire."""
        put(maildir, "new", "1700000001.M1P1.h,S=4", b"a\nb\n")
        expected = [6]
        assert expected == [size for _, size, _ in await snapshot(store)]

    async def test_second_open_reads_no_message(self, store: MaildirStore, maildir: Path) -> None:
        """Sizes come from the index at the next open: a file changed behind its back keeps it."""
        path = put(maildir, "new", "1700000001.M1P1.h", b"a\nb\n")
        await snapshot(store)
        path.write_bytes(b"much longer content\n" * 10)
        expected = [6]
        assert expected == [size for _, size, _ in await snapshot(store)]

    async def test_unchanged_index_is_not_rewritten(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A session that changes nothing leaves the index file untouched."""
        deliver(maildir, b"x\n", fields="")
        await snapshot(store)
        before = (maildir / "pobox-uidlist").stat()
        await snapshot(store)
        after = (maildir / "pobox-uidlist").stat()
        assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)

    async def test_new_mail_rewrites_the_index(self, store: MaildirStore, maildir: Path) -> None:
        """A new message is added to the index, by atomic replacement."""
        deliver(maildir, b"x\n")
        await snapshot(store)
        before = (maildir / "pobox-uidlist").stat().st_ino
        deliver(maildir, b"y\n")
        await snapshot(store)
        assert before != (maildir / "pobox-uidlist").stat().st_ino
        expected = 3
        assert expected == len((maildir / "pobox-uidlist").read_text().splitlines())

    async def test_new_files_numbered_by_delivery_time(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """New files get UIDs in the order of their timestamp and microseconds, not of listing."""
        for name in (
            "1700000002.M5P1.h",
            "1700000001.M900P1.h",
            "1700000002.M40P1.h",
            "1700000001.M10P1.h",
        ):
            put(maildir, "new", name, b"x\n")
        keys = [key for key, _, _ in await snapshot(store)]
        expected = [
            "1700000001.M10P1.h",
            "1700000001.M900P1.h",
            "1700000002.M5P1.h",
            "1700000002.M40P1.h",
        ]
        assert expected == keys

    async def test_flag_changes_keep_the_uidl(self, store: MaildirStore, maildir: Path) -> None:
        """A move from new/ to cur/ and later flag changes keep the message's UIDL."""
        base = deliver(maildir, b"x\n")
        before = await snapshot(store)
        set_flags(maildir, base, "")
        middle = await snapshot(store)
        set_flags(maildir, base, "RS")
        assert before == middle == await snapshot(store)

    async def test_message_deleted_elsewhere_leaves_the_index(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message removed by another program is dropped from the index; its UID is not reused."""
        gone = put(maildir, "new", "1700000001.M1P1.h", b"x\n")
        put(maildir, "new", "1700000002.M1P1.h", b"y\n")
        await snapshot(store)
        gone.unlink()
        put(maildir, "new", "1700000003.M1P1.h", b"z\n")
        await snapshot(store)
        lines = (maildir / "pobox-uidlist").read_text().splitlines()
        expected = ["N4", "2 W3 :1700000002.M1P1.h", "3 W3 :1700000003.M1P1.h"]
        assert expected == [
            lines[0].split()[3],
            *lines[1:],
        ]

    async def test_lost_index_means_new_uidls(self, store: MaildirStore, maildir: Path) -> None:
        """Without its index a maildir gets a new UIDVALIDITY: all UIDLs change, none is reused."""
        deliver(maildir, b"x\n")
        deliver(maildir, b"y\n")
        seen: set[str] = set()
        for _ in range(3):  # lost again and again within a second: never the same UIDVALIDITY
            uidls = {uidl for _, _, uidl in await snapshot(store)}
            assert set() == seen & uidls
            seen |= uidls
            (maildir / "pobox-uidlist").unlink()
        expected = 6
        assert expected == len(seen)

    async def test_damaged_line_gives_that_message_a_new_uid(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """An unreadable index line costs only its message's UIDL; the next UID is used for it."""
        for second in (1, 2, 3):
            put(maildir, "new", f"170000000{second}.M1P1.h", b"x\n")
        before = {key: uidl for key, _, uidl in await snapshot(store)}
        index = maildir / "pobox-uidlist"
        index.write_text(index.read_text().replace("2 W3 :", "garbage :"))
        after = {key: uidl for key, _, uidl in await snapshot(store)}
        damaged = "1700000002.M1P1.h"
        assert {k: v for k, v in before.items() if k != damaged} == {
            k: v for k, v in after.items() if k != damaged
        }
        assert after[damaged].startswith("00000004")

    async def test_damaged_header_starts_afresh(self, store: MaildirStore, maildir: Path) -> None:
        """An index whose header cannot be read is replaced; the messages are all still served."""
        deliver(maildir, b"x\n")
        await snapshot(store)
        (maildir / "pobox-uidlist").write_text("garbage\n")
        expected = [3]
        assert expected == [size for _, size, _ in await snapshot(store)]
        assert (maildir / "pobox-uidlist").read_text().startswith("pobox-uidlist 1 V")

    async def test_without_index_nothing_is_written(self, tmp_path: Path, maildir: Path) -> None:
        """``index=False`` serves the maildir without writing an index."""
        deliver(maildir, b"x\n", fields="")
        store = MaildirStore(f"maildir:{tmp_path}/%n", index=False)
        first = await snapshot(store)
        assert (first, False) == (await snapshot(store), (maildir / "pobox-uidlist").exists())


DOVECOT_UIDLIST = """\
3 V1700000000 N10 G2b97e111f69d046b1b1b000083ecc375
1 :1700000001.M1P1.host,S=17,W=20
2 W18 :1700000002.M1P1.host,S=18
4 Plegacy-uidl-4 O2 :1700000004.M1P1.host
5 P G0123 :1700000005.M1P1.host
6 P{} :1700000006.M1P1.host
7 O1 :1700000007.M1P1.host
"""


class TestDovecotImport:
    """A maildir that Dovecot served keeps Dovecot's UIDLs (``dovecot-uidlist`` is imported)."""

    @pytest.fixture
    def dovecot_maildir(self, maildir: Path) -> Path:
        """A maildir with files and the dovecot-uidlist Dovecot would have written."""
        put(maildir, "cur", "1700000001.M1P1.host,S=17,W=20:2,S", b"Subject: a\n\nhello\n")
        put(maildir, "cur", "1700000002.M1P1.host,S=18:2,", b"Subject: b\r\n\r\nhi\r\n")
        put(maildir, "cur", "1700000004.M1P1.host:2,S", b"d\n")
        put(maildir, "new", "1700000005.M1P1.host", b"e\n")
        put(maildir, "new", "1700000006.M1P1.host", b"f\n")
        put(maildir, "new", "1700000007.M1P1.host", b"g\n")
        (maildir / "dovecot-uidlist").write_text(DOVECOT_UIDLIST.replace("{}", "x" * 71))
        return maildir

    async def test_uidls_sizes_and_order(self, store: MaildirStore, dovecot_maildir: Path) -> None:
        """UIDs, ``P`` UIDLs (empty: the base name), ``O`` order and ``W`` sizes are Dovecot's."""
        expected = [
            ("1700000007.M1P1.host", 3, "000000076553f100"),
            ("1700000004.M1P1.host", 3, "legacy-uidl-4"),
            ("1700000001.M1P1.host,S=17,W=20", 20, "000000016553f100"),
            ("1700000002.M1P1.host,S=18", 18, "000000026553f100"),
            ("1700000005.M1P1.host", 3, "1700000005.M1P1.host"),
            ("1700000006.M1P1.host", 3, "000000066553f100"),
        ]
        assert expected == await snapshot(store)

    async def test_w_field_is_trusted(self, store: MaildirStore, dovecot_maildir: Path) -> None:
        """A ``W`` field of the uidlist gives the size without reading the file, as in Dovecot."""
        (dovecot_maildir / "dovecot-uidlist").write_text(
            DOVECOT_UIDLIST.replace(" O1 :", " O1 W99 :")
        )
        expected = 99
        assert expected == (await snapshot(store))[0][1]

    async def test_new_mail_continues_from_next_uid(
        self, store: MaildirStore, dovecot_maildir: Path
    ) -> None:
        """Mail new to both continues Dovecot's UID sequence under Dovecot's UIDVALIDITY."""
        put(dovecot_maildir, "new", "1700000099.M1P1.host", b"new\n")
        expected = ("1700000099.M1P1.host", "0000000a6553f100")
        assert expected == (await snapshot(store))[-1][::2]

    async def test_lagging_next_uid_is_raised(self, store: MaildirStore, maildir: Path) -> None:
        """If the header's next UID is below a UID in use, new mail gets a UID above them all."""
        put(maildir, "new", "1700000001.M1P1.host", b"a\n")
        put(maildir, "new", "1700000002.M1P1.host", b"b\n")
        (maildir / "dovecot-uidlist").write_text("3 V1700000000 N1 Gx\n3 :1700000001.M1P1.host\n")
        uidls = [uidl for _, _, uidl in await snapshot(store)]
        expected = ["000000036553f100", "000000046553f100"]
        assert expected == uidls

    async def test_version_1_uidlist(self, store: MaildirStore, maildir: Path) -> None:
        """The Courier-compatible version 1 format is imported too."""
        put(maildir, "cur", "1700000001.M1P1.host:2,S", b"a\n")
        (maildir / "dovecot-uidlist").write_text("1 1700000000 8\n7 1700000001.M1P1.host:2,S\n")
        expected = ["000000076553f100"]
        assert expected == [uidl for _, _, uidl in await snapshot(store)]

    async def test_unreadable_uidlist_is_ignored(self, store: MaildirStore, maildir: Path) -> None:
        """A uidlist of an unknown version is not imported; the maildir is served all the same."""
        put(maildir, "new", "1700000001.M1P1.host", b"a\n")
        (maildir / "dovecot-uidlist").write_text("2 V1700000000 N10\n5 0 1700000001.M1P1.host\n")
        [(_, size, uidl)] = await snapshot(store)
        expected = (3, False, "00000001")
        assert expected == (size, uidl.endswith("6553f100"), uidl[:8])

    async def test_imported_once(self, store: MaildirStore, dovecot_maildir: Path) -> None:
        """Once pobox has its own index, later changes to dovecot-uidlist are not followed."""
        before = await snapshot(store)
        (dovecot_maildir / "dovecot-uidlist").write_text("3 V1800000000 N50 Gx\n")
        assert before == await snapshot(store)


class TestLock:
    """The session lock is a ``flock`` on ``pobox.lock`` inside the maildir."""

    async def test_two_stores_in_one_process_exclude_each_other(self, tmp_path: Path) -> None:
        """Two store objects serving the same maildir share its lock."""
        first = await MaildirStore(f"maildir:{tmp_path}/%n").open(ALICE)
        with pytest.raises(MaildropLocked):
            await MaildirStore(f"maildir:{tmp_path}/%n").open(ALICE)
        await first.close()

    async def test_lock_of_killed_process_is_released(self, tmp_path: Path) -> None:
        """A maildrop locked by a process that is killed (SIGKILL) can be opened right after."""
        script = (
            "import asyncio, sys\n"
            "from pobox.storage.maildir import MaildirStore\n"
            "from tests.helpers.maildir import User\n"
            "async def main():\n"
            f"    maildrop = await MaildirStore({f'maildir:{tmp_path}/%n'!r}).open(User('alice'))\n"
            "    print('locked', flush=True)\n"
            "    await asyncio.sleep(60)\n"
            "asyncio.run(main())\n"
        )
        root = Path(__file__).resolve().parents[2]
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=root)
        try:
            assert child.stdout is not None
            expected = b"locked\n"
            assert expected == await asyncio.to_thread(child.stdout.readline)
            with pytest.raises(MaildropLocked):
                await MaildirStore(f"maildir:{tmp_path}/%n").open(ALICE)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        maildrop = await MaildirStore(f"maildir:{tmp_path}/%n").open(ALICE)
        await maildrop.close()

    async def test_forgotten_maildrop_releases_its_lock(self, store: MaildirStore) -> None:
        """A maildrop dropped without close releases the lock when it is collected."""
        maildrop = await store.open(ALICE)
        del maildrop
        gc.collect()
        await (await store.open(ALICE)).close()

    async def test_cancelled_open_does_not_keep_the_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """An open cancelled half-way (a login timeout) leaves the maildrop unlocked."""
        await (await store.open(ALICE)).close()
        # Hold the index lock: the next open takes the session lock, then finds this one busy.
        with index_lock_held(maildir):
            opening = asyncio.ensure_future(store.open(ALICE))
            await asyncio.sleep(0.1)
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
        for _ in range(100):
            try:
                maildrop = await store.open(ALICE)
            except MaildropLocked:
                await asyncio.sleep(0.01)
            else:
                await maildrop.close()
                return
        pytest.fail("the maildrop stayed locked")

    async def test_open_waiting_for_the_index_lock_holds_no_session_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """While the index lock is busy, a waiting open holds no session lock (and no thread)."""
        await (await store.open(ALICE)).close()
        with index_lock_held(maildir):
            opening = asyncio.ensure_future(store.open(ALICE))
            lock_seen = []
            for _ in range(20):  # 0.2 s of the open's waiting, looked at every 10 ms
                await asyncio.sleep(0.01)
                lock_seen.append((maildir / "dovecot-pop3-session.lock").exists())
        await (await opening).close()
        assert lock_seen.count(False) > lock_seen.count(True)


class TestReadAndDelete:
    """Messages renamed by other programs after the snapshot, and files that cannot go."""

    async def test_message_renamed_after_snapshot_is_read(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message moved to cur/ with new flags after the snapshot is still read."""
        base = deliver(maildir, b"Subject: moved\n\n")
        maildrop = await store.open(ALICE)
        set_flags(maildir, base, "S")
        expected = b"Subject: moved\n\n"
        assert expected == await read_all(maildrop, maildrop.messages[0].key)
        await maildrop.close()

    async def test_cancelled_read_leaks_no_file(
        self, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read cancelled while its file is being opened closes the file all the same."""
        deliver(maildir, b"x" * (CHUNK_SIZE + 1))
        store = MaildirStore(f"maildir:{maildir.parent}/%n", inline_read_max=0)
        maildrop = await store.open(ALICE)
        entered, go_on = threading.Event(), threading.Event()
        real = store_module._open_and_read

        def held(*args: object) -> tuple[int, int, bytes]:
            """Open and read as usual, once the test has cancelled the read."""
            entered.set()
            go_on.wait()
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(store_module, "_open_and_read", held)
        before = len(os.listdir("/proc/self/fd"))
        first_chunk = asyncio.ensure_future(anext(maildrop.read_message(maildrop.messages[0].key)))
        await asyncio.to_thread(entered.wait)
        first_chunk.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first_chunk
        go_on.set()
        for _ in range(100):  # the worker thread finishes, then its file is closed
            await asyncio.sleep(0.01)
            if len(os.listdir("/proc/self/fd")) == before:
                break
        assert before == len(os.listdir("/proc/self/fd"))
        await maildrop.close()

    async def test_fifo_read_inline_is_refused_without_blocking(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A FIFO in place of a small message is refused at once, not read in the event loop."""
        path = maildir / "new" / deliver(maildir, b"x\n")
        maildrop = await store.open(ALICE)
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(StoragePermanentError, match="not a regular file"):
            await asyncio.wait_for(anext(maildrop.read_message(maildrop.messages[0].key)), 5)
        await maildrop.close()

    async def test_message_renamed_after_snapshot_is_deleted(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message whose flags changed after the snapshot is deleted under its new name."""
        base = deliver(maildir, b"x\n")
        maildrop = await store.open(ALICE)
        renamed = set_flags(maildir, base, "S")
        result = await maildrop.delete([base])
        await maildrop.close()
        assert ((base,), (), False) == (result.removed, result.failed, renamed.exists())

    async def test_delete_updates_the_index(self, store: MaildirStore, maildir: Path) -> None:
        """Deleted messages leave the index; the next UID does not go back."""
        put(maildir, "new", "1700000001.M1P1.h", b"x\n")
        put(maildir, "new", "1700000002.M1P1.h", b"y\n")
        maildrop = await store.open(ALICE)
        await maildrop.delete(["1700000002.M1P1.h"])
        await maildrop.close()
        lines = (maildir / "pobox-uidlist").read_text().splitlines()
        expected = ["N3", "1 W3 :1700000001.M1P1.h"]
        assert expected == [lines[0].split()[3], *lines[1:]]

    async def test_file_that_cannot_be_unlinked_is_failed(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message whose file cannot be unlinked is reported failed; the others are removed."""
        put(maildir, "new", "1700000001.M1P1.h", b"x\n")
        stuck = put(maildir, "new", "1700000002.M1P1.h", b"y\n")
        maildrop = await store.open(ALICE)
        stuck.unlink()
        stuck.mkdir()  # unlink(2) of a directory fails (EISDIR)
        result = await maildrop.delete(["1700000001.M1P1.h", "1700000002.M1P1.h"])
        await maildrop.close()
        expected = (("1700000001.M1P1.h",), ("1700000002.M1P1.h",))
        assert expected == (result.removed, result.failed)

    async def test_permission_denied_is_failed(self, store: MaildirStore, maildir: Path) -> None:
        """A message the server may not unlink (EACCES) is reported failed and stays."""
        path = put(maildir, "new", "1700000001.M1P1.h", b"x\n")
        maildrop = await store.open(ALICE)
        with unlink_forbidden(maildir / "new"):
            result = await maildrop.delete(["1700000001.M1P1.h"])
        await maildrop.close()
        expected = ((), ("1700000001.M1P1.h",), True)
        assert expected == (result.removed, result.failed, path.exists())


@contextlib.contextmanager
def unlink_forbidden(directory: Path) -> Iterator[None]:
    """Make unlinking in ``directory`` fail with EACCES for the duration of the block.

    Permissions do not stop root, so as root the process drops its effective UID to
    ``nobody`` for the block (glibc applies seteuid to every thread, including the worker
    that unlinks); otherwise the directory is made read-only.
    """
    if os.geteuid() == 0:
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o700)


class TestLargeReads:
    """A message over one chunk: chunks in the page cache are read without a worker thread."""

    #: Four chunks: the first read with the open (in a worker thread), three after it.
    BIG = bytes(range(256)) * (CHUNK_SIZE // 256) * 3 + b"Subject: big\n\n" + b"x" * 1000

    @staticmethod
    def _count_threaded_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """Have each read in a worker thread after the first chunk recorded; return the record."""
        offsets: list[int] = []
        real = store_module._pread

        def counted(fd: int, size: int, offset: int, key: str) -> bytes:
            offsets.append(offset)
            return real(fd, size, offset, key)

        monkeypatch.setattr(store_module, "_pread", counted)
        return offsets

    async def test_cached_chunks_read_in_the_event_loop(
        self, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A message just delivered (in the page cache) needs no worker thread after its open."""
        deliver(maildir, self.BIG)
        store = MaildirStore(f"maildir:{maildir.parent}/%n")
        maildrop = await store.open(ALICE)
        offsets = self._count_threaded_reads(monkeypatch)
        assert self.BIG == await read_all(maildrop, maildrop.messages[0].key)
        assert [] == offsets
        await maildrop.close()

    async def test_without_nowait_reads_go_to_a_thread(
        self, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where RWF_NOWAIT is missing, every chunk after the first is read in a worker thread."""
        deliver(maildir, self.BIG)
        store = MaildirStore(f"maildir:{maildir.parent}/%n")
        maildrop = await store.open(ALICE)
        offsets = self._count_threaded_reads(monkeypatch)
        monkeypatch.setattr(store_module, "_NOWAIT", 0)
        assert self.BIG == await read_all(maildrop, maildrop.messages[0].key)
        assert [CHUNK_SIZE, 2 * CHUNK_SIZE, 3 * CHUNK_SIZE] == offsets
        await maildrop.close()

    async def test_no_inline_reads_no_cached_reads(
        self, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With ``inline_read_max`` 0 no chunk is read in the event loop, cached or not."""
        deliver(maildir, self.BIG)
        store = MaildirStore(f"maildir:{maildir.parent}/%n", inline_read_max=0)
        maildrop = await store.open(ALICE)
        offsets = self._count_threaded_reads(monkeypatch)
        assert self.BIG == await read_all(maildrop, maildrop.messages[0].key)
        assert [CHUNK_SIZE, 2 * CHUNK_SIZE, 3 * CHUNK_SIZE] == offsets
        await maildrop.close()

    async def test_evicted_file_is_read_whole(self, maildir: Path) -> None:
        """A file dropped from the page cache (``EAGAIN`` from the cache) is read all the same."""
        path = maildir / "new" / deliver(maildir, self.BIG)
        store = MaildirStore(f"maildir:{maildir.parent}/%n")
        maildrop = await store.open(ALICE)
        chunks = maildrop.read_message(maildrop.messages[0].key)
        first = await anext(chunks)
        # After the first chunk (whose read starts the kernel's read-ahead): written out,
        # then dropped from the cache, so the next reads find nothing there.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert self.BIG == first + b"".join([chunk async for chunk in chunks])
        await maildrop.close()

    async def test_file_shrunk_after_open_ends_early(self, maildir: Path) -> None:
        """A file cut short while it is read yields what is left, never more than announced."""
        path = maildir / "new" / deliver(maildir, self.BIG)
        store = MaildirStore(f"maildir:{maildir.parent}/%n")
        maildrop = await store.open(ALICE)
        chunks = maildrop.read_message(maildrop.messages[0].key)
        first = await anext(chunks)
        os.truncate(path, CHUNK_SIZE + 10)
        rest = b"".join([chunk async for chunk in chunks])
        assert self.BIG[: CHUNK_SIZE + 10] == first + rest
        await maildrop.close()


class TestStorageError:
    """OSError becomes SYS/TEMP or SYS/PERM, with the operation and the path in the message."""

    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (errno.EIO, StorageTemporaryError),
            (errno.ENOSPC, StorageTemporaryError),
            (errno.EAGAIN, StorageTemporaryError),
            (errno.EMFILE, StorageTemporaryError),
            (errno.EACCES, StoragePermanentError),
            (errno.EPERM, StoragePermanentError),
            (errno.ENOTDIR, StoragePermanentError),
            (errno.EROFS, StoragePermanentError),
        ],
    )
    def test_class_by_errno(self, code: int, expected: type[Exception]) -> None:
        """Errors an administrator must fix are permanent; the others temporary."""
        assert expected is type(storage_error(OSError(code, os.strerror(code)), "read", "/m/x"))

    def test_message_names_operation_path_and_errno(self) -> None:
        """The message says what failed, where, and why."""
        error = storage_error(OSError(errno.EIO, "Input/output error"), "read message", "/m/cur/1")
        expected = "cannot read message /m/cur/1: Input/output error (EIO)"
        assert expected == str(error)
