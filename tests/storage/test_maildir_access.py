"""The synchronous Maildir core: :class:`MaildirAccess` and :class:`MaildirHandle`.

What the privilege-separation layer builds on: plain data and file descriptors in and out,
every call naming the owner uid the maildir's files must have. Tests that need another owner
create unprivileged users (root only) and run the core as them where it matters.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pobox.storage._safefs import UnsafeFile
from pobox.storage.base import MaildropLocked, MessageGone, StoragePermanentError, Usage
from pobox.storage.maildir import MaildirAccess, MaildirHandle
from tests.helpers.dovecot import searchable_tmpdir
from tests.helpers.maildir import User, deliver, incoming
from tests.helpers.users import MALLORY, VICTIM, run_as, system_user

ALICE = User("alice")
ME = os.geteuid()
#: What a snippet run as another user imports (pobox only: no test dependencies there).
SNIPPET_IMPORTS = (
    "import os\n"
    "from pobox.records import User\n"
    "from pobox.storage.base import IncomingMessage\n"
    "from pobox.storage.maildir import MaildirAccess\n"
    "from pobox.storage.spool import Spool\n"
    "def incoming(data):\n"
    "    return IncomingMessage(b'', Spool.from_bytes(data))\n"
)


@pytest.fixture
def access(tmp_path: Path) -> MaildirAccess:
    """The core serving ``<tmp_path>/<user>``."""
    return MaildirAccess(f"maildir:{tmp_path}/%n")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can reach (under ``/tmp``, mode 0755), removed at the end."""
    with searchable_tmpdir() as path:
        yield path


def read_fd(fd: int, size: int) -> bytes:
    """Read ``size`` octets from ``fd`` and close it."""
    try:
        return os.read(fd, size + 1)
    finally:
        os.close(fd)


class TestOpen:
    """Opening gives a handle with the snapshot and the session lock, and no descriptor."""

    def test_handle_type(self, access: MaildirAccess) -> None:
        """``open`` returns a :class:`MaildirHandle`."""
        handle = access.open(ALICE, owner=ME)
        handle.close()
        assert isinstance(handle, MaildirHandle)

    def test_snapshot_is_plain_data(self, access: MaildirAccess, tmp_path: Path) -> None:
        """The handle's messages are (key, wire size, UIDL) records of the maildir's messages."""
        base = deliver(tmp_path / "alice", b"Subject: a\n\nbody\n")
        handle = access.open(ALICE, owner=ME)
        handle.close()
        assert [(base, 20)] == [(info.key, info.size) for info in handle.messages]

    def test_handle_holds_no_descriptor(self, access: MaildirAccess, tmp_path: Path) -> None:
        """An open handle keeps no file open (only the dotlock file exists)."""
        deliver(tmp_path / "alice", b"x\n")
        before = len(os.listdir("/proc/self/fd"))
        handle = access.open(ALICE, owner=ME)
        during = len(os.listdir("/proc/self/fd"))
        handle.close()
        assert before == during

    def test_lock_excludes_until_close(self, access: MaildirAccess, tmp_path: Path) -> None:
        """A second locked open fails until the first handle is closed."""
        deliver(tmp_path / "alice", b"x\n")
        first = access.open(ALICE, owner=ME)
        with pytest.raises(MaildropLocked):
            access.open(ALICE, owner=ME)
        first.close()
        access.open(ALICE, owner=ME).close()

    def test_maildir_of_another_owner_is_refused(
        self, access: MaildirAccess, tmp_path: Path
    ) -> None:
        """A maildir that does not belong to ``owner`` is refused."""
        deliver(tmp_path / "alice", b"x\n")
        with pytest.raises(UnsafeFile, match="owned by uid"):
            access.open(ALICE, owner=ME + 1)

    def test_missing_maildir_is_created(self, access: MaildirAccess, tmp_path: Path) -> None:
        """A maildir that does not exist is created (0700) and opened empty."""
        handle = access.open(ALICE, owner=ME)
        handle.close()
        modes = [
            stat.S_IMODE((tmp_path / "alice" / sub).stat().st_mode) for sub in ["cur", "new", "tmp"]
        ]
        assert ((), [0o700] * 3) == (handle.messages, modes)


class TestOpenMessage:
    """``open_message`` hands out a descriptor and the size to read."""

    def test_descriptor_and_fstat_size(self, access: MaildirAccess, tmp_path: Path) -> None:
        """The descriptor reads the stored message; the size is the file's, not the wire's."""
        base = deliver(tmp_path / "alice", b"Subject: a\n\nbody\n")
        handle = access.open(ALICE, owner=ME)
        fd, size = handle.open_message(base)
        handle.close()
        assert (17, b"Subject: a\n\nbody\n") == (size, read_fd(fd, size))

    def test_message_not_in_snapshot_is_gone(self, access: MaildirAccess) -> None:
        """A key that is not in the snapshot is :class:`MessageGone`."""
        handle = access.open(ALICE, owner=ME)
        with pytest.raises(MessageGone):
            handle.open_message("1.M1P1.nothing")
        handle.close()

    def test_closed_handle_refuses(self, access: MaildirAccess, tmp_path: Path) -> None:
        """A closed handle (its lock perhaps another session's now) opens nothing."""
        base = deliver(tmp_path / "alice", b"x\n")
        handle = access.open(ALICE, owner=ME)
        handle.close()
        with pytest.raises(RuntimeError, match="closed"):
            handle.open_message(base)


class TestDeliverAndUsage:
    """Delivery and usage through the core."""

    def test_delivered_message_is_listed(self, access: MaildirAccess) -> None:
        """A delivered message is in the next snapshot, named as delivery named it."""
        name = access.deliver(ALICE, incoming(b"Subject: a\r\n\r\nbody\r\n"), owner=ME)
        handle = access.open(ALICE, owner=ME)
        handle.close()
        assert ([name], Usage(17, 1)) == (
            [info.key for info in handle.messages],
            access.usage(ALICE, owner=ME),
        )

    def test_delete_through_the_handle(self, access: MaildirAccess, tmp_path: Path) -> None:
        """``delete`` removes the files and reports them."""
        base = deliver(tmp_path / "alice", b"x\n")
        handle = access.open(ALICE, owner=ME)
        result = handle.delete([base])
        handle.close()
        assert ((base,), [], []) == (
            result.removed,
            os.listdir(tmp_path / "alice" / "new"),
            os.listdir(tmp_path / "alice" / "cur"),
        )


class TestOtherOwners:
    """The owner is whoever the caller says; root stands in for them, others cannot."""

    def test_root_gives_what_it_creates_to_the_owner(self, tmp_path: Path) -> None:
        """As root for another owner, every file and directory created belongs to that owner."""
        uid, gid = system_user(VICTIM)
        maildir = tmp_path / "victim"
        maildir.mkdir()
        os.chown(maildir, uid, gid)
        access = MaildirAccess(f"maildir:{tmp_path}/%n")
        user = User("victim")
        access.deliver(user, incoming(b"Subject: a\n\n"), owner=uid)
        access.open(user, owner=uid).close()
        owners = {(path.name, path.lstat().st_uid) for path in maildir.rglob("*")}
        assert {uid} == {owner for _, owner in owners}, owners

    def test_the_owner_runs_the_core_on_their_own_maildir(self, shared: Path) -> None:
        """Run as the owner's uid (no root at all), the core delivers, lists and reads."""
        uid, gid = system_user(MALLORY)
        os.chown(shared, uid, gid)
        code = (
            "import os\n"
            f"{SNIPPET_IMPORTS}"
            f"access = MaildirAccess('maildir:{shared}/%n')\n"
            "user = User('mallory')\n"
            "access.deliver(user, incoming(b'Subject: mine\\n\\n'), owner=os.getuid())\n"
            "handle = access.open(user, owner=os.getuid())\n"
            "fd, size = handle.open_message(handle.messages[0].key)\n"
            "print(os.read(fd, size).decode(), end='')\n"
            "handle.close()\n"
        )
        done = run_as((uid, gid), code)
        assert (0, "Subject: mine\n\n") == (done.returncode, done.stdout), done.stderr

    def test_no_one_but_root_creates_for_another_owner(self, shared: Path) -> None:
        """A process that is not root cannot stand in for another owner: it is refused."""
        uid, gid = system_user(MALLORY)
        victim_uid, _ = system_user(VICTIM)
        (shared / "victim").mkdir()
        os.chown(shared / "victim", victim_uid, -1)
        os.chmod(shared / "victim", 0o777)  # writable, so the kernel would let mallory write
        code = (
            f"{SNIPPET_IMPORTS}"
            "from pobox.storage.base import StoragePermanentError\n"
            f"access = MaildirAccess('maildir:{shared}/%n')\n"
            "try:\n"
            f"    access.deliver(User('victim'), incoming(b'x\\n'), owner={victim_uid})\n"
            "except StoragePermanentError as exc:\n"
            "    print(type(exc).__name__, exc)\n"
        )
        done = run_as((uid, gid), code)
        files = [path for path in (shared / "victim").rglob("*") if path.is_file()]
        assert (True, []) == (f"for uid {victim_uid} as uid {uid}" in done.stdout, files), (
            done.stdout,
            done.stderr,
        )


class TestBadLocation:
    """Locations are checked like the store's."""

    def test_unsafe_user_name_is_permanent(self, access: MaildirAccess) -> None:
        """A user name that would leave its directory is refused before any file access."""
        with pytest.raises(StoragePermanentError):
            access.open(User(".."), owner=ME)
