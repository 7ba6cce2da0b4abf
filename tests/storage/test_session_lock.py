"""The Maildir session lock: Dovecot's ``dovecot-pop3-session.lock`` dotlock.

Exclusion within a process and across processes, which locks are stale and broken, refreshing,
release, that no descriptor stays open, and exclusion against a real Dovecot.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import gc
import os
import poplib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.storage import _safefs
from pobox.storage._safefs import Dir
from pobox.storage.base import MaildropLocked, StorageError
from pobox.storage.maildir import MaildirStore
from pobox.storage.maildir._fs import SessionLock, refresh_session_locks
from tests.helpers.dovecot import running_dovecot, searchable_tmpdir
from tests.helpers.maildir import User

ALICE = User("alice")
LOCK = "dovecot-pop3-session.lock"
ROOT = Path(__file__).resolve().parents[2]


def ours() -> bytes:
    """Return what a lock taken by this process contains."""
    return f"{os.getpid()}:{socket.gethostname()}".encode()


def dead_pid() -> int:
    """Return the PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_maildir(path: Path) -> Path:
    """Create an empty maildir at ``path`` and return it."""
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def plant(maildir: Path, content: bytes, age: float = 0.0) -> Path:
    """Leave a lock file with ``content`` whose mtime is ``age`` seconds in the past."""
    path = make_maildir(maildir) / LOCK
    path.write_bytes(content)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


class Holder:
    """A Python child process that opens a maildrop with pobox and holds it until killed.

    It imports pobox, says ``ready``, and tries when told :meth:`go`, so that several children
    try at the same moment.
    """

    def __init__(self, location: str, user: str = "alice") -> None:
        script = (
            "import asyncio, sys\n"
            "from pobox.storage.base import MaildropLocked\n"
            "from pobox.storage.maildir import MaildirStore\n"
            "from tests.helpers.maildir import User\n"
            "async def main():\n"
            "    print('ready', flush=True)\n"
            "    sys.stdin.readline()\n"
            "    try:\n"
            f"        maildrop = await MaildirStore({location!r}).open(User({user!r}))\n"
            "    except MaildropLocked:\n"
            "        print('locked', flush=True)\n"
            "    else:\n"
            "        print('won', flush=True)\n"
            "    await asyncio.to_thread(sys.stdin.read)\n"
            "asyncio.run(main())\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )

    def ready(self) -> bytes:
        """Wait until the child is ready to try; return what it said (``b"ready\\n"``)."""
        assert self.process.stdout is not None
        return self.process.stdout.readline()

    def go(self) -> None:
        """Tell the child to try now."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def outcome(self) -> bytes:
        """Wait for the child's attempt and return ``b"won\\n"`` or ``b"locked\\n"``."""
        assert self.process.stdout is not None
        return self.process.stdout.readline()

    def kill(self) -> None:
        """Kill the child (SIGKILL: no cleanup runs) and reap it."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """Child processes started by a test, killed at its end."""
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.kill()


class TestExclusion:
    """One session at a time per maildrop, within a process and across processes."""

    async def test_second_open_in_process_is_refused(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """While a session holds the maildrop, a second open in the same process is refused."""
        first = await store.open(ALICE)
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)
        assert ours() == (maildir / LOCK).read_bytes()
        await first.close()

    async def test_open_through_another_path_is_refused(
        self, tmp_path: Path, store: MaildirStore
    ) -> None:
        """A maildir reached through a symlink is the same maildrop: our live lock is kept."""
        first = await store.open(ALICE)
        (tmp_path / "alias").symlink_to(tmp_path / "alice")
        with pytest.raises(MaildropLocked):
            await store.open(User("alias"))
        await first.close()

    async def test_close_removes_the_lock_file(self, store: MaildirStore, maildir: Path) -> None:
        """Closing the maildrop unlinks the lock file, and the next open succeeds."""
        await (await store.open(ALICE)).close()
        assert not (maildir / LOCK).exists()
        await (await store.open(ALICE)).close()

    async def test_forgotten_maildrop_removes_the_lock_file(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A maildrop collected without close unlinks its lock file."""
        maildrop = await store.open(ALICE)
        del maildrop
        # asyncio keeps the finished open's future (and so the maildrop) for a loop iteration
        # or a few: let the loop run until nothing but us could hold it.
        for _ in range(100):
            await asyncio.sleep(0)
            gc.collect()
            if not (maildir / LOCK).exists():
                break
        assert not (maildir / LOCK).exists()

    def test_threads_racing_for_a_maildrop_get_one_lock(self, maildir: Path) -> None:
        """Of sixteen threads taking one lock at once, exactly one gets it."""
        make_maildir(maildir)
        barrier = threading.Barrier(16)
        won: list[SessionLock] = []
        refused: list[MaildropLocked] = []

        def take() -> None:
            """Wait for the others, then try to take the lock."""
            barrier.wait()
            try:
                with Dir.open_root(maildir, os.geteuid()) as root:
                    won.append(SessionLock(root, LOCK, "pobox-uidlist.lock", timeout=10))
            except MaildropLocked as exc:
                refused.append(exc)

        threads = [threading.Thread(target=take) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (1, 15) == (len(won), len(refused))
        won[0].release()

    async def test_lock_of_another_process_is_respected_until_it_is_killed(
        self, tmp_path: Path, store: MaildirStore, maildir: Path, holders: list[Holder]
    ) -> None:
        """A child's lock refuses us; once the child is SIGKILLed, its lock is stale and broken."""
        holders.append(Holder(f"maildir:{tmp_path}/%n"))
        assert b"ready\n" == await asyncio.to_thread(holders[0].ready)
        holders[0].go()
        assert b"won\n" == await asyncio.to_thread(holders[0].outcome)
        child = holders[0].process.pid
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)
        holders[0].kill()
        assert f"{child}:{socket.gethostname()}".encode() == (maildir / LOCK).read_bytes()
        maildrop = await store.open(ALICE)
        assert ours() == (maildir / LOCK).read_bytes()
        await maildrop.close()

    async def test_processes_racing_to_break_a_stale_lock_get_one_lock(
        self, tmp_path: Path, maildir: Path, holders: list[Holder]
    ) -> None:
        """Of six processes finding the same stale lock, exactly one breaks it and takes it."""
        plant(maildir, f"{dead_pid()}:{socket.gethostname()}".encode())
        holders.extend(Holder(f"maildir:{tmp_path}/%n") for _ in range(6))
        for holder in holders:
            assert b"ready\n" == await asyncio.to_thread(holder.ready)
        for holder in holders:
            holder.go()
        outcomes = sorted([await asyncio.to_thread(holder.outcome) for holder in holders])
        assert [b"locked\n"] * 5 + [b"won\n"] == outcomes


class TestBreaking:
    """Stale locks are broken only under the index lock, so two breakers cannot both win."""

    async def test_breaker_waits_for_the_index_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A stale lock is left alone while another process holds the index lock."""
        stale = f"{dead_pid()}:{socket.gethostname()}".encode()
        path = plant(maildir, stale)
        index_lock = os.open(maildir / "pobox-uidlist.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(index_lock, fcntl.LOCK_EX)
            opening = asyncio.ensure_future(store.open(ALICE))
            await asyncio.sleep(0.2)
            assert (False, stale) == (opening.done(), path.read_bytes())
        finally:
            os.close(index_lock)
        maildrop = await opening
        assert ours() == path.read_bytes()
        await maildrop.close()


class TestStaleLocks:
    """Which lock files a crash leaves behind are broken, and which are respected."""

    async def test_dead_pid_of_this_host_is_broken(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A fresh lock naming a process of this host that is gone is broken at once."""
        plant(maildir, f"{dead_pid()}:{socket.gethostname()}".encode())
        maildrop = await store.open(ALICE)
        assert ours() == (maildir / LOCK).read_bytes()
        await maildrop.close()

    async def test_own_pid_not_held_is_broken(self, store: MaildirStore, maildir: Path) -> None:
        """A lock naming our own PID that this process does not hold (PID reuse) is broken."""
        plant(maildir, ours() + b"\n")
        maildrop = await store.open(ALICE)
        assert ours() == (maildir / LOCK).read_bytes()
        await maildrop.close()

    async def test_live_pid_of_this_host_is_respected(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock naming a live process of this host holds even untouched for seven minutes."""
        plant(maildir, f"{os.getppid()}:{socket.gethostname()}".encode(), age=420)
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)

    async def test_live_pid_untouched_for_long_is_broken(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock naming a live process but untouched for eleven minutes names a reused PID."""
        plant(maildir, f"{os.getppid()}:{socket.gethostname()}".encode(), age=660)
        await (await store.open(ALICE)).close()

    @pytest.mark.parametrize("content", [b"", b"12", b"garbage", b"-5:host", b"0:x"])
    async def test_unreadable_content_fresh_is_respected(
        self, store: MaildirStore, maildir: Path, content: bytes
    ) -> None:
        """A fresh lock whose content names no process (being written, or foreign) holds."""
        plant(maildir, content.replace(b"host", socket.gethostname().encode()))
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)

    @pytest.mark.parametrize("content", [b"", b"garbage", b"12"])
    async def test_unreadable_content_old_is_broken(
        self, store: MaildirStore, maildir: Path, content: bytes
    ) -> None:
        """A lock naming no process and untouched for over five minutes is broken."""
        plant(maildir, content, age=310)
        await (await store.open(ALICE)).close()

    async def test_partial_content_never_names_a_dead_process(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock cut short after the PID (no whole host name yet) is not judged by that PID."""
        host = socket.gethostname().encode()
        plant(maildir, b"%d:%s" % (dead_pid(), host[:-1]))
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)

    async def test_foreign_host_fresh_is_respected(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock of another host, touched four minutes ago, holds (its PID is not checked)."""
        plant(maildir, f"{dead_pid()}:other-host.example".encode(), age=240)
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)

    async def test_foreign_host_old_is_broken(self, store: MaildirStore, maildir: Path) -> None:
        """A lock of another host untouched for over five minutes is broken."""
        plant(maildir, b"4242:other-host.example", age=301)
        maildrop = await store.open(ALICE)
        assert ours() == (maildir / LOCK).read_bytes()
        await maildrop.close()


class TestRefresh:
    """Held locks are touched so that nobody finds them stale."""

    async def test_refresh_touches_held_locks(self, store: MaildirStore, maildir: Path) -> None:
        """A held lock backdated by an hour is fresh again after a refresh pass."""
        maildrop = await store.open(ALICE)
        path = maildir / LOCK
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        assert 1 <= refresh_session_locks()
        assert time.time() - 60 < path.stat().st_mtime
        await maildrop.close()

    async def test_refreshed_lock_holds_against_another_host(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A foreign-host lock judged by mtime: touched by its holder, it is not broken."""
        maildrop = await store.open(ALICE)
        await maildrop.close()
        path = plant(maildir, b"4242:other-host.example", age=3600)
        os.utime(path)  # what the other host's refresher does
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)

    async def test_refresh_skips_a_lock_that_is_no_longer_ours(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock broken and retaken by someone else is not kept fresh on their behalf."""
        maildrop = await store.open(ALICE)
        path = maildir / LOCK
        path.unlink()
        plant(maildir, b"4242:other-host.example", age=3600)
        refresh_session_locks()
        assert path.stat().st_mtime < time.time() - 3000
        await maildrop.close()


class TestRelease:
    """Release unlinks only a lock that is still ours."""

    async def test_release_leaves_another_owners_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A lock replaced by another owner's (ours was broken) survives our close."""
        maildrop = await store.open(ALICE)
        path = maildir / LOCK
        path.unlink()
        path.write_bytes(b"4242:other-host.example")
        await maildrop.close()
        assert b"4242:other-host.example" == path.read_bytes()

    async def test_release_twice_is_harmless(self, store: MaildirStore, maildir: Path) -> None:
        """Closing twice does not remove the lock the next session took meanwhile."""
        first = await store.open(ALICE)
        await first.close()
        second = await store.open(ALICE)
        await first.close()
        assert ours() == (maildir / LOCK).read_bytes()
        await second.close()


SPARE = LOCK + ".pobox-spare"


class TestSpare:
    """A release renames the lock file to a spare; the next take renames it back.

    So a login allocates no inode (on ext4, creating a file under many logins cost ~300 µs),
    while the lock stays Dovecot's dotlock. A spare the owner tampered with is never written.
    """

    async def test_release_leaves_a_spare_the_next_take_renames(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """The spare is the inode the lock was, content kept; the next lock is that inode."""
        await (await store.open(ALICE)).close()
        spare = os.stat(maildir / SPARE)
        assert (ours(), False) == ((maildir / SPARE).read_bytes(), (maildir / LOCK).exists())
        maildrop = await store.open(ALICE)
        lock = os.stat(maildir / LOCK)
        assert (spare.st_ino, ours(), False) == (
            lock.st_ino,
            (maildir / LOCK).read_bytes(),
            (maildir / SPARE).exists(),
        )
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)
        await maildrop.close()
        assert spare.st_ino == os.stat(maildir / SPARE).st_ino

    async def test_content_left_in_the_spare_is_replaced(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A spare holding more than our content ends up holding exactly our content."""
        await (await store.open(ALICE)).close()  # the cache filled: the next open may claim
        (maildir / SPARE).write_bytes(b"x" * 600)
        spare = os.stat(maildir / SPARE).st_ino
        maildrop = await store.open(ALICE)
        assert (ours(), spare) == ((maildir / LOCK).read_bytes(), os.stat(maildir / LOCK).st_ino)
        await maildrop.close()

    @pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory", "fifo"])
    async def test_tampered_spare_is_not_used(
        self, store: MaildirStore, maildir: Path, tmp_path: Path, kind: str
    ) -> None:
        """A spare that is a link, a second name of a message, or no regular file: left alone.

        The lock is created afresh, and what the spare named keeps its content.
        """
        await (await store.open(ALICE)).close()
        (maildir / SPARE).unlink()
        message = maildir / "cur" / "1.M1P1.host:2,"
        message.write_bytes(b"Subject: mine\r\n\r\nbody\r\n")
        outside = tmp_path / "outside"
        outside.write_bytes(b"not the user's\n")
        if kind == "symlink":
            (maildir / SPARE).symlink_to(outside)
        elif kind == "hardlink":
            os.link(message, maildir / SPARE)
        elif kind == "directory":
            (maildir / SPARE).mkdir()
        else:
            os.mkfifo(maildir / SPARE)
        maildrop = await store.open(ALICE)
        lock = maildir / LOCK
        assert (ours(), False, True) == (
            lock.read_bytes(),
            lock.is_symlink(),
            os.path.lexists(maildir / SPARE),
        )
        assert b"Subject: mine\r\n\r\nbody\r\n" == message.read_bytes()
        assert b"not the user's\n" == outside.read_bytes()
        await maildrop.close()
        assert not lock.exists()

    async def test_spare_swapped_before_the_rename_is_put_back(
        self,
        store: MaildirStore,
        maildir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The owner swaps the spare for a second name of a message just before the rename.

        What was renamed is not the file written: it goes back to the spare's name, the lock
        is created afresh, and the message is untouched.
        """
        await (await store.open(ALICE)).close()
        message = maildir / "cur" / "1.M1P1.host:2,"
        message.write_bytes(b"Subject: mine\r\n\r\nbody\r\n")
        rename = Dir.rename_exclusive

        def swapped(self: Dir, name: str, new_name: str) -> bool | None:
            if name == SPARE:
                (maildir / SPARE).unlink()
                os.link(message, maildir / SPARE)
            return rename(self, name, new_name)

        monkeypatch.setattr(Dir, "rename_exclusive", swapped)
        maildrop = await store.open(ALICE)
        monkeypatch.undo()
        lock = maildir / LOCK
        assert (ours(), 1) == (lock.read_bytes(), os.stat(lock).st_nlink)
        assert os.stat(message).st_ino == os.stat(maildir / SPARE).st_ino
        assert b"Subject: mine\r\n\r\nbody\r\n" == message.read_bytes()
        await maildrop.close()

    async def test_spare_unopenable_is_left_and_the_lock_created(
        self,
        store: MaildirStore,
        maildir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """An error opening the spare (no descriptor left, ...) renames nothing."""
        await (await store.open(ALICE)).close()
        spare = os.stat(maildir / SPARE).st_ino
        open_writable = Dir.open_writable

        def failing(self: Dir, name: str, **kwargs: bool) -> int | None:
            if name == SPARE:
                raise StorageError("too many open files")
            return open_writable(self, name, **kwargs)

        monkeypatch.setattr(Dir, "open_writable", failing)
        maildrop = await store.open(ALICE)
        monkeypatch.undo()
        assert (spare, ours()) == (os.stat(maildir / SPARE).st_ino, (maildir / LOCK).read_bytes())
        assert spare != os.stat(maildir / LOCK).st_ino
        await maildrop.close()
        assert not (maildir / LOCK).exists()

    async def test_release_whose_rename_fails_unlinks(
        self,
        store: MaildirStore,
        maildir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A rename refused at release (a full quota, ...) unlinks the lock as before."""
        maildrop = await store.open(ALICE)

        def over_quota(*args: object) -> int:
            ctypes.set_errno(errno.EDQUOT)
            return -1

        monkeypatch.setattr(_safefs, "_renameat2", over_quota)
        await maildrop.close()
        monkeypatch.undo()
        assert (False, False) == ((maildir / LOCK).exists(), (maildir / SPARE).exists())
        await (await store.open(ALICE)).close()

    async def test_spare_is_claimed_only_under_the_index_lock(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """While another process holds the index lock, the lock file is created, the spare left."""
        await (await store.open(ALICE)).close()
        spare = os.stat(maildir / SPARE).st_ino
        index_lock = os.open(maildir / "pobox-uidlist.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(index_lock, fcntl.LOCK_EX)
            opening = asyncio.ensure_future(store.open(ALICE))
            await asyncio.sleep(0.2)
            assert (False, spare) == (opening.done(), os.stat(maildir / SPARE).st_ino)
        finally:
            os.close(index_lock)
        maildrop = await opening
        assert spare == os.stat(maildir / SPARE).st_ino
        assert spare != os.stat(maildir / LOCK).st_ino
        await maildrop.close()

    async def test_lock_is_unlinked_when_a_spare_exists(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A second spare is never made: with one there already, release unlinks the lock."""
        maildrop = await store.open(ALICE)
        (maildir / SPARE).write_bytes(b"")
        there = os.stat(maildir / SPARE).st_ino
        await maildrop.close()
        assert (False, there) == ((maildir / LOCK).exists(), os.stat(maildir / SPARE).st_ino)

    async def test_without_renameat2_locks_are_created_and_unlinked(
        self, store: MaildirStore, maildir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where renames cannot be exclusive, the lock file is created and unlinked, no spare."""
        monkeypatch.setattr(_safefs, "_renameat2", None)
        for _ in range(2):
            maildrop = await store.open(ALICE)
            assert ours() == (maildir / LOCK).read_bytes()
            await maildrop.close()
        assert (False, False) == ((maildir / LOCK).exists(), (maildir / SPARE).exists())

    async def test_stale_lock_is_broken_with_a_spare_there(
        self, store: MaildirStore, maildir: Path
    ) -> None:
        """A crash's lock is broken as before, and the spare then becomes the lock."""
        plant(maildir, f"{dead_pid()}:{socket.gethostname()}".encode())
        (maildir / SPARE).write_bytes(b"")
        spare = os.stat(maildir / SPARE).st_ino
        maildrop = await store.open(ALICE)
        assert (ours(), spare) == ((maildir / LOCK).read_bytes(), os.stat(maildir / LOCK).st_ino)
        await maildrop.close()


class TestDescriptors:
    """A held session lock costs no file descriptor."""

    async def test_open_maildrops_hold_no_descriptor(self, store: MaildirStore) -> None:
        """Fifty open maildrops leave the process with the descriptors it had before."""
        for number in range(50):
            await (await store.open(User(f"user{number}"))).close()
        before = len(os.listdir("/proc/self/fd"))
        maildrops = [await store.open(User(f"user{number}")) for number in range(50)]
        after = len(os.listdir("/proc/self/fd"))
        for maildrop in maildrops:
            await maildrop.close()
        assert before == after


def dovecot_home(tmp: Path) -> Path:
    """Create alice's home and empty maildir for Dovecot (handed to its user on start)."""
    home = tmp / "home" / "alice"
    make_maildir(home / "Maildir")
    return home


class TestDovecot:
    """pobox and a real Dovecot with ``pop3_lock_session = yes`` exclude each other."""

    async def test_dovecot_session_refuses_pobox(self) -> None:
        """While Dovecot serves alice, pobox cannot open her maildrop; after QUIT it can."""
        with searchable_tmpdir() as tmp:
            home = dovecot_home(tmp)
            with running_dovecot(
                tmp, {"alice": "secret"}, extra_config="pop3_lock_session = yes\n"
            ) as dovecot:
                # The maildir now belongs to the user Dovecot's mail processes run as.
                store = MaildirStore("maildir:~/Maildir", owner=home.stat().st_uid)
                user = User("alice", home=str(home))
                client = poplib.POP3(dovecot.host, dovecot.port, timeout=30)
                client.user("alice")
                client.pass_("secret")
                with pytest.raises(MaildropLocked):
                    await store.open(user)
                client.quit()
                dovecot.wait_for_log("Disconnected: Logged out")
                await (await store.open(user)).close()

    async def test_pobox_session_refuses_dovecot(self) -> None:
        """While pobox holds alice's maildrop, Dovecot answers her login with [IN-USE]."""
        with searchable_tmpdir() as tmp:
            home = dovecot_home(tmp)
            with running_dovecot(
                tmp, {"alice": "secret"}, extra_config="pop3_lock_session = yes\n"
            ) as dovecot:
                store = MaildirStore("maildir:~/Maildir", owner=home.stat().st_uid)
                maildrop = await store.open(User("alice", home=str(home)))
                try:
                    client = poplib.POP3(dovecot.host, dovecot.port, timeout=30)
                    client.user("alice")
                    # Dovecot waits up to 10 seconds for the lock before it gives up.
                    with pytest.raises(poplib.error_proto) as refused:
                        await asyncio.to_thread(client.pass_, "secret")
                    client.close()
                finally:
                    await maildrop.close()
                expected = b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
                assert expected == refused.value.args[0]
