"""Per-thread filesystem credentials: the kernel's own answers, thread by thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pobox.storage.privsep._fsid import become, current_fs_ids, owner_rights
from tests.helpers.accounts import ALICE, BOB, Account, require_root, system_user
from tests.helpers.dovecot import searchable_tmpdir


@pytest.fixture
def alice() -> Account:
    """An unprivileged user."""
    return system_user(ALICE)


@pytest.fixture
def folder() -> Iterator[Path]:
    """A directory every user can search."""
    with searchable_tmpdir() as path:
        yield path


def _in_thread(work: Callable[[], object], hold: Callable[[], object] | None = None) -> object:
    """Run ``work`` in a new thread and return its result (or exception)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(work())
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return result[0]


class TestBecome:
    """become() switches a worker thread from owner to owner, never back to root."""

    def test_switches_between_owners(self, alice: Account, folder: Path) -> None:
        """After alice then bob, the thread is bob: alice's private file is refused to it."""
        require_root()
        bob = system_user(BOB)
        private = folder / "alice-only"
        private.write_bytes(b"alice\n")
        os.chown(private, alice.uid, alice.gid)
        private.chmod(0o600)

        def work() -> object:
            become(alice.uid, alice.gid)
            as_alice = (current_fs_ids(), private.read_bytes())
            become(bob.uid, bob.gid)
            try:
                private.read_bytes()
            except PermissionError:
                return as_alice, current_fs_ids(), "refused"
            return as_alice, current_fs_ids(), "read"

        result = _in_thread(work)
        assert (((alice.uid, alice.gid), b"alice\n"), (bob.uid, bob.gid), "refused") == result
        assert (0, 0) == current_fs_ids()


class TestOwnerRights:
    """owner_rights sets the calling thread's fsuid/fsgid, and only that thread's."""

    def test_only_the_calling_thread(self, alice: Account) -> None:
        """Inside the block the thread has alice's fs ids while the main thread keeps root's."""
        require_root()
        inside = threading.Event()
        release = threading.Event()
        seen: dict[str, tuple[int, int]] = {}

        def work() -> None:
            with owner_rights(alice.uid, alice.gid):
                seen["worker"] = current_fs_ids()
                inside.set()
                release.wait(30)
            seen["after"] = current_fs_ids()

        thread = threading.Thread(target=work)
        thread.start()
        inside.wait(30)
        seen["main"] = current_fs_ids()
        release.set()
        thread.join(30)

        assert (alice.uid, alice.gid) == seen["worker"]
        assert (0, 0) == seen["main"]
        assert (0, 0) == seen["after"]

    def test_kernel_refuses_root_only_file(self, alice: Account, folder: Path) -> None:
        """A root-only file is refused (EACCES) inside the block, and readable outside it."""
        require_root()
        secret = folder / "secret"
        secret.write_bytes(b"root only\n")
        secret.chmod(0o600)

        def read_as_alice() -> object:
            with owner_rights(alice.uid, alice.gid):
                return secret.read_bytes()

        refused = _in_thread(read_as_alice)
        assert isinstance(refused, PermissionError)
        assert b"root only\n" == secret.read_bytes()

    def test_files_created_belong_to_the_owner(self, alice: Account, folder: Path) -> None:
        """A file created inside the block is owned by the owner's uid and gid."""
        require_root()
        home = folder / "alice"
        home.mkdir()
        os.chown(home, alice.uid, alice.gid)
        made = home / "made"

        def create() -> object:
            with owner_rights(alice.uid, alice.gid):
                made.write_bytes(b"x")
            return None

        assert _in_thread(create) is None
        info = made.stat()
        assert (alice.uid, alice.gid) == (info.st_uid, info.st_gid)

    def test_refused_without_privileges(self, alice: Account) -> None:
        """A process without CAP_SETUID gets CredentialsError and the block never runs."""
        require_root()
        # The interpreter may live where alice cannot read (a pyenv under /root): the child
        # starts as root, imports, then drops to alice for good.
        code = (
            "import os\n"
            "from pobox.storage.privsep._fsid import CredentialsError, owner_rights\n"
            f"os.setgroups([]); os.setgid({alice.gid}); os.setuid({alice.uid})\n"
            "ran = False\n"
            "try:\n"
            "    with owner_rights(0, 0):\n"
            "        ran = True\n"
            "except CredentialsError as exc:\n"
            "    print('refused', ran, exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert out.stdout.startswith("refused False setfsgid(0) was refused")
