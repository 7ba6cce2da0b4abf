"""The Maildir store's snapshot cache: a repeat open is cheap, yet sees every change.

Each test first opens the maildrop once with ``new/`` and ``cur/`` last modified a minute ago,
so the store's cache is warm and trusted, then changes the maildir as another process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pobox.storage.base import MaildropLocked, MessageInfo
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._deliver import deliver_message
from tests.helpers.maildir import User, deliver, incoming, set_flags

ALICE = User("alice")


def age(maildir: Path) -> int:
    """Set the mtime of ``new/`` and ``cur/`` to a minute ago; return it in nanoseconds."""
    past = time.time_ns() - 60_000_000_000
    for directory in ("new", "cur"):
        os.utime(maildir / directory, ns=(past, past))
    return past


async def messages(store: MaildirStore) -> list[MessageInfo]:
    """Open Alice's maildrop, return its snapshot, close."""
    maildrop = await store.open(ALICE)
    try:
        return list(maildrop.messages)
    finally:
        await maildrop.close()


async def read(store: MaildirStore, key: str) -> bytes:
    """Open Alice's maildrop, return message ``key``, close."""
    maildrop = await store.open(ALICE)
    try:
        return b"".join([chunk async for chunk in maildrop.read_message(key)])
    finally:
        await maildrop.close()


async def warm(store: MaildirStore, maildir: Path) -> list[MessageInfo]:
    """Age the directories and open once, so the next open may use the cache."""
    age(maildir)
    return await messages(store)


class TestSnapshotCache:
    """MaildirStore.open() with the snapshot of an earlier open cached."""

    async def test_unchanged_old_directories_are_not_listed_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A file slipped into new/ with its old mtime restored is not seen: the cache served."""
        deliver(maildir, b"one\n")
        before = await warm(store, maildir)
        past = os.stat(maildir / "new").st_mtime_ns
        deliver(maildir, b"two\n")
        os.utime(maildir / "new", ns=(past, past))
        assert before == await messages(store)

    async def test_recent_directory_mtime_is_not_trusted(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A directory modified within a second of the cached listing is listed again."""
        deliver(maildir, b"one\n")
        await messages(store)
        recent = os.stat(maildir / "new").st_mtime_ns
        base = deliver(maildir, b"two\n")
        os.utime(maildir / "new", ns=(recent, recent))
        assert base in [info.key for info in await messages(store)]

    async def test_delivery_is_seen(self, store: MaildirStore, maildir: Path) -> None:
        """A message delivered by deliver_message (index line appended) is listed next."""
        deliver(maildir, b"one\n")
        before = await warm(store, maildir)
        name = deliver_message(maildir, incoming(b"Subject: two\r\n\r\nbody\r\n"))
        after = await messages(store)
        assert [*[info.key for info in before], name] == [info.key for info in after]
        assert await messages(MaildirStore(f"maildir:{maildir.parent}/%n")) == after
        assert b"Subject: two\n\nbody\n" == await read(store, name)

    async def test_delivery_is_seen_even_with_new_mtime_restored(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A changed index makes the directories be listed again, whatever their mtimes."""
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        past = os.stat(maildir / "new").st_mtime_ns
        name = deliver_message(maildir, incoming(b"two\n"))
        os.utime(maildir / "new", ns=(past, past))
        assert name in [info.key for info in await messages(store)]

    async def test_delivery_without_index_line_is_seen(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message an MTA put into new/ without touching the index is listed next."""
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        base = deliver(maildir, b"two\n")
        keys = [info.key for info in await messages(store)]
        assert base == keys[-1]

    async def test_move_from_new_to_cur_is_seen(self, store: MaildirStore, maildir: Path) -> None:
        """A message moved from new/ to cur/ keeps its UIDL and is read from its new place."""
        base = deliver(maildir, b"moved\n")
        before = await warm(store, maildir)
        set_flags(maildir, base, "S")
        assert before == await messages(store)
        assert b"moved\n" == await read(store, base)

    async def test_flag_change_is_seen(self, store: MaildirStore, maildir: Path) -> None:
        """A message whose flags changed in cur/ keeps its UIDL and is read under its new name."""
        base = deliver(maildir, b"flagged\n", flags="S")
        before = await warm(store, maildir)
        set_flags(maildir, base, "RS")
        assert before == await messages(store)
        assert b"flagged\n" == await read(store, base)

    async def test_delete_by_another_process_is_seen(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A message unlinked by another process is gone from the next snapshot."""
        kept = deliver(maildir, b"kept\n")
        gone = deliver(maildir, b"gone\n", flags="S")
        await warm(store, maildir)
        (maildir / "cur" / f"{gone}:2,S").unlink()
        assert [kept] == [info.key for info in await messages(store)]

    async def test_delete_by_this_process_is_seen(self, store: MaildirStore, maildir: Path) -> None:
        """A message deleted through a maildrop of the same store is gone from the next one."""
        kept = deliver(maildir, b"kept\n")
        gone = deliver(maildir, b"gone\n")
        await warm(store, maildir)
        maildrop = await store.open(ALICE)
        await maildrop.delete([gone])
        await maildrop.close()
        assert [kept] == [info.key for info in await messages(store)]

    async def test_index_replaced_by_another_process_is_read_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A removed pobox-uidlist starts a new UIDVALIDITY even with the cache warm."""
        deliver(maildir, b"one\n")
        before = await warm(store, maildir)
        (maildir / "pobox-uidlist").unlink()
        after = await messages(store)
        assert before[0].uidl != after[0].uidl

    async def test_missing_directory_is_created_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """An open after new/ was removed recreates it (mode 0700) and still lists cur/."""
        base = deliver(maildir, b"seen\n", flags="S")
        await warm(store, maildir)
        (maildir / "new").rmdir()
        assert [base] == [info.key for info in await messages(store)]
        assert 0o700 == (maildir / "new").stat().st_mode & 0o777

    async def test_missing_tmp_of_existing_maildir_is_created(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """The first open of an existing maildir lacking tmp/ creates it, as deliveries need it."""
        deliver(maildir, b"one\n")
        (maildir / "tmp").rmdir()
        await messages(store)
        assert (maildir / "tmp").is_dir()

    async def test_directory_with_another_old_mtime_is_listed_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A directory whose mtime changed to another old one (a restore, rsync -t) is listed."""
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        base = deliver(maildir, b"two\n")
        older = os.stat(maildir / "cur").st_mtime_ns - 10_000_000_000
        os.utime(maildir / "new", ns=(older, older))
        assert base in [info.key for info in await messages(store)]

    async def test_index_appended_and_rewritten_in_place_is_read_again(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """An index edited in place (same inode) and grown is parsed whole, not as an append."""
        base = deliver(maildir, b"one\n")
        await warm(store, maildir)
        index = maildir / "pobox-uidlist"
        text = index.read_bytes()
        edited = re.sub(rb" V[0-9]+ ", b" V1234567890 ", text) + b"\n"
        with index.open("r+b") as handle:
            handle.write(edited)
        uidls = {info.key: info.uidl for info in await messages(store)}
        assert {base: "00000001499602d2"} == uidls


@contextlib.contextmanager
def no_worker_threads() -> Iterator[None]:
    """Give the running loop a shut-down default executor: every worker-thread hop fails."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    executor.shutdown()
    loop.set_default_executor(executor)
    try:
        yield
    finally:
        loop.set_default_executor(ThreadPoolExecutor())


class TestInlineOpen:
    """A cached open runs in the event loop's thread; anything else goes to a worker thread."""

    async def test_unchanged_maildrop_opens_without_a_thread(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """With no worker thread to be had, an unchanged cached maildrop still opens and reads."""
        deliver(maildir, b"one\n")
        before = await warm(store, maildir)
        with no_worker_threads():
            assert before == await messages(store)
            assert b"one\n" == await read(store, before[0].key)

    async def test_changed_maildrop_goes_to_a_thread(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """After a delivery the open needs a listing, which is never done inline."""
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        deliver(maildir, b"two\n")
        with no_worker_threads(), pytest.raises(RuntimeError, match="shutdown"):
            await messages(store)
        assert 2 == len(await messages(store))  # and the failed open left no lock behind

    async def test_busy_index_lock_does_not_block_the_event_loop(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """While another process holds the index lock, the open waits in a worker thread."""
        deliver(maildir, b"one\n")
        before = await warm(store, maildir)
        index_lock = os.open(maildir / "pobox-uidlist.lock", os.O_RDWR)
        try:
            fcntl.flock(index_lock, fcntl.LOCK_EX)
            opening = asyncio.ensure_future(messages(store))
            await asyncio.sleep(0.2)  # returns only if the event loop is not blocked
            assert not opening.done()
        finally:
            os.close(index_lock)
        assert before == await asyncio.wait_for(opening, 10)

    async def test_locked_maildrop_is_refused(self, store: MaildirStore, maildir: Path) -> None:
        """A maildrop locked by a session is refused whether or not its snapshot is cached."""
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        holder = await store.open(ALICE)
        try:
            with pytest.raises(MaildropLocked):
                await store.open(ALICE)
        finally:
            await holder.close()
        assert 1 == len(await messages(store))

    async def test_no_inline_open_when_inline_reads_are_off(self, maildir: Path) -> None:
        """With inline_read_max = 0 (network storage) every open goes to a worker thread."""
        store = MaildirStore(f"maildir:{maildir.parent}/%n", inline_read_max=0)
        deliver(maildir, b"one\n")
        await warm(store, maildir)
        with no_worker_threads(), pytest.raises(RuntimeError, match="shutdown"):
            await messages(store)
