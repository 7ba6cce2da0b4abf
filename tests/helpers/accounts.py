"""Unprivileged system users for the tests that check whose rights mail is accessed with.

The suite runs as root in CI. :func:`system_user` creates a user with ``useradd`` the first
time it is asked for (no home directory, no login shell, a group of its own) and finds it
again afterwards, so running the tests twice, or two tests at once, is fine.
:func:`searchable_dir` gives a temporary directory every user can reach (pytest's own
``tmp_path`` is under a root-only directory).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Account", "chown_tree", "require_root", "searchable_dir", "system_user"]

#: The users these tests create; the prefix keeps them apart from real accounts.
ALICE, BOB, VMAIL, SERVER = "pobox-ps-alice", "pobox-ps-bob", "pobox-ps-vmail", "pobox-ps-srv"


@dataclass(frozen=True, slots=True)
class Account:
    """A system user: its name, uid and primary gid."""

    name: str
    uid: int
    gid: int


def require_root() -> None:
    """Fail (never skip) a test that needs root."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs the suite as root)")


def system_user(name: str) -> Account:
    """Return the system user ``name``, creating it (and its group) if missing."""
    require_root()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            pytest.fail("useradd is missing: install the passwd package")
        result = subprocess.run(
            [useradd, "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            pytest.fail(f"useradd {name} failed: {result.stderr.strip()}")
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def chown_tree(path: Path, account: Account) -> None:
    """Give ``path`` and everything below it (links themselves, not targets) to ``account``."""
    os.chown(path, account.uid, account.gid, follow_symlinks=False)
    for parent, directories, files in os.walk(path):
        for name in (*directories, *files):
            os.chown(os.path.join(parent, name), account.uid, account.gid, follow_symlinks=False)


@contextlib.contextmanager
def searchable_dir() -> Iterator[Path]:
    """Yield a fresh directory (mode 0755, under the system temporary directory), then remove it."""
    path = Path(tempfile.mkdtemp(prefix="pobox-privsep-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: TOML lines for a test whose subject is not privileges and that runs ``pobox serve`` or
#: ``pobox deliver`` as root on files root owns: mail accessed as root, explicitly allowed
#: (mode 2 with ``mail_uid`` root; never a production setting). Empty when not root.
ROOT_MAIL_SETTINGS = (
    'mail_uid = "0"\nmail_gid = "0"\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n'
    if os.geteuid() == 0
    else ""
)
