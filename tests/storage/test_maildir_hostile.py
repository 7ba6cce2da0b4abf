"""The Maildir store against its own user: what a local user plants in their maildir.

Issue 10's findings, each against :class:`MaildirStore` as the server uses it: links to files
outside the maildir (a root-only file, another user's message), hard links to foreign files,
directories swapped for links, pobox's own files replaced by links or FIFOs, FIFOs in place of
messages, a file name lying about the size, an index lock held forever, and files left in
``tmp/``. Nothing outside the maildir may be read, written, created or removed, and nothing
may wait without a bound. The canaries live next to the maildir, never inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.storage.base import (
    Maildrop,
    MaildropLocked,
    StorageError,
    StoragePermanentError,
    StorageTemporaryError,
    Usage,
)
from pobox.storage.maildir import MaildirStore
from tests.helpers.maildir import User, deliver, incoming, index_lock_held, swap_for_link
from tests.helpers.users import VICTIM, system_user

ALICE = User("alice")
#: What the canary files hold; it must never come out of the store.
SECRET = b"root:$6$canary-secret-never-served$:19000:0:99999:7:::\n"
#: A message large enough to be read in a worker thread (over the 128 KiB inline limit).
LARGE = b"Subject: large\n\n" + b"x" * (300 * 1024) + b"\n"


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A root-only file outside the maildir (mode 0600), like ``/etc/shadow``."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "shadow"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def untouched(path: Path, before: os.stat_result) -> bool:
    """Tell whether ``path`` is the same file with the same content and times as before."""
    now = path.stat()
    same = (now.st_ino, now.st_size, now.st_mtime_ns) == (
        before.st_ino,
        len(SECRET),
        before.st_mtime_ns,
    )
    return same and path.read_bytes() == SECRET


def decoy(tmp_path: Path, name: str) -> Path:
    """Return a directory outside the maildir holding a canary file called ``name``."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / name).write_bytes(SECRET)
    return elsewhere


async def everything(maildrop: Maildrop) -> bytes:
    """Return every message of the snapshot that can be read, concatenated."""
    out = []
    for info in maildrop.messages:
        with contextlib.suppress(StorageError):
            data = maildrop.read_now(info.key)
            if data is None:
                data = b"".join([chunk async for chunk in maildrop.read_message(info.key)])
            out.append(data)
    return b"".join(out)


@contextlib.contextmanager
def unblocking(path: Path) -> Iterator[None]:
    """At the end, open the FIFO ``path`` for writing: a reader blocked in ``open`` goes on.

    Only a broken store blocks there; this keeps such a failure from hanging the test run.
    """
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


class TestLinkedMessages:
    """Links in ``cur/`` and ``new/`` are not messages, and are never followed."""

    async def test_link_to_a_root_only_file_is_not_listed(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """A link in ``cur/`` to a root-only file is not a message: LIST and RETR never show it."""
        real = deliver(maildir, b"Subject: real\n\n")
        (maildir / "cur" / "1700000000.M1P1.evil:2,S").symlink_to(canary)
        maildrop = await store.open(ALICE)
        served = await everything(maildrop)
        keys = [info.key for info in maildrop.messages]
        await maildrop.close()
        assert ([real], False) == (keys, SECRET in served)

    async def test_message_swapped_for_a_link_after_the_snapshot_is_refused(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """A message replaced by a link to a root-only file after login is refused, not read."""
        base = deliver(maildir, b"Subject: real\n\n")
        maildrop = await store.open(ALICE)
        path = maildir / "new" / base
        path.unlink()
        path.symlink_to(canary)
        with pytest.raises(StoragePermanentError, match="symbolic link"):
            maildrop.read_now(base)
        await maildrop.close()

    async def test_large_message_swapped_for_a_link_is_refused(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """The worker-thread read of a large message refuses a link swapped in too."""
        base = deliver(maildir, LARGE)
        maildrop = await store.open(ALICE)
        path = maildir / "new" / base
        path.unlink()
        path.symlink_to(canary)
        with pytest.raises(StoragePermanentError, match="symbolic link"):
            await anext(maildrop.read_message(base))
        await maildrop.close()

    async def test_link_to_another_users_message_is_not_served(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """A link to a message in another user's maildir (owned by that user) is never read."""
        victim = system_user(VICTIM)
        theirs = tmp_path / "victim"
        base = deliver(theirs, SECRET)
        for path in [theirs, *theirs.rglob("*")]:
            os.chown(path, *victim)
        deliver(maildir, b"Subject: mine\n\n")
        (maildir / "cur" / f"{base}:2,S").symlink_to(theirs / "new" / base)
        maildrop = await store.open(ALICE)
        served = await everything(maildrop)
        await maildrop.close()
        assert (1, False) == (len(maildrop.messages), SECRET in served)

    async def test_hard_link_to_another_users_file_is_not_served(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """A hard link to another user's file (where the kernel lets one be made) is refused.

        The maildir belongs to the server's uid; the linked file to another user.
        """
        victim = system_user(VICTIM)
        theirs = tmp_path / "victim-file"
        theirs.write_bytes(SECRET)
        os.chown(theirs, *victim)
        deliver(maildir, b"Subject: mine\n\n")
        os.link(theirs, maildir / "cur" / "1700000000.M1P1.linked:2,S")
        maildrop = await store.open(ALICE)
        served = await everything(maildrop)
        await maildrop.close()
        assert SECRET not in served

    async def test_hard_link_swapped_in_after_the_snapshot_is_refused(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """A message replaced by a hard link to another user's file after login is refused."""
        victim = system_user(VICTIM)
        theirs = tmp_path / "victim-file"
        theirs.write_bytes(SECRET)
        os.chown(theirs, *victim)
        base = deliver(maildir, b"Subject: mine\n\n")
        maildrop = await store.open(ALICE)
        path = maildir / "new" / base
        path.unlink()
        os.link(theirs, path)
        with pytest.raises(StoragePermanentError, match="owned by uid"):
            maildrop.read_now(base)
        await maildrop.close()


class TestSwapsAfterAFirstRead:
    """After a first read, messages are opened by the maildir's real path: still no links."""

    async def open_and_read(self, store: MaildirStore, maildir: Path) -> tuple[Maildrop, str]:
        """Open alice's two messages and read the first (the careful way, noting the path)."""
        first = deliver(maildir, b"Subject: one\n\n")
        second = deliver(maildir, b"Subject: two\n\n")
        maildrop = await store.open(ALICE)
        assert b"Subject: one\n\n" == maildrop.read_now(first)
        return maildrop, second

    async def test_message_swapped_for_a_link(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """A message replaced by a link to a root-only file after a first read is refused."""
        maildrop, second = await self.open_and_read(store, maildir)
        (maildir / "new" / second).unlink()
        (maildir / "new" / second).symlink_to(canary)
        with pytest.raises(StoragePermanentError, match="symbolic link"):
            maildrop.read_now(second)
        await maildrop.close()

    async def test_directory_swapped_for_a_link(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """``new/`` replaced by a link to a directory with the same names: refused."""
        maildrop, second = await self.open_and_read(store, maildir)
        elsewhere = decoy(tmp_path, second)
        swap_for_link(maildir / "new", elsewhere)
        with pytest.raises(StoragePermanentError):
            maildrop.read_now(second)
        await maildrop.close()

    async def test_maildir_swapped_for_a_link_to_another_users(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """The maildir renamed away and replaced by a link to another user's: refused."""
        victim = system_user(VICTIM)
        maildrop, second = await self.open_and_read(store, maildir)
        theirs = tmp_path / "victim"
        (theirs / "new").mkdir(parents=True)
        (theirs / "new" / second).write_bytes(SECRET)
        for path in [theirs, *theirs.rglob("*")]:
            os.chown(path, *victim)
        maildir.rename(tmp_path / "alice.old")
        maildir.symlink_to(theirs)
        with pytest.raises(StoragePermanentError, match="owned by uid"):
            maildrop.read_now(second)
        await maildrop.close()


class TestSwappedDirectories:
    """``cur/``, ``new/`` or the maildir itself replaced by links."""

    @pytest.mark.parametrize("directory", ["cur", "new"])
    async def test_dele_through_a_swapped_directory_removes_nothing_outside(
        self, store: MaildirStore, maildir: Path, tmp_path: Path, directory: str
    ) -> None:
        """DELE + QUIT after ``cur/`` became a link to another directory unlinks nothing there."""
        base = deliver(maildir, b"Subject: one\n\n", flags="S" if directory == "cur" else None)
        name = f"{base}:2,S" if directory == "cur" else base
        maildrop = await store.open(ALICE)
        elsewhere = decoy(tmp_path, name)
        swap_for_link(maildir / directory, elsewhere)
        result = await maildrop.delete([base])
        await maildrop.close()
        assert ((), (base,), SECRET) == (
            result.removed,
            result.failed,
            (elsewhere / name).read_bytes(),
        )

    async def test_read_through_a_swapped_directory_is_refused(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """A message read after ``cur/`` became a link to another directory is refused."""
        base = deliver(maildir, b"Subject: one\n\n", flags="S")
        maildrop = await store.open(ALICE)
        elsewhere = decoy(tmp_path, f"{base}:2,S")
        swap_for_link(maildir / "cur", elsewhere)
        with pytest.raises(StoragePermanentError):
            maildrop.read_now(base)
        await maildrop.close()

    async def test_swapped_directory_is_not_listed(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """An open with ``cur/`` a link to another directory refuses it, listing nothing there."""
        deliver(maildir, b"Subject: one\n\n")
        elsewhere = decoy(tmp_path, "1700000000.M1P1.h:2,S")
        swap_for_link(maildir / "cur", elsewhere)
        with pytest.raises(StoragePermanentError):
            await store.open(ALICE)

    async def test_maildir_of_another_owner_is_refused(self, tmp_path: Path) -> None:
        """A maildir that is a link to a directory of another user is refused at open."""
        victim = system_user(VICTIM)
        theirs = tmp_path / "victim"
        deliver(theirs, SECRET)
        for path in [theirs, *theirs.rglob("*")]:
            os.chown(path, *victim)
        (tmp_path / "alice").symlink_to(theirs)
        store = MaildirStore(f"maildir:{tmp_path}/%n")
        with pytest.raises(StoragePermanentError, match="owned by uid"):
            await store.open(ALICE)

    async def test_admins_link_above_the_maildir_is_followed(self, tmp_path: Path) -> None:
        """A maildir reached through a link the admin made (to a data disk) opens as usual."""
        disk = tmp_path / "disk"
        deliver(disk / "alice", b"Subject: on the data disk\n\n")
        (tmp_path / "home").symlink_to(disk)
        store = MaildirStore(f"maildir:{tmp_path}/home/%n")
        maildrop = await store.open(ALICE)
        await maildrop.close()
        assert 1 == len(maildrop.messages)


class TestOwnFiles:
    """pobox's own files in the maildir replaced by links: nothing outside is written or made."""

    @pytest.mark.parametrize("name", ["pobox-uidlist.tmp", "pobox-uidvalidity.tmp"])
    async def test_linked_temporary_file_does_not_truncate_its_target(
        self, store: MaildirStore, maildir: Path, canary: Path, name: str
    ) -> None:
        """A link planted where the index's temporary file goes leaves its target as it was."""
        deliver(maildir, b"Subject: one\n\n")
        (maildir / name).symlink_to(canary)
        before = canary.stat()
        maildrop = await store.open(ALICE)
        await maildrop.close()
        assert (True, 1) == (untouched(canary, before), len(maildrop.messages))

    @pytest.mark.parametrize(
        ("name", "refusal"),
        [
            # The index lock must be a regular file: the open fails until the user fixes it.
            ("pobox-uidlist.lock", StoragePermanentError),
            # A session lock that is a link is a lock held (by its age), never a file to make.
            ("dovecot-pop3-session.lock", MaildropLocked),
        ],
    )
    async def test_linked_lock_creates_nothing(
        self,
        store: MaildirStore,
        maildir: Path,
        tmp_path: Path,
        name: str,
        refusal: type[StorageError],
    ) -> None:
        """A lock file as a link to a missing file: that file is not created; open fails."""
        deliver(maildir, b"Subject: one\n\n")
        target = tmp_path / "created-by-pobox"
        (maildir / name).symlink_to(target)
        with pytest.raises(refusal):
            await store.open(ALICE)
        assert not target.exists()

    async def test_linked_index_lock_blocks_delivery_without_creating(
        self, store: MaildirStore, maildir: Path, tmp_path: Path
    ) -> None:
        """Delivery refuses a linked index lock too, creates nothing there, leaves nothing."""
        deliver(maildir, b"Subject: one\n\n")
        target = tmp_path / "created-by-pobox"
        (maildir / "pobox-uidlist.lock").symlink_to(target)
        with pytest.raises(StoragePermanentError):
            await store.deliver(ALICE, incoming(b"Subject: two\n\n"))
        assert (False, 1, []) == (
            target.exists(),
            len(os.listdir(maildir / "new")),
            os.listdir(maildir / "tmp"),
        )

    async def test_old_linked_session_lock_is_removed_not_followed(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """A link as the session lock, untouched for over five minutes, is unlinked itself."""
        deliver(maildir, b"Subject: one\n\n")
        link = maildir / "dovecot-pop3-session.lock"
        link.symlink_to(canary)
        old = time.time() - 600
        os.utime(link, (old, old), follow_symlinks=False)
        before = canary.stat()
        maildrop = await store.open(ALICE)
        await maildrop.close()
        assert (True, False) == (untouched(canary, before), link.is_symlink())

    async def test_linked_index_is_refused_and_left_alone(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """The index itself as a link to a root-only file: the open fails, the file is intact."""
        deliver(maildir, b"Subject: one\n\n")
        (maildir / "pobox-uidlist").symlink_to(canary)
        before = canary.stat()
        with pytest.raises(StoragePermanentError, match="symbolic link"):
            await store.open(ALICE)
        assert untouched(canary, before)

    @pytest.mark.parametrize("name", ["pobox-uidlist", "dovecot-uidlist"])
    async def test_fifo_as_index_fails_at_once(
        self, store: MaildirStore, maildir: Path, name: str
    ) -> None:
        """A FIFO as the index (or Dovecot's) fails the open at once instead of blocking it."""
        deliver(maildir, b"Subject: one\n\n")
        fifo = maildir / name
        os.mkfifo(fifo)
        with unblocking(fifo), pytest.raises(StoragePermanentError, match="not a regular file"):
            await asyncio.wait_for(store.open(ALICE), 10)


class TestHugeIndex:
    """An index of made-up lines is refused before it is parsed, whatever its octet size."""

    @pytest.mark.parametrize(
        ("name", "header"),
        [("pobox-uidlist", "pobox-uidlist 1 V1 N1"), ("dovecot-uidlist", "3 V1 N1")],
    )
    async def test_too_many_lines_refused(
        self, store: MaildirStore, maildir: Path, name: str, header: str
    ) -> None:
        """A header and a million short lines (15 MB, 300 MB once parsed) fail the open."""
        deliver(maildir, b"Subject: one\n\n")
        lines = (f"{uid} W1 :{uid:x}\n" for uid in range(1, 1_000_001))
        (maildir / name).write_text(header + "\n" + "".join(lines))
        with pytest.raises(StoragePermanentError, match="1000001 lines, more than 1000000"):
            await store.open(ALICE)


class TestFifos:
    """A FIFO in place of a message never blocks anything."""

    async def test_fifo_in_place_of_a_large_message_is_refused_at_once(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """RETR of a large message replaced by a FIFO fails at once; no thread waits on it."""
        base = deliver(maildir, LARGE)
        maildrop = await store.open(ALICE)
        path = maildir / "new" / base
        path.unlink()
        os.mkfifo(path)
        with unblocking(path), pytest.raises(StoragePermanentError, match="not a regular file"):
            await asyncio.wait_for(anext(maildrop.read_message(base)), 10)
        await maildrop.close()

    async def test_fifo_is_not_listed(self, store: MaildirStore, maildir: Path) -> None:
        """A FIFO in ``new/`` is not a message (and opening the maildrop does not block)."""
        real = deliver(maildir, b"Subject: real\n\n")
        fifo = maildir / "new" / "1700000000.M1P1.fifo"
        os.mkfifo(fifo)
        with unblocking(fifo):
            maildrop = await asyncio.wait_for(store.open(ALICE), 10)
        await maildrop.close()
        assert [real] == [info.key for info in maildrop.messages]

    async def test_deleting_a_fifo_removes_only_the_name(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """DELE of a message replaced by a FIFO removes that name, opening nothing."""
        base = deliver(maildir, b"Subject: one\n\n")
        maildrop = await store.open(ALICE)
        path = maildir / "new" / base
        path.unlink()
        os.mkfifo(path)
        with unblocking(path):
            result = await asyncio.wait_for(maildrop.delete([base]), 10)
        await maildrop.close()
        assert ((base,), False) == (result.removed, path.exists())


class TestLyingSizes:
    """A name claiming a small size for a huge file: sizes come from ``fstat``."""

    GIB = 1 << 30

    def sparse(self, path: Path) -> None:
        """Make ``path`` a 1 GiB file (sparse: no disk used)."""
        with path.open("r+b") as handle:
            handle.truncate(self.GIB)

    async def test_size_in_the_name_is_checked_against_the_file(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A 1 GiB file named as 10 octets is listed with its real size."""
        path = maildir / "new" / "1700000000.M1P1.h,S=10,W=10"
        deliver(maildir, b"")  # creates the maildir
        path.write_bytes(b"")
        self.sparse(path)
        maildrop = await store.open(ALICE)
        sizes = {info.key: info.size for info in maildrop.messages}
        await maildrop.close()
        assert self.GIB == sizes["1700000000.M1P1.h,S=10,W=10"]

    async def test_file_grown_after_indexing_is_not_read_in_the_event_loop(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message indexed at 10 octets that is now 1 GiB is streamed by a worker thread.

        ``read_now`` (the event loop's read) declines it, and the worker-thread read yields
        256 KiB chunks while other tasks keep running: it is never read whole into memory.
        """
        path = maildir / "new" / deliver(maildir, b"123456789\n")
        await (await store.open(ALICE)).close()  # indexed: 11 octets on the wire
        self.sparse(path)
        maildrop = await store.open(ALICE)
        key = maildrop.messages[0].key
        inline = maildrop.read_now(key)
        ticks = 0

        async def tick() -> None:
            """Count turns of the event loop."""
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        chunks = maildrop.read_message(key)
        sizes, ticked = [], []
        async for chunk in chunks:
            sizes.append(len(chunk))
            ticked.append(ticks)
            if len(sizes) == 4:
                break
        await chunks.aclose()  # type: ignore[attr-defined]
        ticker.cancel()
        await maildrop.close()
        assert (None, [256 * 1024] * 4) == (inline, sizes)
        assert ticked == sorted(set(ticked))  # the loop turned between every two chunks

    async def test_read_stops_at_the_size_at_open(self, store: MaildirStore, maildir: Path) -> None:
        """A message file growing while it is read is read up to the size it had at open."""
        path = maildir / "new" / deliver(maildir, LARGE)
        maildrop = await store.open(ALICE)
        chunks = maildrop.read_message(maildrop.messages[0].key)
        first = await anext(chunks)
        with path.open("ab") as handle:
            handle.write(b"appended later\n" * 100_000)
        rest = b"".join([chunk async for chunk in chunks])
        await maildrop.close()
        assert len(LARGE) == len(first + rest)


class TestHeldIndexLock:
    """The user holds ``pobox-uidlist.lock`` forever: their own operations fail, after a bound."""

    @pytest.fixture
    def holder(self, maildir: Path) -> Iterator[None]:
        """Alice's index lock held (as she may hold it) for the whole test."""
        deliver(maildir, b"Subject: one\n\n")
        with index_lock_held(maildir):
            yield

    async def test_delivery_fails_temporarily_and_leaves_nothing(
        self, maildir: Path, holder: None
    ) -> None:
        """A delivery gives up with a temporary error after ``lock_timeout``; nothing is stored."""
        store = MaildirStore(f"maildir:{maildir.parent}/%n", lock_timeout=0.5)
        with pytest.raises(StorageTemporaryError, match="index lock is held by another process"):
            await asyncio.wait_for(store.deliver(ALICE, incoming(b"Subject: two\n\n")), 10)
        assert (1, []) == (len(os.listdir(maildir / "new")), os.listdir(maildir / "tmp"))

    async def test_open_fails_temporarily(self, maildir: Path, holder: None) -> None:
        """A login that must update the index gives up with a temporary error."""
        store = MaildirStore(f"maildir:{maildir.parent}/%n", lock_timeout=0.5)
        with pytest.raises(StorageTemporaryError):
            await asyncio.wait_for(store.open(ALICE), 10)

    async def test_other_users_are_not_held_up(self, maildir: Path, holder: None) -> None:
        """With many deliveries to alice waiting, bob's delivery and login go through first."""
        store = MaildirStore(f"maildir:{maildir.parent}/%n", lock_timeout=3)
        bob = User("bob")
        waiting = [
            asyncio.ensure_future(store.deliver(ALICE, incoming(b"Subject: x\n\n")))
            for _ in range(20)
        ]
        await asyncio.sleep(0.1)
        await asyncio.wait_for(store.deliver(bob, incoming(b"Subject: for bob\n\n")), 2.5)
        maildrop = await asyncio.wait_for(store.open(bob), 2.5)
        await maildrop.close()
        pending_meanwhile = sum(not task.done() for task in waiting)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert (20, 1) == (pending_meanwhile, len(maildrop.messages))
        assert all(isinstance(result, StorageTemporaryError) for result in results)


class TestOneThreadPerMaildir:
    """Work on one maildir (what its user controls the size of) takes one worker thread."""

    async def test_usage_counts_of_one_maildir_run_one_at_a_time(
        self, store: MaildirStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Eight usage counts of alice's maildir run one after the other; bob's runs meanwhile."""
        running: dict[str, int] = {"alice": 0, "bob": 0}
        most: dict[str, int] = {"alice": 0, "bob": 0}
        lock = threading.Lock()
        real = store.access.usage

        def slow_usage(user: User, *, owner: int) -> Usage:
            """Count, as slowly as a huge maildir would, noting how many run at once."""
            with lock:
                running[user.name] += 1
                most[user.name] = max(most[user.name], running[user.name])
            time.sleep(0.05)
            with lock:
                running[user.name] -= 1
            return real(user, owner=owner)

        monkeypatch.setattr(store.access, "usage", slow_usage)
        alices = [asyncio.ensure_future(store.usage(ALICE)) for _ in range(8)]
        await asyncio.sleep(0.01)
        await store.usage(User("bob"))
        alice_pending = sum(not task.done() for task in alices)
        await asyncio.gather(*alices)
        assert ({"alice": 1, "bob": 1}, True) == (most, alice_pending > 0)


class TestTmpCleanup:
    """Files left in ``tmp/`` for over 36 hours are removed; nothing else is."""

    def plant(self, maildir: Path, canary: Path) -> dict[str, Path]:
        """Fill ``tmp/`` with old and young files, an old link and an old directory."""
        deliver(maildir, b"Subject: one\n\n")
        tmp = maildir / "tmp"
        old = time.time() - 37 * 3600
        young = time.time() - 35 * 3600
        paths = {
            "old": tmp / "1600000000.M1P1.crashed",
            "young": tmp / "1600000001.M1P1.writing",
            "link": tmp / "1600000002.M1P1.link",
            "dir": tmp / "1600000003.M1P1.dir",
        }
        paths["old"].write_bytes(b"half a message")
        paths["young"].write_bytes(b"being written")
        paths["link"].symlink_to(canary)
        paths["dir"].mkdir()  # the canary stays young: only the link's own age counts
        for name, path in paths.items():
            when = young if name == "young" else old
            os.utime(path, (when, when), follow_symlinks=False)
        return paths

    async def test_delivery_removes_old_leftovers(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """After a delivery, old files and links are gone; young ones, directories, targets stay."""
        paths = self.plant(maildir, canary)
        await store.deliver(ALICE, incoming(b"Subject: two\n\n"))
        left = {name: os.path.lexists(path) for name, path in paths.items()}
        expected = {"old": False, "young": True, "link": False, "dir": True}
        assert (expected, SECRET) == (left, canary.read_bytes())

    async def test_login_removes_old_leftovers(
        self, store: MaildirStore, maildir: Path, canary: Path
    ) -> None:
        """The first login of the maildir (for this process) cleans ``tmp/`` too."""
        paths = self.plant(maildir, canary)
        await (await store.open(ALICE)).close()
        left = {name: os.path.lexists(path) for name, path in paths.items()}
        expected = {"old": False, "young": True, "link": False, "dir": True}
        assert (expected, SECRET) == (left, canary.read_bytes())
