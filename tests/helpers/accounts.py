"""Unprivileged system users for the tests that check whose rights mail is accessed with.

The suite runs as root in CI. :func:`system_user` creates a user with ``useradd`` the first
time it is asked for (:mod:`tests.helpers.users`: no home directory, no login shell, a group
of its own) and finds it again afterwards, so running the tests twice, or two tests at once,
is fine. (For a directory every user can reach, pytest's own ``tmp_path`` being under a
root-only one, use :func:`tests.helpers.dovecot.searchable_tmpdir`.)
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import users

__all__ = [
    "ROOT_MAIL_SETTINGS",
    "ROOT_MAIL_VALUES",
    "Account",
    "chown_tree",
    "process_ids",
    "require_root",
    "system_user",
    "unused_uid",
]

#: The users these tests create; the prefix keeps them apart from real accounts.
ALICE, BOB, VMAIL = "pobox-ps-alice", "pobox-ps-bob", "pobox-ps-vmail"


@dataclass(frozen=True, slots=True)
class Account:
    """A system user: its name, uid and primary gid."""

    name: str
    uid: int
    gid: int


def require_root() -> None:
    """Fail (never skip) a test that needs root."""
    users.need_root()


def system_user(name: str) -> Account:
    """Return the system user ``name``, creating it (and its group) if missing."""
    uid, gid = users.system_user(name)
    return Account(name, uid, gid)


def unused_uid() -> int:
    """Return a uid no entry of the system's user database has."""
    for uid in range(60_000, 65_000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    msg = "no unused uid between 60000 and 65000"
    raise AssertionError(msg)


def process_ids(pid: int) -> tuple[list[int], list[int]]:
    """The real, effective, saved and filesystem uids and gids of ``pid``, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)
    gid = re.search(r"^Gid:\s+(.*)$", status, re.MULTILINE)
    assert uid is not None
    assert gid is not None
    return [int(x) for x in uid[1].split()], [int(x) for x in gid[1].split()]


def chown_tree(path: Path, account: Account) -> None:
    """Give ``path`` and everything below it (links themselves, not targets) to ``account``."""
    os.chown(path, account.uid, account.gid, follow_symlinks=False)
    for parent, directories, files in os.walk(path):
        for name in (*directories, *files):
            os.chown(os.path.join(parent, name), account.uid, account.gid, follow_symlinks=False)


#: Settings for a test whose subject is not privileges and that runs ``pobox serve`` or
#: ``pobox deliver`` as root on files root owns: mail accessed as root, explicitly allowed
#: (mode 2 with ``mail_uid`` root; never a production setting). Empty when not root.
ROOT_MAIL_VALUES: dict[str, object] = (
    {"mail_uid": "0", "mail_gid": "0", "first_valid_uid": 0, "first_valid_gid": 0}
    if os.geteuid() == 0
    else {}
)
#: The same as TOML lines.
ROOT_MAIL_SETTINGS = "".join(
    f'{key} = "{value}"\n' if isinstance(value, str) else f"{key} = {value}\n"
    for key, value in ROOT_MAIL_VALUES.items()
)
