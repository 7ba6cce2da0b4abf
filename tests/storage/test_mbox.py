"""The mbox store beyond the contract: locks shared with MTAs, hostile spools, crash safety.

The contract suite (``test_contract.py``, backend ``mbox``) covers what every store promises;
these tests cover what only an mbox spool in a shared directory such as ``/var/mail`` needs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.storage.base import MaildropLocked, StoragePermanentError, StorageTemporaryError
from pobox.storage.mbox import MboxStore
from tests.helpers.maildir import User, incoming
from tests.helpers.mbox import append

ALICE = User("alice")


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """An empty spool directory, like ``/var/mail``."""
    path = tmp_path / "spool"
    path.mkdir()
    return path


def store_for(spool_dir: Path, **kwargs: float | bool) -> MboxStore:
    """Return a store with spools ``spool_dir/<user>``."""
    return MboxStore(f"mbox:{spool_dir}/%u", **kwargs)  # type: ignore[arg-type]


async def uidls_and_bodies(store: MboxStore) -> list[tuple[str, bytes]]:
    """(UIDL, content) of each message of a fresh session."""
    maildrop = await store.open(ALICE)
    try:
        return [
            (info.uidl, b"".join([c async for c in maildrop.read_message(info.key)]))
            for info in maildrop.messages
        ]
    finally:
        await maildrop.close()


class TestLocation:
    """Which file is the spool."""

    async def test_inbox_option_names_the_spool(self, tmp_path: Path, spool_dir: Path) -> None:
        """``mbox:ROOT:INBOX=PATH`` serves PATH; the root is ignored (and never created)."""
        append(spool_dir / "alice", b"hello\n")
        store = MboxStore(f"mbox:~/mail:INBOX={spool_dir}/%u:LAYOUT=fs")
        user = User("alice", home=str(tmp_path / "home"))
        maildrop = await store.open(user)
        assert 1 == len(maildrop.messages)
        await maildrop.close()
        assert not (tmp_path / "home").exists()

    async def test_user_mail_field_overrides(self, tmp_path: Path, spool_dir: Path) -> None:
        """A user's ``mail`` field (userdb_mail) that is an mbox location is used instead."""
        other = tmp_path / "other"
        other.mkdir()
        append(other / "alice", b"elsewhere\n")
        store = store_for(spool_dir)
        maildrop = await store.open(User("alice", mail=f"mbox:{other}/%u"))
        assert 1 == len(maildrop.messages)
        await maildrop.close()


class TestParseCache:
    """A spool unchanged since the last open is not parsed again; an appended one only in part."""

    async def test_append_after_a_message_without_final_newline(self, spool_dir: Path) -> None:
        """What an MTA appends is found, and the message before it keeps its end."""
        spool = spool_dir / "alice"
        spool.write_bytes(b"From a@b Mon Dec  7 15:00:00 2026\nold")
        store = store_for(spool_dir)
        first = await uidls_and_bodies(store)
        with spool.open("ab") as out:
            out.write(b"\nFrom a@b Mon Dec  7 15:00:01 2026\nnew\n\n")
        second = await uidls_and_bodies(store)
        assert [b"old"] == [body for _, body in first]
        assert [*first, (second[1][0], b"new\n")] == second

    @pytest.mark.parametrize("grow", [b"", b"x" * 100], ids=["shrunk", "grown"])
    async def test_rewritten_in_place_is_parsed_again(self, spool_dir: Path, grow: bytes) -> None:
        """An MUA rewriting the spool in place (same inode) is not mistaken for an append."""
        spool = spool_dir / "alice"
        append(spool, b"one\n")
        append(spool, b"two\n")
        store = store_for(spool_dir)
        await uidls_and_bodies(store)
        with spool.open("r+b") as out:
            out.write(b"From a@b Mon Dec  7 15:00:00 2026\nONE" + grow + b"\n\n")
            out.write(b"From a@b Mon Dec  7 15:00:00 2026\nTWO\n\n")
            out.truncate()
        os.utime(spool, ns=(0, 10**9))
        expected = [b"ONE" + grow + b"\n", b"TWO\n"]
        assert expected == [body for _, body in await uidls_and_bodies(store)]


class TestHostileSpool:
    """The user controls their spool file: links, FIFOs and others' files are refused."""

    async def test_symlink_spool_refused(self, tmp_path: Path, spool_dir: Path) -> None:
        """A spool that is a symbolic link is not followed, for reading or delivering."""
        target = tmp_path / "target"
        append(target, b"secret\n")
        before = target.read_bytes()
        (spool_dir / "alice").symlink_to(target)
        store = store_for(spool_dir)
        with pytest.raises(StoragePermanentError):
            await store.open(ALICE)
        with pytest.raises(StoragePermanentError):
            await store.deliver(ALICE, incoming(b"x\n"))
        assert before == target.read_bytes()

    async def test_spool_swapped_for_a_link_during_a_session(
        self, tmp_path: Path, spool_dir: Path
    ) -> None:
        """A spool replaced by a link after login is not followed when a message is read."""
        append(spool_dir / "alice", b"mine\n")
        target = tmp_path / "target"
        append(target, b"secret\n")
        store = store_for(spool_dir)
        maildrop = await store.open(ALICE)
        (spool_dir / "alice").rename(tmp_path / "moved")
        (spool_dir / "alice").symlink_to(target)
        with pytest.raises(StoragePermanentError):
            b"".join([c async for c in maildrop.read_message(maildrop.messages[0].key)])
        with pytest.raises(StoragePermanentError):
            await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert b"secret\n" in target.read_bytes()

    async def test_fifo_spool_refused_without_blocking(self, spool_dir: Path) -> None:
        """A FIFO in place of the spool is refused at once (O_NONBLOCK, regular files only)."""
        os.mkfifo(spool_dir / "alice")
        with pytest.raises(StoragePermanentError):
            await store_for(spool_dir).open(ALICE)

    async def test_spool_of_another_owner_refused(self, spool_dir: Path) -> None:
        """A spool owned by someone other than the mail's owner is not read."""
        append(spool_dir / "alice", b"x\n")
        nobody = pwd.getpwnam("nobody").pw_uid
        store = MboxStore(f"mbox:{spool_dir}/%u", owner=nobody if os.geteuid() == 0 else 0)
        with pytest.raises(StoragePermanentError):
            await store.open(ALICE)

    async def test_not_an_mbox(self, spool_dir: Path) -> None:
        """A spool that does not start with a From_ line is refused, not guessed at."""
        (spool_dir / "alice").write_bytes(b"Subject: x\n\nbody\n")
        with pytest.raises(StoragePermanentError):
            await store_for(spool_dir).open(ALICE)


class TestDotlock:
    """``<spool>.lock``: created O_EXCL, never followed, stale after two minutes."""

    async def test_held_dotlock_is_temporary_failure(self, spool_dir: Path) -> None:
        """A fresh dotlock of another program makes delivery fail with SYS/TEMP; reading
        takes only the fcntl read lock (Dovecot's mbox_read_locks = fcntl), so open works."""
        append(spool_dir / "alice", b"x\n")
        (spool_dir / "alice.lock").write_text("")
        store = store_for(spool_dir, lock_timeout=0.05)
        with pytest.raises(StorageTemporaryError) as delivered:
            await store.deliver(ALICE, incoming(b"y\n"))
        maildrop = await store.open(ALICE)
        with pytest.raises(StorageTemporaryError):
            await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert "SYS/TEMP" == delivered.value.resp_code
        assert [b"x\n"] == [body for _, body in await uidls_and_bodies(store)]

    async def test_held_dotlock_ties_up_one_thread(self, spool_dir: Path) -> None:
        """Alice holding her own dotlock while many deliveries to her wait does not hold up
        Bob: her waits take one worker thread, his delivery is done before any of hers ends."""
        (spool_dir / "alice.lock").write_text("")
        store = store_for(spool_dir, lock_timeout=1.0)
        alice = [asyncio.create_task(store.deliver(ALICE, incoming(b"a\n"))) for _ in range(12)]
        bob = asyncio.create_task(store.deliver(User("bob"), incoming(b"b\n")))
        done, _ = await asyncio.wait([bob, *alice], return_when=asyncio.FIRST_COMPLETED)
        results = await asyncio.gather(*alice, return_exceptions=True)
        assert [bob] == list(done)
        assert all(isinstance(result, StorageTemporaryError) for result in results)

    async def test_symlink_dotlock_never_followed(self, tmp_path: Path, spool_dir: Path) -> None:
        """A link planted as the dotlock counts as held, then as stale; its target is never
        created or written, and only the link is removed."""
        outside = tmp_path / "outside"
        (spool_dir / "alice.lock").symlink_to(outside)
        store = store_for(spool_dir, lock_timeout=0.05)
        with pytest.raises(StorageTemporaryError):
            await store.deliver(ALICE, incoming(b"y\n"))
        old = time.time() - 3600
        os.utime(spool_dir / "alice.lock", (old, old), follow_symlinks=False)
        await store.deliver(ALICE, incoming(b"y\n"))
        assert (False, False) == (outside.exists(), (spool_dir / "alice.lock").is_symlink())

    async def test_dotlock_of_a_dead_process_is_broken(self, spool_dir: Path) -> None:
        """A dotlock naming a process of this host that has exited is stale at once."""
        dead = (
            subprocess.run(
                [sys.executable, "-c", "import os; print(os.getpid())"],
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        (spool_dir / "alice.lock").write_text(f"{dead}:{socket.gethostname()}\n")
        store = store_for(spool_dir, lock_timeout=0.05)
        await store.deliver(ALICE, incoming(b"y\n"))
        assert not (spool_dir / "alice.lock").exists()

    async def test_dotlock_of_a_live_process_is_held(self, spool_dir: Path) -> None:
        """A dotlock naming a live process (this one) is respected."""
        (spool_dir / "alice.lock").write_text(f"{os.getpid()}:{socket.gethostname()}\n")
        store = store_for(spool_dir, lock_timeout=0.05)
        with pytest.raises(StorageTemporaryError):
            await store.deliver(ALICE, incoming(b"y\n"))

    async def test_stale_dotlock_is_broken(self, spool_dir: Path) -> None:
        """A dotlock unchanged for longer than two minutes is removed and taken."""
        (spool_dir / "alice.lock").write_text("")
        old = time.time() - 121
        os.utime(spool_dir / "alice.lock", (old, old))
        store = store_for(spool_dir, lock_timeout=0.05)
        await store.deliver(ALICE, incoming(b"y\n"))
        assert [b"y\n"] == [body for _, body in await uidls_and_bodies(store)]
        assert not (spool_dir / "alice.lock").exists()


@pytest.fixture
def fcntl_holder(spool_dir: Path) -> Iterator[Path]:
    """Another process holding a classic fcntl write lock (lockf) on alice's spool."""
    spool = spool_dir / "alice"
    append(spool, b"held\n")
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(spool)!r}, os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert b"locked\n" == holder.stdout.readline()
        yield spool
    finally:
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()
        holder.wait(timeout=30)


class TestFcntl:
    """The fcntl lock conflicts with the classic locks MTAs take."""

    async def test_write_locked_spool_is_not_read(self, fcntl_holder: Path) -> None:
        """While an MTA holds its write lock, open waits, then fails with SYS/TEMP, and
        leaves no session lock behind."""
        store = store_for(fcntl_holder.parent, lock_timeout=0.05)
        with pytest.raises(StorageTemporaryError):
            await store.open(ALICE)
        with pytest.raises(StorageTemporaryError):
            await store.open(ALICE)

    async def test_write_locked_spool_is_not_appended(self, fcntl_holder: Path) -> None:
        """Delivery does not write while another program holds the write lock."""
        before = fcntl_holder.read_bytes()
        store = store_for(fcntl_holder.parent, lock_timeout=0.05)
        with pytest.raises(StorageTemporaryError):
            await store.deliver(ALICE, incoming(b"y\n"))
        assert before == fcntl_holder.read_bytes()


class TestDeliver:
    """What delivery writes into the spool."""

    async def test_from_line_quoting_and_separator(self, spool_dir: Path) -> None:
        """A From_ line with the Return-Path sender, ``From `` quoted, one LF to separate."""
        store = store_for(spool_dir)
        message = incoming(b"From me\r\n>From you\r\nbody", header=b"Return-Path: <s@x.org>\n")
        await store.deliver(ALICE, message)
        written = (spool_dir / "alice").read_bytes()
        pattern = rb"From s@x\.org \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\n"
        rest = b"Return-Path: <s@x.org>\n>From me\n>From you\nbody\n"
        assert re.fullmatch(pattern + re.escape(rest), written)

    async def test_appends_after_a_file_without_final_newline(self, spool_dir: Path) -> None:
        """A spool another program left without a final LF gets one before the From_ line."""
        (spool_dir / "alice").write_bytes(b"From a@b Mon Dec  7 15:00:00 2026\nold")
        store = store_for(spool_dir)
        await store.deliver(ALICE, incoming(b"new\n"))
        assert [b"old", b"new\n"] == [body for _, body in await uidls_and_bodies(store)]

    async def test_session_does_not_block_delivery(self, spool_dir: Path) -> None:
        """A POP3 session's lock is not one an MTA waits for."""
        store = store_for(spool_dir, lock_timeout=0.05)
        session = await store.open(ALICE)
        with pytest.raises(MaildropLocked):
            await store.open(ALICE)
        await store.deliver(ALICE, incoming(b"y\n"))
        await session.close()

    async def test_child_process_does_not_keep_the_lock(self, spool_dir: Path) -> None:
        """Closing releases the session lock although a child process holds the descriptor.

        A subprocess forked by any thread while a session is open holds a copy of every
        descriptor until it execs; the flock, which belongs to the open file, must not stay
        held with it (seen as a spurious ``[IN-USE]`` right after a QUIT).
        """
        store = store_for(spool_dir)
        session = await store.open(ALICE)
        lock_fds = _fds_open_on(".alice.pobox-session")
        assert 1 == len(lock_fds)
        child = subprocess.Popen(["sleep", "30"], pass_fds=lock_fds)
        try:
            await session.close()
            again = await store.open(ALICE)
            await again.close()
        finally:
            child.kill()
            child.wait()


def _fds_open_on(name: str) -> list[int]:
    """This process's descriptors open on a file called ``name``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
        if target.endswith(f"/{name}"):
            found.append(int(fd))
    return found


class TestRewrite:
    """Deletion rewrites the spool: same owner and mode, crash-safe."""

    async def test_mode_and_group_kept(self, spool_dir: Path) -> None:
        """The new spool has the old one's permission bits and group."""
        append(spool_dir / "alice", b"one\n")
        append(spool_dir / "alice", b"two\n")
        os.chmod(spool_dir / "alice", 0o660)
        gid = 1 if os.geteuid() == 0 else os.getegid()
        os.chown(spool_dir / "alice", -1, gid)
        store = store_for(spool_dir)
        maildrop = await store.open(ALICE)
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        st = (spool_dir / "alice").stat()
        assert (0o660, gid) == (st.st_mode & 0o7777, st.st_gid)
        assert [b"two\n"] == [body for _, body in await uidls_and_bodies(store)]

    async def test_lost_uidl_list_gives_new_uidls(self, spool_dir: Path) -> None:
        """Without its UIDL list a spool is numbered afresh, never with the old UIDLs."""
        append(spool_dir / "alice", b"one\n")
        store = store_for(spool_dir)
        first = await uidls_and_bodies(store)
        (spool_dir / ".alice.pobox-uidl").unlink()
        time.sleep(1)  # a new uidvalidity is the time in seconds: let it change
        second = await uidls_and_bodies(store)
        assert first[0][1] == second[0][1]
        assert first[0][0] != second[0][0]

    async def test_reuse_xuidl(self, spool_dir: Path) -> None:
        """With pop3_reuse_xuidl, qpopper's X-UIDL headers are kept; a duplicate is not."""
        append(spool_dir / "alice", b"X-UIDL: qpop-a\n\none\n")
        append(spool_dir / "alice", b"X-UIDL: dup\n\ntwo\n")
        append(spool_dir / "alice", b"X-UIDL: dup\n\nthree\n")
        store = store_for(spool_dir, reuse_xuidl=True)
        uidls = [uidl for uidl, _ in await uidls_and_bodies(store)]
        assert "qpop-a" == uidls[0]
        assert "dup" not in uidls
        assert 3 == len(set(uidls))

    async def test_killed_mid_rewrite_leaves_the_old_spool(self, spool_dir: Path) -> None:
        """SIGKILL while the new spool is written: the old spool is intact, byte for byte, and
        the next deletion works (and clears the leftover)."""
        spool = spool_dir / "alice"
        for number in range(48):
            append(spool, f"Subject: {number}\n\n".encode() + b"x" * (1024 * 1024) + b"\n")
        store = store_for(spool_dir)
        before = await uidls_and_bodies(store)
        digest = hashlib.sha256(spool.read_bytes()).hexdigest()
        inode = spool.stat().st_ino
        _kill_mid_rewrite(spool_dir, inode)
        assert digest == hashlib.sha256(spool.read_bytes()).hexdigest()
        assert (spool_dir / ".alice.pobox-new").exists()
        assert before == await uidls_and_bodies(store)
        maildrop = await store.open(ALICE)
        await maildrop.delete([maildrop.messages[0].key])
        await maildrop.close()
        assert before[1:] == await uidls_and_bodies(store)
        assert not (spool_dir / ".alice.pobox-new").exists()


def _kill_mid_rewrite(spool_dir: Path, inode: int) -> None:
    """Start a process deleting message 1; stop it once it has written part of the new spool
    (checking that it has not renamed it yet); kill it."""
    code = (
        "import asyncio\n"
        "from pobox.storage.mbox import MboxStore\n"
        "from tests.helpers.maildir import User\n"
        "async def main():\n"
        f"    store = MboxStore({f'mbox:{spool_dir}/%u'!r})\n"
        "    maildrop = await store.open(User('alice'))\n"
        "    await maildrop.delete([maildrop.messages[0].key])\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    try:
        temporary = spool_dir / ".alice.pobox-new"
        while not (temporary.exists() and temporary.stat().st_size):
            if child.poll() is not None:
                pytest.fail(f"the deleting process ended ({child.returncode}) before it wrote")
            time.sleep(0.0005)
        os.kill(child.pid, signal.SIGSTOP)
        if (spool_dir / "alice").stat().st_ino != inode:
            pytest.fail("the rewrite finished before the process could be stopped")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
